"""Lipschitz constants: certified upper bounds composed from layers, and empirical lower estimates.

Upper bound. ``Lip(f_n o ... o f_1) <= prod_i Lip(f_i)``. :func:`lipschitz_bound` walks a model:
a module with a ``lipschitz_constant(mode)`` method gives its own constant (blocks, glue, models);
a layer carrying an :class:`OperatorNormConstraint` gives ``|s(W) W|_2``; ``nn.Sequential`` multiplies;
elementwise activations give their slope bound. Anything else is refused (no silent guesses).

Lower estimate. :func:`empirical_lipschitz` maximizes the ratio

    rho(x, y) = |f(x) - f(y)| / |x - y|        (norms per sample, over all non-batch axes)

by gradient ascent (Adam) on pairs ``(x, y = x + d)`` started at given points with small random
``d``; every evaluated ratio is a valid lower bound of ``Lip(f)``, the largest one is returned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from proxnets.stable.norms import find_constraint
from proxnets.utils.convergence import IterInfo
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor

__all__ = ["lipschitz_bound", "empirical_lipschitz", "EmpiricalLipschitzInfo", "ELEMENTWISE_LIPSCHITZ"]

ELEMENTWISE_LIPSCHITZ: dict[type, Callable[[nn.Module], float]] = {
    nn.ReLU: lambda m: 1.0,
    nn.LeakyReLU: lambda m: max(1.0, abs(m.negative_slope)),
    nn.Tanh: lambda m: 1.0,
    nn.Sigmoid: lambda m: 0.25,
    nn.Identity: lambda m: 1.0,
    nn.Flatten: lambda m: 1.0,
}


def lipschitz_bound(model: nn.Module, mode: str = "exact") -> float:
    """Certified Lipschitz bound (l2 -> l2) of ``model`` for what evaluation computes.

    ``mode``: ``"exact"`` (converged power iterations, the default), ``"cheap"`` (the last training
    estimates), ``"upper"`` (rigorous: Fourier upper bounds of stride-1 convolutions, exact SVDs of
    matrices -- a check that the power iteration's safety factor sufficed).
    """
    check_choice("mode", mode, ("cheap", "exact", "upper"))
    if hasattr(model, "lipschitz_constant"):
        return float(model.lipschitz_constant(mode))
    constraint = find_constraint(model)
    if constraint is not None:
        return constraint.lipschitz_constant(model.parametrizations.weight.original, mode)
    if isinstance(model, nn.Sequential):
        out = 1.0
        for child in model:
            out *= lipschitz_bound(child, mode)
        return out
    rule = ELEMENTWISE_LIPSCHITZ.get(type(model))
    if rule is not None:
        return rule(model)
    raise TypeError(
        f"model: expected a module with a certified Lipschitz constant (a lipschitz_constant method, a norm "
        f"constraint, nn.Sequential or an elementwise activation), got {type(model).__name__}"
    )


@dataclasses.dataclass
class EmpiricalLipschitzInfo(IterInfo):
    """``residuals[k]``: best ratio ``max rho`` found up to ascent step k (nondecreasing);
    ``best_pair``: the pair ``(x, y)`` attaining it, each of the input's sample shape."""

    best_pair: tuple[torch.Tensor, torch.Tensor] | None = None


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

    Returns ``(estimate, info)``; ``estimate <= Lip(f)`` always (a lower bound).
    """
    check_tensor("x0", x0, ndim=(2, 3, 4))
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
            i = int(rho.detach().argmax())
            if float(rho[i].detach()) > best:
                best = float(rho[i].detach())
                info.best_pair = (x[i].detach().clone(), (x[i] + d[i]).detach().clone())
            opt.zero_grad()
            (-rho.sum()).backward()
        opt.step()
        info.residuals.append(best)
        info.iterations = k + 1
    info.converged = True
    return best, info
