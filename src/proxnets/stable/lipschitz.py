"""Lipschitz constants: certified upper bounds composed from layers, and empirical lower estimates.

Upper bound. ``Lip(f_n o ... o f_1) <= prod_i Lip(f_i)``. :func:`lipschitz_bound` walks a model:
a module with a ``lipschitz_constant(mode)`` method gives its own constant (blocks, glue, models);
a layer carrying an :class:`~proxnets.constraints.OperatorNormConstraint` gives ``|s(W) W|_2``;
``nn.Sequential`` multiplies; elementwise activations give their slope bound. Anything else is
refused (no silent guesses). The result is a :class:`LipschitzBound`: a ``float`` that carries
``rigorous`` (every factor proved: rigorous operator-norm bounds of :mod:`proxnets.norm_bounds`),
``method`` and ``why``. Arithmetic on it gives a bare float, which the certificates refuse.

Modes: ``"rigorous"`` (default; alias ``"upper"``): rigorous norm bounds; ``"estimate"`` (alias
``"exact"``): converged power-iteration estimates (lower estimates of each norm: not a certificate);
``"cheap"``: the last training estimates.

Lower estimate. :func:`empirical_lipschitz` maximizes the ratio

    rho(x, y) = |f(x) - f(y)| / |x - y|        (norms per sample, over all non-batch axes)

by gradient ascent (Adam) on pairs ``(x, y = x + d)`` started at given points with small random
``d``; every evaluated ratio is a valid lower bound of ``Lip(f)``, the largest one is returned. It is
a search result: ``converged`` is never claimed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn

from proxnets.constraints import find_constraint
from proxnets.utils.convergence import IterInfo
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor

__all__ = ["LipschitzBound", "lipschitz_bound", "compose_bounds", "empirical_lipschitz", "EmpiricalLipschitzInfo",
           "ELEMENTWISE_LIPSCHITZ", "LIPSCHITZ_MODES"]

LIPSCHITZ_MODES = ("rigorous", "upper", "estimate", "exact", "cheap")
_ALIASES = {"upper": "rigorous", "exact": "estimate"}

ELEMENTWISE_LIPSCHITZ: dict[type, Callable[[nn.Module], float]] = {
    nn.ReLU: lambda m: 1.0,
    nn.LeakyReLU: lambda m: max(1.0, abs(m.negative_slope)),
    nn.Tanh: lambda m: 1.0,
    nn.Sigmoid: lambda m: 0.25,
    nn.Identity: lambda m: 1.0,
    nn.Flatten: lambda m: 1.0,
}


class LipschitzBound(float):
    """A Lipschitz constant (a ``float``) with its trust: ``rigorous`` (proved upper bound), ``method``,
    ``why`` (required when not rigorous) and ``details``."""

    rigorous: bool
    method: str
    why: str
    details: dict

    def __new__(cls, value: float, rigorous: bool, method: str = "", why: str = "", details: dict | None = None):
        if not rigorous and not why:
            raise ValueError("why: expected the reason the Lipschitz bound is not rigorous, got ''")
        obj = super().__new__(cls, value)
        obj.rigorous, obj.method, obj.why, obj.details = bool(rigorous), method, why, dict(details or {})
        return obj

    def __repr__(self) -> str:
        trust = "rigorous" if self.rigorous else f"not rigorous: {self.why}"
        return f"LipschitzBound({float(self)!r}, {trust}, method={self.method!r})"

    def certificate(self, bound: float = 1.0, name: str = "lipschitz", **details):
        """``Certificate(name, value=self, bound)`` carrying this bound's trust."""
        from proxnets.certificates import Certificate

        return Certificate(name, float(self), bound, "<=", rigorous=self.rigorous, method=self.method, why=self.why,
                           details={**self.details, **details})


def _as_bound(value, source: str, mode: str) -> LipschitzBound:
    if isinstance(value, LipschitzBound):
        return value
    if mode != "rigorous":
        return LipschitzBound(float(value), False, mode, why=f"mode {mode!r} uses norm estimates")
    return LipschitzBound(float(value), False, "unknown", why=f"{source} returned a bare number (no proof attached)")


def compose_bounds(bounds: Iterable[LipschitzBound], method: str = "product of layer bounds") -> LipschitzBound:
    """``prod_i L_i``, rigorous when every factor is (the reasons of the others are kept)."""
    value, whys, rigorous = 1.0, [], True
    for b in bounds:
        value *= float(b)
        if not b.rigorous:
            rigorous = False
            if b.why not in whys:
                whys.append(b.why)
    return LipschitzBound(value, rigorous, method, "; ".join(whys))


def _mode(mode: str) -> str:
    check_choice("mode", mode, LIPSCHITZ_MODES)
    return _ALIASES.get(mode, mode)


def lipschitz_bound(model: nn.Module, mode: str = "rigorous") -> LipschitzBound:
    """Lipschitz bound (l2 -> l2) of ``model`` for what evaluation computes (see the module docstring).

    The default is rigorous where every layer has a proved bound; ``result.rigorous`` says whether it is.
    """
    mode = _mode(mode)
    if hasattr(model, "lipschitz_constant"):
        return _as_bound(model.lipschitz_constant(mode), f"{type(model).__name__}.lipschitz_constant", mode)
    constraint = find_constraint(model)
    if constraint is not None:
        original = model.parametrizations.weight.original
        if mode == "rigorous":
            nb = constraint.certified_norm(original)
            return LipschitzBound(nb.value, nb.rigorous, nb.method, nb.why, {"layer": type(model).__name__})
        return LipschitzBound(constraint.lipschitz_constant(original, mode), False, "power iteration",
                              why=f"mode {mode!r}: |A_W v| / |v| for the applied weight W and the converged power-iteration "
                                  "vector v, a lower estimate of the layer's norm (never a bound)")
    if isinstance(model, nn.Sequential):
        return compose_bounds(lipschitz_bound(child, mode) for child in model)
    rule = ELEMENTWISE_LIPSCHITZ.get(type(model))
    if rule is not None:
        return LipschitzBound(rule(model), True, "elementwise slope")
    raise TypeError(
        f"model: expected a module with a certified Lipschitz constant (a lipschitz_constant method, a norm "
        f"constraint, nn.Sequential or an elementwise activation), got {type(model).__name__}"
    )


@dataclasses.dataclass
class EmpiricalLipschitzInfo(IterInfo):
    """``residuals[k]``: best ratio ``max rho`` found up to ascent step k (nondecreasing);
    ``best_pair``: the pair ``(x, y)`` attaining it, each of the input's sample shape.
    A search result: ``converged`` stays ``False`` (nothing certifies that the maximum was found);
    ``lower_estimate`` is ``True``; ``finite`` is ``False`` when a non-finite ratio was met."""

    best_pair: tuple[torch.Tensor, torch.Tensor] | None = None
    lower_estimate: bool = True
    finite: bool = True


def empirical_lipschitz(
    f: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    steps: int = 100,
    lr: float = 1e-2,
    init_scale: float = 1e-2,
    generator: torch.Generator | None = None,
) -> tuple[float, EmpiricalLipschitzInfo]:
    """Largest ``|f(x) - f(y)| / |x - y|`` found by gradient ascent from the batch ``x0``.

    Returns ``(estimate, info)``; ``estimate <= Lip(f)`` always (a lower bound, a search result).
    """
    check_tensor("x0", x0, ndim=(2, 3, 4), nonempty=True)
    check_int("steps", steps, low=1)
    check_number("lr", lr, low=0.0, low_inclusive=False)
    check_number("init_scale", init_scale, low=0.0, low_inclusive=False)
    x = x0.detach().clone().requires_grad_(True)
    d0 = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    d = (init_scale * d0).requires_grad_(True)
    opt = torch.optim.Adam([x, d], lr=lr)
    info = EmpiricalLipschitzInfo()
    best = 0.0
    for k in range(steps):
        with torch.enable_grad():
            num = (f(x + d) - f(x)).flatten(1).norm(dim=1)  # (B,)
            den = d.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
            rho = num / den
            if not bool(torch.isfinite(rho.detach()).all()):
                info.finite = False
                rho = torch.nan_to_num(rho, nan=0.0, posinf=0.0, neginf=0.0)
            i = int(rho.detach().argmax())
            if float(rho[i].detach()) > best:
                best = float(rho[i].detach())
                info.best_pair = (x[i].detach().clone(), (x[i] + d[i]).detach().clone())
            opt.zero_grad()
            (-rho.sum()).backward()
        opt.step()
        info.residuals.append(best)
        info.iterations = k + 1
    info.converged = False  # a search: its best ratio is a lower estimate, never a converged maximum
    return best, info
