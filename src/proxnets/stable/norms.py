"""Operator norms of layers, on top of :mod:`proxnets.operators`, and the norm constraint.

The norm of a layer is that of the bias-free linear map it applies at its input size: for a
convolution ``A`` with its stride and zero padding on inputs ``(C, H, W)``,

    |A|_2 = max_{|v| = 1} |A v|,

estimated by the project's one power iteration (:func:`proxnets.operators.power_iteration`)
through :class:`proxnets.operators.OperatorNormEstimator` (persistent singular vector).

:class:`OperatorNorm` picks the mode from the module state:

- training: ``cheap`` -- one warm-started iteration per forward, differentiable in the weight;
- evaluation: ``exact`` -- iterated until the relative change is below ``tol`` (at most
  ``exact_iterations``), multiplied by ``safety`` (the power iterate is a lower bound converging from
  below; ``safety = 1.001`` covers the remaining gap at linear rates up to 0.999 per iteration),
  cached until the weight changes. If the exact norm shows
  that the last cheap estimate let the constraint be broken, a :class:`NormConstraintWarning`
  is issued (once per weight version).

:class:`OperatorNormConstraint` is a parametrization (``torch.nn.utils.parametrize``) that any
``nn.Conv2d`` / ``nn.Linear`` can carry: ``W -> W * s(W)`` with ``s = bound / |W|`` (``"normalize"``)
or ``s = min(1, bound / |W|)`` (``"clip"``), so that the layer's operator norm is at most ``bound``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from proxnets.operators import LinearOperator, OperatorNormEstimator, conv2d_operator, linear_operator, power_iteration
from proxnets.utils.validation import check_choice, check_number

__all__ = [
    "NormConstraintWarning",
    "OperatorNorm",
    "OperatorNormConstraint",
    "constrain_operator_norm",
    "constrained_scale",
    "fourier_upper_bound",
    "layer_operator",
]

KINDS = ("conv2d", "linear")
RESCALES = ("normalize", "clip")


class NormConstraintWarning(UserWarning):
    """The cheap (training) norm estimate was below the exact norm by enough to break a constraint."""


def layer_operator(kind: str, weight: torch.Tensor, in_shape: Sequence[int], stride: int = 1, padding: int = 0) -> LinearOperator:
    """The bias-free linear map of a conv2d (``in_shape = (C, H, W)``) or linear (``(d,)``) layer."""
    check_choice("kind", kind, KINDS)
    if kind == "conv2d":
        return conv2d_operator(weight, in_shape, stride=stride, padding=padding)
    return linear_operator(weight)


def fourier_upper_bound(weight: torch.Tensor, in_shape: Sequence[int], padding: int = 0) -> torch.Tensor:
    """A rigorous upper bound of ``|A|_2`` for a stride-1 zero-padded convolution on ``(C, H, W)``.

    ``A = R C E``: ``E`` embeds the input in the zero-padded grid ``(H + 2p) x (W + 2p)`` (an
    isometry), ``C`` is the circular convolution on that grid (no wrap-around reaches the outputs
    kept), ``R`` keeps the valid outputs (norm <= 1). ``C`` is block-diagonal in Fourier, so

        |A|_2 <= |C|_2 = max_omega sigma_max(K^(omega)),   K^(omega) the (C_out, C_in) kernel transform

    (Sedghi, Gupta & Long 2019), computed exactly by batched SVDs.
    """
    c, h, w = (int(v) for v in in_shape)
    kh, kw = weight.shape[-2:]
    n, m = max(h + 2 * padding, kh), max(w + 2 * padding, kw)
    spectrum = torch.fft.fft2(weight.detach().double(), s=(n, m))  # (C_out, C_in, n, m)
    return torch.linalg.matrix_norm(spectrum.permute(2, 3, 0, 1), ord=2).max().to(weight.dtype)


class OperatorNorm(nn.Module):
    """``|A|_2`` of a layer's weight at a fixed input size (cheap while training, exact in eval).

    ``forward(weight)`` returns a 0-d tensor: differentiable in ``weight`` during training,
    detached and cached in evaluation. ``exact(weight)`` forces the exact value.
    Buffers: ``cheap_sigma`` (last training estimate), ``exact_sigma`` (last exact value).
    """

    def __init__(
        self,
        kind: str,
        in_shape: Sequence[int],
        *,
        stride: int = 1,
        padding: int = 0,
        cheap_iterations: int = 1,
        exact_iterations: int = 500,
        tol: float = 1e-6,
        safety: float = 1.001,
    ):
        super().__init__()
        self.kind = check_choice("kind", kind, KINDS)
        self.in_shape = tuple(int(s) for s in in_shape)
        self.stride, self.padding = int(stride), int(padding)
        self.safety = check_number("safety", safety, low=1.0)
        self.estimator = OperatorNormEstimator(
            self.in_shape, cheap_iterations=cheap_iterations, exact_iterations=exact_iterations, tol=tol
        )
        self.register_buffer("cheap_sigma", torch.tensor(float("nan")))
        self.register_buffer("exact_sigma", torch.tensor(float("nan")))
        self._exact_key: tuple | None = None

    def operator(self, weight: torch.Tensor) -> LinearOperator:
        return layer_operator(self.kind, weight, self.in_shape, self.stride, self.padding)

    def cheap(self, weight: torch.Tensor) -> torch.Tensor:
        sigma = self.estimator(self.operator(weight), "cheap")
        self.cheap_sigma.copy_(sigma.detach())
        return sigma

    def exact(self, weight: torch.Tensor) -> torch.Tensor:
        # the parameter's version counter moves on every in-place optimizer update
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if key != self._exact_key or not torch.isfinite(self.exact_sigma):
            with torch.no_grad():
                sigma = self.estimator(self.operator(weight.detach()), "exact") * self.safety
            self.exact_sigma.copy_(sigma)
            self._exact_key = key
            self._checked = False
        return self.exact_sigma.clone()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.cheap(weight) if self.training else self.exact(weight)

    def warm(self, weight: torch.Tensor, iterations: int = 50) -> torch.Tensor:
        """A few warm-started iterations (at construction), so that cheap estimates start accurate."""
        sigma, v, _ = power_iteration(self.operator(weight.detach()), self.estimator.v, iterations=iterations, tol=1e-4)
        self.estimator.v.copy_(v.reshape(self.in_shape))
        return sigma

    def upper_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """A rigorous upper bound of ``|A|_2``: Fourier (stride-1 conv) or the exact SVD (linear)."""
        if self.kind == "linear":
            return torch.linalg.matrix_norm(weight.detach().double(), ord=2).to(weight.dtype)
        if self.stride != 1:
            raise NotImplementedError(f"stride: expected 1 for the Fourier upper bound, got {self.stride}")
        return fourier_upper_bound(weight, self.in_shape, self.padding)

    def cheap_was_low(self, rel_tol: float = 1e-3) -> bool:
        """True once per exact evaluation when ``cheap_sigma < exact_sigma / (1 + rel_tol)``."""
        if getattr(self, "_checked", True) or not torch.isfinite(self.cheap_sigma):
            return False
        self._checked = True
        return bool(self.cheap_sigma * (1 + rel_tol) * self.safety < self.exact_sigma)


def constrained_scale(sigma: torch.Tensor, bound: float, rescale: str) -> torch.Tensor:
    """``s`` with ``|s W| <= bound``: ``bound / sigma`` (normalize) or ``min(1, bound / sigma)`` (clip)."""
    s = bound / sigma.clamp_min(1e-12)
    return s if rescale == "normalize" else s.clamp(max=1.0)


class OperatorNormConstraint(nn.Module):
    """Parametrization ``W -> s(W) W`` with operator norm at most ``bound`` (see module docstring)."""

    def __init__(self, norm: OperatorNorm, bound: float = 1.0, rescale: str = "normalize"):
        super().__init__()
        self.norm = norm
        self.bound = check_number("bound", bound, low=0.0, low_inclusive=False)
        self.rescale = check_choice("rescale", rescale, RESCALES)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        sigma = self.norm(weight)
        if not self.training and self.norm.cheap_was_low():
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

    def lipschitz_constant(self, weight: torch.Tensor, mode: str = "exact") -> float:
        """``|s(W) W|_2`` from the exact (or last cheap) estimate of ``|W|_2``; ``mode="upper"``:
        the scale evaluation uses (exact) times the rigorous upper bound of ``|W|_2``."""
        check_choice("mode", mode, ("cheap", "exact", "upper"))
        if mode == "upper":
            scale = constrained_scale(self.norm.exact(weight), self.bound, self.rescale)
            return float(scale * self.norm.upper_bound(weight))
        sigma = self.norm.exact(weight) if mode == "exact" else self.norm.cheap_sigma
        if mode == "cheap" and not torch.isfinite(sigma):
            sigma = self.norm.cheap(weight).detach()
        return float(constrained_scale(sigma, self.bound, self.rescale) * sigma)


def constrain_operator_norm(
    module: nn.Module,
    in_shape: Sequence[int],
    *,
    bound: float = 1.0,
    rescale: str = "normalize",
    **norm_options,
) -> nn.Module:
    """Constrain ``|module|_2 <= bound`` at inputs of ``in_shape`` (in place; returns ``module``).

    ``module`` is an ``nn.Conv2d`` (``in_shape = (C, H, W)``, its stride and integer zero padding
    are used; ``groups = dilation = 1``) or an ``nn.Linear`` (``in_shape = (d,)``).
    """
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros":
            raise ValueError(f"module: expected a Conv2d with groups=1, dilation=1, zero padding, got {module}")
        if isinstance(module.padding, str) or module.padding[0] != module.padding[1] or module.stride[0] != module.stride[1]:
            raise ValueError(f"module: expected equal integer padding and stride on both axes, got {module}")
        if len(in_shape) != 3 or in_shape[0] != module.in_channels:
            raise ValueError(f"in_shape: expected (C={module.in_channels}, H, W), got {tuple(in_shape)}")
        norm = OperatorNorm("conv2d", in_shape, stride=module.stride[0], padding=module.padding[0], **norm_options)
    elif isinstance(module, nn.Linear):
        if tuple(in_shape) != (module.in_features,):
            raise ValueError(f"in_shape: expected ({module.in_features},), got {tuple(in_shape)}")
        norm = OperatorNorm("linear", in_shape, **norm_options)
    else:
        raise TypeError(f"module: expected nn.Conv2d or nn.Linear, got {type(module).__name__}")
    norm.to(module.weight.device)
    norm.warm(module.weight)
    parametrize.register_parametrization(module, "weight", OperatorNormConstraint(norm, bound, rescale))
    return module


def find_constraint(module: nn.Module) -> OperatorNormConstraint | None:
    """The :class:`OperatorNormConstraint` on ``module.weight``, if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, OperatorNormConstraint):
            return p
    return None
