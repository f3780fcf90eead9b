"""One operator-norm constraint, on the true operator of a layer at its input size.

The norm of a layer is that of the bias-free linear map it applies at its input size: for a
convolution ``A`` with its stride, dilation, groups and zero padding on inputs ``(C, H, W)``,
``|A|_2 = max_{|v| = 1} |A v|`` (not the norm of the reshaped kernel); for ``nn.Linear`` the matrix.

:class:`OperatorNormConstraint` is a parametrization (``torch.nn.utils.parametrize``) that any
``nn.Conv2d`` / ``nn.Linear`` can carry:

    W = V * s(V),   s = bound / sigma(V)             (rescale="normalize")
                    s = min(1, bound / sigma(V))     (rescale="clip")

``sigma`` comes from :class:`OperatorNorm` (power iteration with a persistent singular vector,
:mod:`proxnets.operators`):

- training: ``cheap_iterations`` warm-started iterations per forward, differentiable in ``V``
  (vector detached, the spectral-normalization trick); with ``fresh_restart`` as many iterations
  from a fresh random vector as well, keeping the larger estimate (clustered top singular values:
  a warm vector alone can miss a growing direction).
- evaluation ``"exact"``: iterated to ``tol`` from the persistent vector and from a fresh random
  one (the larger kept), times ``safety``, cached until the weight changes. If it shows that the
  last cheap estimate let the constraint be broken, a :class:`NormConstraintWarning` is issued.
- evaluation ``"frozen"``: ``|A v|`` with the frozen persistent vector (deterministic, cheap;
  :meth:`OperatorNorm.refresh` converges the vector).

Both are *estimates* (a power iterate is a lower bound of ``|A|_2``). What the constraint
certifies comes from :func:`proxnets.norm_bounds.norm_bound`: :meth:`OperatorNormConstraint.certified_norm`
returns ``s(V) * U(V)`` with ``U(V) >= |A_V|_2`` proved, plus a bound of what rounding ``s V`` to the weight's
dtype can add (:func:`rounding_allowance`), and says whether it is rigorous.

Used by the stable blocks and glue (:mod:`proxnets.stable.norms` re-exports) and by OptEq
(:mod:`proxnets.equilibrium.parametrize`: ``operator_norm_bound`` is ``constrain_operator_norm``
with ``rescale="clip"``, ``evaluation="frozen"``, ``fresh_restart=True``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from proxnets.norm_bounds import NormBound, norm_bound
from proxnets.operators import LinearOperator, OperatorNormEstimator, conv2d_operator, linear_operator, power_iteration
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor, fail

__all__ = [
    "KINDS",
    "RESCALES",
    "EVALUATIONS",
    "NormConstraintWarning",
    "OperatorNorm",
    "OperatorNormConstraint",
    "constrain_operator_norm",
    "constrained_scale",
    "find_constraint",
    "rounding_allowance",
    "layer_operator",
    "module_operator",
]

KINDS = ("conv2d", "linear")
RESCALES = ("normalize", "clip")
EVALUATIONS = ("exact", "frozen")


class NormConstraintWarning(UserWarning):
    """The cheap (training) norm estimate was below the exact norm by enough to break a constraint."""


def layer_operator(
    kind: str, weight: torch.Tensor, in_shape: Sequence[int], stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1
) -> LinearOperator:
    """The bias-free linear map of a conv2d (``in_shape = (C, H, W)``) or linear (``(d,)``) layer."""
    check_choice("kind", kind, KINDS)
    if kind == "conv2d":
        return conv2d_operator(weight, in_shape, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return linear_operator(weight)


def _square(name: str, value) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
        return int(value[0])
    fail(name, "an int or an equal pair of ints", value)


def _module_spec(module: nn.Module, in_shape: Sequence[int] | None) -> tuple[dict, tuple[int, ...]]:
    """``(spec, in_shape)`` of the operator ``module`` applies (no reference to the module itself)."""
    if isinstance(module, nn.Linear):
        if in_shape is not None and tuple(int(s) for s in in_shape) != (module.in_features,):
            fail("in_shape", f"({module.in_features},)", tuple(in_shape))
        return {"kind": "linear"}, (module.in_features,)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            fail("padding_mode", "'zeros' (the adjoint is a transposed convolution)", module.padding_mode)
        if in_shape is None or len(in_shape) != 3 or int(in_shape[0]) != module.in_channels:
            fail("in_shape", f"(C={module.in_channels}, H, W), the convolution's input size", in_shape)
        spec = {
            "kind": "conv2d",
            "stride": _square("stride", module.stride),
            "padding": _square("padding", module.padding),
            "dilation": _square("dilation", module.dilation),
            "groups": module.groups,
        }
        return spec, tuple(int(s) for s in in_shape)
    fail("module", "an nn.Linear or nn.Conv2d", type(module).__name__, TypeError)


def module_operator(module: nn.Module, weight: torch.Tensor, in_shape: Sequence[int] | None = None) -> LinearOperator:
    """The operator ``module`` applies with ``weight`` (bias excluded); ``in_shape`` for convolutions."""
    spec, shape = _module_spec(module, in_shape)
    return layer_operator(weight=weight, in_shape=shape, **spec)


class OperatorNorm(nn.Module):
    """``sigma(V)``, an estimate of ``|A_V|_2`` at a fixed input size, and its rigorous bound.

    ``forward(weight)``: the training estimate (differentiable) or the evaluation one (``exact``:
    converged and cached; ``frozen``: the frozen vector). :meth:`upper_bound` gives a
    :class:`~proxnets.norm_bounds.NormBound` (rigorous when a proved method is affordable), cached per
    weight version. Buffers: ``estimator.v``, ``cheap_sigma`` (last training estimate),
    ``exact_sigma`` (last exact value, safety factor included).
    """

    def __init__(
        self,
        kind: str,
        in_shape: Sequence[int],
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        cheap_iterations: int = 1,
        exact_iterations: int = 500,
        tol: float = 1e-6,
        safety: float = 1.001,
        fresh_restart: bool = False,
        evaluation: str = "exact",
        bound_options: dict | None = None,
    ):
        super().__init__()
        self.kind = check_choice("kind", kind, KINDS)
        self.in_shape = tuple(int(s) for s in in_shape)
        self.stride, self.padding, self.dilation, self.groups = int(stride), int(padding), int(dilation), int(groups)
        self.safety = check_number("safety", safety, low=1.0)
        self.fresh_restart = bool(fresh_restart)
        self.evaluation = check_choice("evaluation", evaluation, EVALUATIONS)
        self.bound_options = dict(bound_options or {})
        self.estimator = OperatorNormEstimator(
            self.in_shape, cheap_iterations=cheap_iterations, exact_iterations=exact_iterations, tol=tol
        )
        self.register_buffer("cheap_sigma", torch.tensor(float("nan")))
        self.register_buffer("exact_sigma", torch.tensor(float("nan")))
        self._exact_key: tuple | None = None
        self._bound_cache: tuple[tuple, NormBound] | None = None
        self.exact_converged: bool | None = None
        self._generator = torch.Generator().manual_seed(0)

    def operator(self, weight: torch.Tensor) -> LinearOperator:
        return layer_operator(self.kind, weight, self.in_shape, self.stride, self.padding, self.dilation, self.groups)

    @staticmethod
    def _key(weight: torch.Tensor) -> tuple:
        # by content: a parametrized weight is a fresh tensor at every access, and a freed address can
        # be reused by another weight with the same version counter
        w = weight.detach()
        return (tuple(w.shape), w.dtype, hash(w.cpu().contiguous().numpy().tobytes()))

    def cheap(self, weight: torch.Tensor) -> torch.Tensor:
        """Training estimate (lower estimate, differentiable in ``weight``); updates the vector."""
        op = self.operator(weight)
        sigma = self.estimator(op, "cheap")
        if self.fresh_restart:
            _, v, _ = power_iteration(op, None, iterations=self.estimator.cheap_iterations, generator=self._generator)
            sigma_fresh = op.forward(v).norm()
            if sigma_fresh > sigma:
                with torch.no_grad():
                    self.estimator.v.copy_(v.reshape(self.in_shape))
                sigma = sigma_fresh
        self.cheap_sigma.copy_(sigma.detach())
        return sigma

    def frozen(self, weight: torch.Tensor) -> torch.Tensor:
        """``|A v|`` with the frozen persistent vector (deterministic; differentiable in ``weight``)."""
        return self.operator(weight).forward(self.estimator.v.to(weight.dtype)).norm()

    def exact(self, weight: torch.Tensor) -> torch.Tensor:
        """Converged estimate (persistent and fresh start, the larger kept) times ``safety``, cached."""
        key = self._key(weight)
        if key != self._exact_key or not torch.isfinite(self.exact_sigma):
            with torch.no_grad():
                sigma = self.refresh(weight)
            self.exact_sigma.copy_(sigma * self.safety)
            self._exact_key = key
            self._checked = False
        return self.exact_sigma.clone()

    def refresh(self, weight: torch.Tensor) -> torch.Tensor:
        """Run the power iteration to convergence (warm and fresh start); returns the estimate (no safety)."""
        with torch.no_grad():
            op = self.operator(weight.detach())
            sigma = self.estimator(op, "exact")
            info = self.estimator.last_info
            s2, v2, info2 = power_iteration(op, None, iterations=self.estimator.exact_iterations, tol=self.estimator.tol,
                                            generator=torch.Generator().manual_seed(1))
            if float(s2) > float(sigma):
                self.estimator.v.copy_(v2.reshape(self.in_shape))
                sigma, info = op.forward(v2).norm(), info2
            self.exact_converged = bool(info.converged) if info is not None else None
        return sigma

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.cheap(weight)
        return self.exact(weight) if self.evaluation == "exact" else self.frozen(weight)

    def warm(self, weight: torch.Tensor, iterations: int = 50, tol: float = 1e-4) -> torch.Tensor:
        """Warm-started iterations (at construction), so that cheap estimates start accurate."""
        sigma, v, _ = power_iteration(self.operator(weight.detach()), self.estimator.v, iterations=iterations, tol=tol)
        self.estimator.v.copy_(v.reshape(self.in_shape))
        return sigma

    def upper_bound(self, weight: torch.Tensor, method: str = "auto") -> NormBound:
        """A bound of ``|A|_2`` from :func:`proxnets.norm_bounds.norm_bound` (rigorous when affordable), cached."""
        key = (self._key(weight), method)
        if self._bound_cache is None or self._bound_cache[0] != key:
            self._bound_cache = (key, norm_bound(self.operator(weight.detach()), method=method, **self.bound_options))
        return self._bound_cache[1]

    def cheap_was_low(self, rel_tol: float = 1e-3) -> bool:
        """True once per exact evaluation when ``cheap_sigma < exact_sigma / (1 + rel_tol)``."""
        if getattr(self, "_checked", True) or not torch.isfinite(self.cheap_sigma):
            return False
        self._checked = True
        return bool(self.cheap_sigma * (1 + rel_tol) * self.safety < self.exact_sigma)


def rounding_allowance(weight: torch.Tensor, scale: float) -> float:
    """A bound of ``|A_{fl(s V)} - A_{s V}|_2``: the norm the rounding of the product ``s V`` in ``V``'s dtype can add.

    Why it holds: ``fl(s V) = s V (1 + delta) + eta`` elementwise with ``|delta| <= u`` (unit round-off) and
    ``|eta| <= eta_min`` (subnormal spacing), so ``E = fl(s V) - s V`` has ``|E_k| <= u |s V_k| + eta_min``. Every entry
    of the matrix of a linear map or convolution (any stride, padding, dilation, groups) is one kernel entry or 0
    (a circular wrap: a sum of entries), so its rows sum at most ``R = max_o sum |E[o, ...]|`` and its columns at most
    ``C = max_j sum_o |E[o, j, ...]|``, and ``|A_E|_2 <= sqrt(R C)`` (Schur's test: ``|M|_2^2 <= |M|_1 |M|_inf``). The
    sums are taken in float64 of the float32 magnitudes and enlarged by ``(1 + 1e-12)``, far above their round-off."""
    check_tensor("weight", weight, ndim=(2, 3, 4))
    scale = check_number("scale", scale, low=0.0)
    w = weight.detach().double().reshape(weight.shape[0], weight.shape[1], -1)  # (out, in per group, taps)
    fin = torch.finfo(weight.dtype)
    err = w.abs() * (scale * fin.eps / 2) + fin.tiny * fin.eps  # per entry: u |s V| + subnormal spacing
    rows = float(err.sum(dim=(1, 2)).max())
    cols = float(err.sum(dim=(0, 2)).max())
    return math.sqrt(rows * cols) * (1 + 1e-12)


def constrained_scale(sigma: torch.Tensor, bound: float, rescale: str) -> torch.Tensor:
    """``s`` with ``|s W| <= bound``: ``bound / sigma`` (normalize) or ``min(1, bound / sigma)`` (clip)."""
    s = bound / sigma.clamp_min(1e-12)
    return s if rescale == "normalize" else s.clamp(max=1.0)


class OperatorNormConstraint(nn.Module):
    """Parametrization ``V -> s(V) V`` with operator norm at most ``bound`` (see the module docstring)."""

    def __init__(self, norm: OperatorNorm, bound: float = 1.0, rescale: str = "normalize"):
        super().__init__()
        self.norm = norm
        self.bound = check_number("bound", bound, low=0.0, low_inclusive=False)
        self.rescale = check_choice("rescale", rescale, RESCALES)

    # names kept from OptEq's former ``OperatorNormBound``
    @property
    def target(self) -> float:
        return self.bound

    @property
    def estimator(self) -> OperatorNormEstimator:
        return self.norm.estimator

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.norm.in_shape

    def _operator(self, weight: torch.Tensor) -> LinearOperator:
        return self.norm.operator(weight)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """The estimate the forward uses (training: cheap; evaluation: exact or frozen)."""
        return self.norm(weight)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        sigma = self.norm(weight)
        if not self.training and self.norm.evaluation == "exact" and self.norm.cheap_was_low():
            # the norm the training forward had, measured without the safety factor
            cheap_norm = float(constrained_scale(self.norm.cheap_sigma, self.bound, self.rescale) * sigma / self.norm.safety)
            if cheap_norm > self.bound * (1 + 1e-3):
                warnings.warn(
                    f"operator norm: the cheap training estimate {float(self.norm.cheap_sigma):.4g} is below the exact "
                    f"norm {float(sigma) / self.norm.safety:.4g}; with it the layer's norm was {cheap_norm:.4g} > bound {self.bound:.4g}. "
                    "Evaluation uses the exact norm.",
                    NormConstraintWarning,
                    stacklevel=2,
                )
        return weight * constrained_scale(sigma, self.bound, self.rescale)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # any V with |A_V|_2 <= bound is (for clip) its own preimage; forward rescales the others
        return weight

    def eval_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """``s(V)`` as evaluation computes it."""
        with torch.no_grad():
            sigma = self.norm.exact(weight) if self.norm.evaluation == "exact" else self.norm.frozen(weight)
        return constrained_scale(sigma, self.bound, self.rescale)

    def certified_norm(self, weight: torch.Tensor, method: str = "auto") -> NormBound:
        """A bound of the norm of the weight evaluation applies, ``W = fl(s V)`` (the product rounded in ``V``'s dtype):

            |A_W|_2 <= s U(V) + rounding(s, V),

        ``U(V) >= |A_V|_2`` from :meth:`OperatorNorm.upper_bound` and ``rounding`` from :func:`rounding_allowance`
        (``s U(V)`` alone can be ~1e-7 relative short of ``|A_W|`` in float32); the sum is rounded upwards."""
        scale_t = self.eval_scale(weight)
        scale = float(scale_t)
        u = self.norm.upper_bound(weight, method)
        extra = 0.0 if scale == 1.0 else rounding_allowance(weight.detach(), scale)
        value = math.nextafter(math.nextafter(scale * u.value, math.inf) + extra, math.inf)
        details = {**u.details, "scale": scale, "norm_of_V": u.value, "rounding": extra,
                   "estimate_converged": self.norm.exact_converged}
        return dataclasses.replace(u, value=value, details=details)

    def lower_estimate(self, weight: torch.Tensor) -> float:
        """``|A_W v| / |v|`` for the applied weight ``W`` (as evaluation computes it) and the converged persistent vector
        ``v``, in float64: a lower estimate of ``|A_W|_2`` (never a bound; :meth:`certified_norm` is the bound)."""
        with torch.no_grad():
            self.eval_scale(weight)  # converges the persistent vector (cached per weight)
            w = weight.detach() * self.eval_scale(weight)  # the applied weight, rounded as evaluation rounds it
            op = self.norm.operator(w.double())
            v = self.norm.estimator.v.detach().double().reshape(op.in_shape)
            nv = float(v.norm())
            return float(op.forward(v).norm()) / nv if nv > 0 and math.isfinite(nv) else 0.0

    def lipschitz_constant(self, weight: torch.Tensor, mode: str = "rigorous") -> float:
        """``|s(V) V|_2``: ``"rigorous"`` (alias ``"upper"``): :meth:`certified_norm`; ``"estimate"`` (alias
        ``"exact"``): :meth:`lower_estimate` of the applied weight; ``"cheap"``: from the last training estimate."""
        check_choice("mode", mode, ("cheap", "exact", "estimate", "upper", "rigorous"))
        if mode in ("upper", "rigorous"):
            return self.certified_norm(weight).value
        if mode in ("exact", "estimate"):
            return self.lower_estimate(weight)
        sigma = self.norm.cheap_sigma
        if not torch.isfinite(sigma):
            sigma = self.norm.cheap(weight).detach()
        return float(constrained_scale(sigma, self.bound, self.rescale) * sigma)


def constrain_operator_norm(
    module: nn.Module,
    in_shape: Sequence[int] | None = None,
    *,
    bound: float = 1.0,
    rescale: str = "normalize",
    evaluation: str = "exact",
    name: str = "weight",
    warm_iterations: int = 50,
    warm_tol: float = 1e-4,
    **norm_options,
) -> nn.Module:
    """Constrain ``|A_W|_2 <= bound`` on ``module.<name>`` at inputs of ``in_shape`` (in place; returns ``module``).

    ``module`` is an ``nn.Conv2d`` (``in_shape = (C, H, W)`` required; its stride, dilation, groups and
    integer zero padding are used) or an ``nn.Linear`` (``in_shape = (d,)`` or ``None``).
    ``norm_options`` go to :class:`OperatorNorm`. Removal: ``parametrize.remove_parametrizations``.
    """
    if not hasattr(module, name) or not isinstance(getattr(module, name), torch.Tensor):
        fail("name", f"the name of a tensor attribute of {type(module).__name__}", name)
    check_int("warm_iterations", warm_iterations, low=1)
    spec, shape = _module_spec(module, in_shape)
    norm = OperatorNorm(spec.pop("kind"), shape, evaluation=evaluation, **spec, **norm_options)
    weight = getattr(module, name)
    norm.to(device=weight.device)
    with torch.no_grad():
        norm.estimator.v.copy_(norm.estimator.v.to(weight.dtype))
    norm.warm(weight, iterations=warm_iterations, tol=warm_tol)
    parametrize.register_parametrization(module, name, OperatorNormConstraint(norm, bound, rescale))
    return module


def find_constraint(module: nn.Module, name: str = "weight") -> OperatorNormConstraint | None:
    """The :class:`OperatorNormConstraint` on ``module.<name>``, if any."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in getattr(module.parametrizations, name):
        if isinstance(p, OperatorNormConstraint):
            return p
    return None
