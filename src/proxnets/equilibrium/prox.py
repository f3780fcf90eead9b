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
``leaky_relu``    ``(1/a - 1) z^2/2`` for ``z < 0``    ``max(v, a v)``, ``0 < a <= 1``
``tanh``          ``((1+z)log(1+z) + (1-z)log(1-z))/2 - z^2/2`` on ``[-1, 1]``   ``tanh(v)``
``sigmoid``       ``p log p + (1-p)log(1-p) + log 2 - z^2/2``, ``p = z + 1/2``   ``sigmoid(v) - 1/2``
``softsign``      ``-log(1 - |z|) - |z| - z^2/2`` on ``(-1, 1)``    ``v / (1 + |v|)``
``IncreasingProx``  ``z v - int_0^v sigma - z^2/2``, ``v = sigma^{-1}(z)`` (numerical)   any increasing sigma, slope <= 1
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
    "LeakyReLUProx",
    "TanhProx",
    "SigmoidProx",
    "SoftsignProx",
    "IncreasingProx",
    "L1Composed",
    "PROX_ACTIVATIONS",
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
    # True when prox_f' takes only the values 0 and 1 (a.e.): then sqrt(prox_f') = prox_f', and the symmetrized
    # adjoint of OptEq skips the square root (on this kind of CPU a square root of a 0/1 tensor is ~10x one of
    # positive numbers, measured 2.2 ms for a (128, 16, 14, 14) batch, more than one map evaluation)
    binary_derivative = False

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

    def derivative_at_output(self, z: torch.Tensor) -> torch.Tensor | None:
        """``prox_f'(v)`` written through the output ``z = prox_f(v)`` (a.e.); ``None``: not available.

        Lets the implicit backward use the solver's last output without keeping its pre-activation.
        """
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
    binary_derivative = True

    def prox(self, v):
        return torch.relu(v)

    def prox_(self, v):
        return v.relu_()

    def value(self, z):
        return _indicator(z >= 0).to(z.dtype)

    def derivative(self, v):
        return (v > 0).to(v.dtype)

    def derivative_at_output(self, z):
        return (z > 0).to(z.dtype)


class SoftThreshold(ProxActivation):
    """Soft-threshold = prox of ``lam |z|``."""

    name = "soft_threshold"
    binary_derivative = True

    def __init__(self, lam: float = 0.1):
        self.lam = check_number("lam", lam, low=0.0)

    def prox(self, v):
        return soft_threshold(v, self.lam)

    def value(self, z):
        return self.lam * _per_sample_sum(z.abs())

    def derivative(self, v):
        return (v.abs() > self.lam).to(v.dtype)

    def derivative_at_output(self, z):
        return (z != 0).to(z.dtype)

    def __repr__(self):
        return f"SoftThreshold(lam={self.lam})"


class BoxClamp(ProxActivation):
    """Clamp (hard-tanh for ``[-1, 1]``) = prox (projection) of the indicator of ``[low, high]``."""

    name = "box"
    binary_derivative = True

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

    def derivative_at_output(self, z):
        return ((z > self.low) & (z < self.high)).to(z.dtype)

    def __repr__(self):
        return f"BoxClamp(low={self.low}, high={self.high})"


class IdentityProx(ProxActivation):
    """Identity = prox of ``f = 0`` (a linear equilibrium)."""

    name = "identity"
    binary_derivative = True

    def prox(self, v):
        return v

    def value(self, z):
        return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)

    def derivative(self, v):
        return torch.ones_like(v)

    def derivative_at_output(self, z):
        return torch.ones_like(z)


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

    @property
    def binary_derivative(self) -> bool:  # the base's derivative times a 0/1 mask
        return self.base.binary_derivative

    def prox(self, v):
        return self.base.prox(soft_threshold(v, self.lam))

    def value(self, z):
        return self.base.value(z) + self.lam * _per_sample_sum(z.abs())

    def derivative(self, v):
        inner = self.base.derivative(soft_threshold(v, self.lam))
        if inner is None:
            return None
        return inner * (v.abs() > self.lam).to(v.dtype)

    def derivative_at_output(self, z):
        # z = prox_f(soft(v)) with prox_f(0) = 0: |v| <= lam gives z = 0, where the derivative is 0
        inner = self.base.derivative_at_output(z)
        return None if inner is None else inner * (z != 0).to(z.dtype)

    def __repr__(self):
        return f"L1Composed({self.base!r}, lam={self.lam})"


class LeakyReLUProx(ProxActivation):
    """Leaky ReLU ``max(v, a v)``, ``0 < a <= 1``: the prox of ``f(z) = (1/a - 1) z^2 / 2`` for ``z < 0``, ``0`` else.

    (``z + f'(z) = z / a = v`` for ``z < 0``; ``f`` is convex since ``1/a >= 1``.)
    """

    name = "leaky_relu"

    def __init__(self, slope: float = 0.1):
        self.slope = check_number("slope", slope, low=0.0, high=1.0, low_inclusive=False)

    def prox(self, v):
        return torch.where(v >= 0, v, self.slope * v)

    def value(self, z):
        return _per_sample_sum(0.5 * (1.0 / self.slope - 1.0) * torch.clamp(z, max=0.0) ** 2)

    def derivative(self, v):
        return torch.where(v > 0, torch.ones_like(v), torch.full_like(v, self.slope))

    def derivative_at_output(self, z):
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, self.slope))

    def __repr__(self):
        return f"LeakyReLUProx(slope={self.slope})"


def _xlogx(t: torch.Tensor) -> torch.Tensor:
    """``t log t`` with ``0 log 0 = 0`` (``t >= 0``)."""
    return torch.where(t > 0, t * torch.log(t.clamp_min(1e-300)), torch.zeros_like(t))


def _bounded_value(z: torch.Tensor, low: float, high: float, inside) -> torch.Tensor:
    """Per-sample sum of ``inside(z)`` on ``[low, high]``, ``+inf`` for a sample with a feature outside."""
    ok = (z >= low) & (z <= high)
    vals = inside(z.clamp(low, high))
    return _per_sample_sum(vals) + _indicator(ok).to(z.dtype)


class TanhProx(ProxActivation):
    """``tanh`` = prox of ``f(z) = ((1+z) log(1+z) + (1-z) log(1-z)) / 2 - z^2 / 2`` on ``[-1, 1]``.

    (``f'(z) = artanh(z) - z``, so ``z + f'(z) = v`` gives ``z = tanh(v)``; ``f'' = 1/(1-z^2) - 1 >= 0``.)
    """

    name = "tanh"

    def prox(self, v):
        return torch.tanh(v)

    def prox_(self, v):
        return v.tanh_()

    def value(self, z):
        return _bounded_value(z, -1.0, 1.0, lambda t: 0.5 * (_xlogx(1 + t) + _xlogx(1 - t)) - 0.5 * t * t)

    def derivative(self, v):
        return 1 - torch.tanh(v) ** 2

    def derivative_at_output(self, z):
        return 1 - z * z


class SigmoidProx(ProxActivation):
    """The shifted sigmoid ``sigmoid(v) - 1/2`` (slope <= 1/4) = prox of
    ``f(z) = p log p + (1-p) log(1-p) + log 2 - z^2 / 2`` with ``p = z + 1/2`` in ``[0, 1]``.

    (``f'(z) = logit(z + 1/2) - z``; shifted so that ``prox_f(0) = 0``, which an L1 prior needs.)
    """

    name = "sigmoid"

    def prox(self, v):
        return torch.sigmoid(v) - 0.5

    def prox_(self, v):
        return v.sigmoid_().sub_(0.5)

    def value(self, z):
        import math

        return _bounded_value(z, -0.5, 0.5, lambda t: _xlogx(t + 0.5) + _xlogx(0.5 - t) + math.log(2.0) - 0.5 * t * t)

    def derivative(self, v):
        s = torch.sigmoid(v)
        return s * (1 - s)

    def derivative_at_output(self, z):
        return 0.25 - z * z


class SoftsignProx(ProxActivation):
    """Softsign ``v / (1 + |v|)`` = prox of ``f(z) = -log(1 - |z|) - |z| - z^2 / 2`` on ``(-1, 1)``.

    (``f'(z) = z / (1 - |z|) - z`` is the inverse of softsign minus the identity.)
    """

    name = "softsign"

    def prox(self, v):
        return v / (1 + v.abs())

    def value(self, z):
        ok = z.abs() < 1
        a = torch.where(ok, z.abs(), torch.zeros_like(z))  # f is finite exactly on (-1, 1)
        return _per_sample_sum(-torch.log1p(-a) - a - 0.5 * a * a) + _indicator(ok).to(z.dtype)

    def derivative(self, v):
        return 1 / (1 + v.abs()) ** 2

    def derivative_at_output(self, z):
        return (1 - z.abs()) ** 2


# Gauss-Legendre nodes/weights on [0, 1] for the integral phi(v) = int_0^v sigma
_GL_NODES, _GL_WEIGHTS = (torch.as_tensor(a, dtype=torch.float64) for a in __import__("numpy").polynomial.legendre.leggauss(64))


class IncreasingProx(ProxActivation):
    """Any continuous non-decreasing ``sigma`` with slope ``<= 1`` as the prox of a convex ``f`` (numerically).

    Why it exists: ``sigma = grad phi`` with ``phi(v) = int_0^v sigma`` convex, and slope ``<= 1`` makes
    ``phi^* - |.|^2/2`` convex, so ``sigma = prox_f`` for

        f(z) = phi^*(z) - z^2 / 2 = z v - phi(v) - z^2 / 2,    v = sigma^{-1}(z)

    (Fenchel: ``sigma = grad (f + |.|^2/2)^*``). ``value`` computes ``v`` by bisection (float64, 200
    steps) and ``phi(v)`` by 64-point Gauss-Legendre quadrature; ``z`` outside the range of sigma on
    ``[-bracket, bracket]`` gets ``+inf`` (the range's boundary, where f may be finite, is treated as
    outside). Construction checks monotonicity and slope ``<= 1 + 1e-6`` on a grid of ``[-bracket, bracket]``
    (a grid check, not a proof). ``derivative`` uses autograd through ``sigma``.
    """

    def __init__(self, sigma: Callable[[torch.Tensor], torch.Tensor], *, name: str = "increasing", bracket: float = 50.0):
        if not callable(sigma):
            fail("sigma", "a callable tensor -> tensor", sigma, TypeError)
        self.sigma, self.name = sigma, name
        self.bracket = check_number("bracket", bracket, low=0.0, low_inclusive=False)
        grid = torch.linspace(-self.bracket, self.bracket, 20001, dtype=torch.float64)
        s = sigma(grid)
        if not bool(torch.isfinite(s).all()):
            fail("sigma", f"finite values on [-{bracket}, {bracket}]", "non-finite values")
        slope = torch.diff(s) / torch.diff(grid)
        if float(slope.min()) < -1e-12 or float(slope.max()) > 1 + 1e-6:
            fail("sigma", "a non-decreasing function with slope <= 1",
                 f"slopes in [{float(slope.min()):.4g}, {float(slope.max()):.4g}]")
        self.low_value, self.high_value = float(s[0]), float(s[-1])

    def prox(self, v):
        return self.sigma(v)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``sigma^{-1}(z)`` by bisection in float64 (the smallest preimage's bracket midpoint)."""
        lo = torch.full_like(z, -self.bracket, dtype=torch.float64)
        hi = torch.full_like(lo, self.bracket)
        zz = z.double()
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            below = self.sigma(mid) < zz
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def primitive(self, v: torch.Tensor) -> torch.Tensor:
        """``phi(v) = int_0^v sigma(s) ds`` (Gauss-Legendre, nodes mapped from [-1, 1] to [0, v])."""
        v = v.double()
        s = 0.5 * (_GL_NODES + 1)  # (64,) in [0, 1]
        vals = self.sigma(v.unsqueeze(-1) * s)  # (..., 64)
        return v * (vals * (0.5 * _GL_WEIGHTS)).sum(-1)

    def value(self, z):
        zz = z.double()
        ok = (zz > self.low_value) & (zz < self.high_value)
        v = self.inverse(zz.clamp(self.low_value, self.high_value))
        inside = zz * v - self.primitive(v) - 0.5 * zz * zz
        out = _per_sample_sum(torch.where(ok, inside, torch.zeros_like(zz))) + _indicator(ok).double()
        return out.to(z.dtype)

    def derivative(self, v):
        with torch.enable_grad():
            vv = v.detach().requires_grad_()
            return torch.autograd.grad(self.sigma(vv).sum(), vv)[0]

    def __repr__(self):
        return f"IncreasingProx(name={self.name!r})"


PROX_ACTIVATIONS: dict[str, Callable[..., ProxActivation]] = {
    "relu": ReLUProx,
    "soft_threshold": SoftThreshold,
    "box": BoxClamp,
    "identity": IdentityProx,
    "leaky_relu": LeakyReLUProx,
    "tanh": TanhProx,
    "sigmoid": SigmoidProx,
    "softsign": SoftsignProx,
}


def get_activation(spec: str | ProxActivation, **options) -> ProxActivation:
    """An activation from its registry name (with constructor options) or an instance (returned)."""
    if isinstance(spec, ProxActivation):
        if options:
            fail("options", "no options when an activation instance is given", sorted(options))
        return spec
    if spec not in PROX_ACTIVATIONS:
        fail("activation", f"one of {sorted(PROX_ACTIVATIONS)} or a ProxActivation", spec)
    return PROX_ACTIVATIONS[spec](**options)
