"""Activations that are proximal operators of convex functions.

For a convex, proper, lower semicontinuous ``f : R -> R u {+inf}`` applied elementwise,

    prox_f(v) = argmin_z  f(z) + 1/2 (z - v)^2.

Every object here knows both its ``prox`` (the activation) and its ``f`` (``value``, summed over
the features of each sample, ``+inf`` outside the domain), which is what lets an OptEq layer write
down its objective ``G``:

================  ===============================  ==========================
name              f(z)                             prox_f(v)
================  ===============================  ==========================
``relu``          indicator of ``z >= 0``          ``max(v, 0)``
``soft_threshold``  ``lam |z|``                    ``sign(v) max(|v| - lam, 0)``
``box``           indicator of ``[low, high]``     ``clamp(v, low, high)``
``identity``      ``0``                            ``v``
``user``          any (given value and prox)       any
================  ===============================  ==========================

``derivative(v)`` is the elementwise derivative of ``prox_f`` at ``v`` (almost everywhere); the
implicit backward pass uses it for the Jacobian ``J = diag(prox_f'(v)) W^T W``.

An L1 prior ``lam |z|_1`` added to ``f`` gives ``prox_{f + lam|.|} = prox_f o soft_lam``: this holds
for every scalar convex ``f`` minimized at 0 (``prox_f(0) = 0``), since then ``prox_f`` preserves
signs and the subgradient of ``lam |.|`` at ``soft_lam(v)`` is still valid at ``prox_f(soft_lam(v))``.
:meth:`ProxActivation.with_l1` builds that composition and refuses an ``f`` with ``prox_f(0) != 0``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from proxnets.utils.validation import check_number, fail

__all__ = [
    "ProxActivation",
    "ReLUProx",
    "SoftThreshold",
    "BoxClamp",
    "IdentityProx",
    "UserProx",
    "L1Composed",
    "ACTIVATIONS",
    "get_activation",
    "soft_threshold",
]


def soft_threshold(v: torch.Tensor, lam: float) -> torch.Tensor:
    """``sign(v) max(|v| - lam, 0)``: the prox of ``lam |.|``."""
    return torch.sign(v) * torch.clamp(v.abs() - lam, min=0.0)


def _per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every axis but the batch axis: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def _indicator(inside: torch.Tensor) -> torch.Tensor:
    """``0`` where every feature of a sample is inside the domain, ``+inf`` otherwise: ``(B,)``."""
    ok = inside.reshape(inside.shape[0], -1).all(dim=1)
    zero = torch.zeros(ok.shape, dtype=torch.get_default_dtype(), device=inside.device)
    return torch.where(ok, zero, torch.full_like(zero, float("inf")))


class ProxActivation:
    """Base class: ``prox(v)``, ``value(z)`` (per-sample sum of f, shape ``(B,)``), ``derivative(v)``."""

    name = "base"

    def prox(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prox_(self, v: torch.Tensor) -> torch.Tensor:
        """``prox`` that may overwrite ``v`` (solvers call it outside autograd on a fresh tensor)."""
        return self.prox(v)

    def derivative(self, v: torch.Tensor) -> torch.Tensor | None:
        """Elementwise ``d prox_f / dv`` at ``v``; ``None`` means "use autograd"."""
        return None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """``prox_f(v)``, elementwise: NaN/inf propagate as in torch (no finiteness check: solver hot path,
        where the solver's monitor catches them)."""
        if not isinstance(v, torch.Tensor):
            fail("v", "a torch.Tensor", type(v).__name__, TypeError)
        return self.prox(v)

    def with_l1(self, lam: float) -> "ProxActivation":
        """The activation of ``f + lam |.|_1`` (an L1 sparsity prior on the equilibrium)."""
        lam = check_number("lam", lam, low=0.0)
        if lam == 0.0:
            return self
        return L1Composed(self, lam)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ReLUProx(ProxActivation):
    """ReLU = prox of the indicator of the nonnegative orthant."""

    name = "relu"

    def prox(self, v):
        return torch.relu(v)

    def prox_(self, v):
        return v.relu_()

    def value(self, z):
        return _indicator(z >= 0).to(z.dtype)

    def derivative(self, v):
        return (v > 0).to(v.dtype)


class SoftThreshold(ProxActivation):
    """Soft-threshold = prox of ``lam |z|``."""

    name = "soft_threshold"

    def __init__(self, lam: float = 0.1):
        self.lam = check_number("lam", lam, low=0.0)

    def prox(self, v):
        return soft_threshold(v, self.lam)

    def value(self, z):
        return self.lam * _per_sample_sum(z.abs())

    def derivative(self, v):
        return (v.abs() > self.lam).to(v.dtype)

    def __repr__(self):
        return f"SoftThreshold(lam={self.lam})"


class BoxClamp(ProxActivation):
    """Clamp (hard-tanh for ``[-1, 1]``) = prox (projection) of the indicator of ``[low, high]``."""

    name = "box"

    def __init__(self, low: float = -1.0, high: float = 1.0):
        self.low = check_number("low", low)
        self.high = check_number("high", high)
        if not self.low < self.high:
            fail("high", f"a number > low = {self.low}", high)

    def prox(self, v):
        return torch.clamp(v, self.low, self.high)

    def prox_(self, v):
        return v.clamp_(self.low, self.high)

    def value(self, z):
        return _indicator((z >= self.low) & (z <= self.high)).to(z.dtype)

    def derivative(self, v):
        return ((v > self.low) & (v < self.high)).to(v.dtype)

    def __repr__(self):
        return f"BoxClamp(low={self.low}, high={self.high})"


class IdentityProx(ProxActivation):
    """Identity = prox of ``f = 0`` (a linear equilibrium)."""

    name = "identity"

    def prox(self, v):
        return v

    def value(self, z):
        return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)

    def derivative(self, v):
        return torch.ones_like(v)


class UserProx(ProxActivation):
    """A user's convex ``f``: ``value_fn(z) -> (B,)`` per-sample sum of f, ``prox_fn(v)`` elementwise.

    ``derivative_fn`` is optional (autograd through ``prox_fn`` is used otherwise). The library
    cannot verify convexity; :func:`check_prox_pair` in the tests checks the prox inequality.
    """

    name = "user"

    def __init__(
        self,
        value_fn: Callable[[torch.Tensor], torch.Tensor],
        prox_fn: Callable[[torch.Tensor], torch.Tensor],
        derivative_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        name: str = "user",
    ):
        if not callable(value_fn):
            fail("value_fn", "a callable z -> (B,) tensor", value_fn, TypeError)
        if not callable(prox_fn):
            fail("prox_fn", "a callable v -> tensor of the same shape", prox_fn, TypeError)
        if derivative_fn is not None and not callable(derivative_fn):
            fail("derivative_fn", "a callable or None", derivative_fn, TypeError)
        self.value_fn, self.prox_fn, self.derivative_fn = value_fn, prox_fn, derivative_fn
        self.name = name

    def prox(self, v):
        return self.prox_fn(v)

    def value(self, z):
        return self.value_fn(z)

    def derivative(self, v):
        return None if self.derivative_fn is None else self.derivative_fn(v)

    def __repr__(self):
        return f"UserProx(name={self.name!r})"


class L1Composed(ProxActivation):
    """``prox_{f + lam |.|}(v) = prox_f(soft_lam(v))`` for ``f`` minimized at 0 (see module docstring)."""

    def __init__(self, base: ProxActivation, lam: float):
        probe = torch.zeros(1, 4)
        if not bool((base.prox(probe) == 0).all()):
            fail("activation", "an f minimized at 0 (prox_f(0) = 0) to add an L1 prior", repr(base))
        self.base, self.lam = base, float(lam)
        self.name = f"{base.name}+l1"

    def prox(self, v):
        return self.base.prox(soft_threshold(v, self.lam))

    def value(self, z):
        return self.base.value(z) + self.lam * _per_sample_sum(z.abs())

    def derivative(self, v):
        inner = self.base.derivative(soft_threshold(v, self.lam))
        if inner is None:
            return None
        return inner * (v.abs() > self.lam).to(v.dtype)

    def __repr__(self):
        return f"L1Composed({self.base!r}, lam={self.lam})"


ACTIVATIONS: dict[str, Callable[..., ProxActivation]] = {
    "relu": ReLUProx,
    "soft_threshold": SoftThreshold,
    "box": BoxClamp,
    "identity": IdentityProx,
}


def get_activation(spec: str | ProxActivation, **options) -> ProxActivation:
    """An activation from its registry name (with constructor options) or an instance (returned)."""
    if isinstance(spec, ProxActivation):
        if options:
            fail("options", "no options when an activation instance is given", sorted(options))
        return spec
    if spec not in ACTIVATIONS:
        fail("activation", f"one of {sorted(ACTIVATIONS)} or a ProxActivation", spec)
    return ACTIVATIONS[spec](**options)
