"""Kernels on patches, exact (in chunks) or through an explicit finite feature map.

Kernels (``x, y`` in ``R^d``):

- ``rbf``:          ``k(x, y) = exp(-gamma |x - y|^2)``
- ``inverse_poly``: ``k(x, y) = 1 / (2 - <x, y>)``  (needs ``|x|, |y| < 1``, as after contrast
  normalization; the kernel of CCNN's theory)
- ``linear``:       ``k(x, y) = <x, y>``

:func:`kernel_matrix` evaluates ``K[i, j] = k(x_i, y_j)`` in row chunks, so that a caller that
reduces each chunk (e.g. a kernel-vector product, :func:`kernel_matvec`) never holds more than
``chunk * len(y)`` values.

Feature maps ``phi: R^d -> R^D`` with ``<phi(x), phi(y)> ~ k(x, y)``, acting on the last axis:

- :class:`RandomFourierFeatures` (rbf only): ``phi(x) = sqrt(2/D) cos(x @ W + b)``,
  ``W ~ N(0, 2 gamma I)``, ``b ~ U[0, 2 pi]``.
- :class:`NystromFeatures` (any kernel): ``phi(x) = k(x, L) K_LL^{-1/2}`` for ``m`` landmarks ``L``
  (pseudo-inverse square root; eigenvalues below ``1e-8 max`` dropped).
- :class:`LinearFeatures`: ``phi(x) = x``.

:func:`_cos_` (private) is the one cosine of every random-feature map (CCNN's cached features and DCCNN's
streamed ones alike): numpy's SIMD float32 cosine on CPU float32 tensors, within ``COS_ERROR`` of the
float64 cosine of the same input.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor, fail

__all__ = [
    "KERNELS",
    "kernel",
    "kernel_matrix",
    "kernel_matvec",
    "RandomFourierFeatures",
    "NystromFeatures",
    "LinearFeatures",
    "make_feature_map",
    "FEATURE_MAPS",
]

KERNELS = ("rbf", "inverse_poly", "linear")
FEATURE_MAPS = ("rff", "nystrom", "linear")


def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = (x * x).sum(-1, keepdim=True) - 2 * x @ y.T + (y * y).sum(-1)
    return d.clamp_min(0)


def kernel(name: str, gamma: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The kernel ``(x (a, d), y (b, d)) -> (a, b)`` named ``name`` (one of :data:`KERNELS`)."""
    check_choice("kernel", name, KERNELS)
    check_number("gamma", gamma, low=0.0, low_inclusive=False)
    if name == "rbf":
        return lambda x, y: torch.exp(-gamma * _sq_dists(x, y))
    if name == "inverse_poly":
        return lambda x, y: 1.0 / (2.0 - x @ y.T)
    return lambda x, y: x @ y.T


def kernel_matrix(name: str, x: torch.Tensor, y: torch.Tensor, *, gamma: float = 1.0, chunk: int = 4096) -> torch.Tensor:
    """Dense ``K[i, j] = k(x_i, y_j)``, computed ``chunk`` rows at a time."""
    check_tensor("x", x, ndim=2, nonempty=True)
    check_tensor("y", y, ndim=2, shape=(None, x.shape[1]), like=x)
    check_int("chunk", chunk, low=1)
    k = kernel(name, gamma)
    return torch.cat([k(x[i : i + chunk], y) for i in range(0, x.shape[0], chunk)], dim=0)


def kernel_matvec(
    name: str, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *, gamma: float = 1.0, chunk: int = 4096
) -> torch.Tensor:
    """``K(x, y) @ v`` without holding ``K``: memory ``chunk * len(y)``."""
    check_tensor("x", x, ndim=2, nonempty=True)
    check_tensor("y", y, ndim=2, shape=(None, x.shape[1]), like=x)
    check_tensor("v", v, ndim=(1, 2), like=x)
    if v.shape[0] != y.shape[0]:
        fail("v", f"{y.shape[0]} rows (one per y)", f"shape {tuple(v.shape)}")
    check_int("chunk", chunk, low=1)
    k = kernel(name, gamma)
    return torch.cat([k(x[i : i + chunk], y) @ v for i in range(0, x.shape[0], chunk)], dim=0)


COS_ERROR = 2.0**-23  # stated, tested (not proved) bound of |_cos_(x) - cos(x)|, cos in float64 of the same float32 x


def _cos_(x: torch.Tensor) -> torch.Tensor:
    """``x <- cos(x)`` in place; returns ``x``.

    A contiguous CPU float32 tensor goes through numpy's float32 cosine (SIMD where the CPU has it:
    measured 2.7x faster than ``torch.cos_`` on a ``(2304, 256)`` block, AVX-512), which is within
    ``COS_ERROR = 2^-23`` of the float64 cosine of the same input (tested on 6 million inputs in
    ``[-200, 200]``, measured 6.9e-8; torch's 3.6e-8; the random-feature arguments are ``O(10)``).
    It is elementwise and deterministic: an element's value does not depend on its position in the
    array (tested), so chunk and block sizes never change a feature. Anything else (other dtypes,
    devices, tensors that need gradients or are not contiguous) takes ``torch.cos_``. No certificate
    depends on this bound: the duality gaps are those of the program over the features computed here.

    Private, and without argument checks on purpose: it runs on every feature block of every pass, and its
    callers (:class:`RandomFourierFeatures`, :class:`~proxnets.convex.features.PatchFeaturizer`) check their
    own inputs before the block exists; those public callers are the fuzzed entry points.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and not x.requires_grad:
        a = x.numpy()
        np.cos(a, out=a)
        return x
    return x.cos_()


class RandomFourierFeatures(nn.Module):
    """``phi(x) = sqrt(2/D) cos(x @ weight + bias)``: ``E <phi(x), phi(y)> = exp(-gamma |x-y|^2)``."""

    def __init__(self, dim_in: int, dim_out: int, gamma: float, *, generator: torch.Generator | None = None):
        super().__init__()
        check_int("dim_in", dim_in, low=1)
        check_int("n_features", dim_out, low=1)
        check_number("gamma", gamma, low=0.0, low_inclusive=False)
        self.register_buffer("weight", torch.randn(dim_in, dim_out, generator=generator) * math.sqrt(2 * gamma))
        self.register_buffer("bias", torch.rand(dim_out, generator=generator) * 2 * math.pi)
        self.scale = math.sqrt(2.0 / dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., D)
        check_tensor("x", x, like=self.weight)
        if x.shape[-1] != self.weight.shape[0]:
            fail("x", f"a last dimension of {self.weight.shape[0]}", f"shape {tuple(x.shape)}")
        out = x @ self.weight
        if torch.is_grad_enabled() and x.requires_grad:
            return self.scale * torch.cos(out + self.bias)
        return _cos_(out.add_(self.bias)).mul_(self.scale)  # in place: one (..., D) buffer


class NystromFeatures(nn.Module):
    """``phi(x) = k(x, L) K_LL^{-1/2}``: exact kernel on the span of the landmarks ``L (m, d)``."""

    def __init__(self, landmarks: torch.Tensor, kernel_name: str, gamma: float = 1.0):
        super().__init__()
        check_tensor("landmarks", landmarks, ndim=2)
        self.kernel_name = check_choice("kernel", kernel_name, KERNELS)
        self.gamma = check_number("gamma", gamma, low=0.0, low_inclusive=False)
        kll = kernel_matrix(kernel_name, landmarks.double(), landmarks.double(), gamma=gamma)
        s, u = torch.linalg.eigh(kll)
        keep = s > 1e-8 * s.max().clamp_min(1e-300)
        root = u[:, keep] * s[keep].rsqrt()  # (m, D): K_LL^{-1/2} restricted to its range
        self.register_buffer("landmarks", landmarks.clone())
        self.register_buffer("root", root.to(landmarks.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., D)
        flat = x.reshape(-1, x.shape[-1])
        k = kernel(self.kernel_name, self.gamma)(flat, self.landmarks)  # (M, m)
        return (k @ self.root).reshape(*x.shape[:-1], self.root.shape[1])


class LinearFeatures(nn.Module):
    """``phi(x) = x``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def make_feature_map(
    feature_map: str,
    kernel_name: str,
    dim_in: int,
    n_features: int,
    gamma: float,
    sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """The feature map ``feature_map`` for ``kernel_name``; Nystrom draws landmarks from ``sample``."""
    check_choice("feature_map", feature_map, FEATURE_MAPS)
    check_choice("kernel", kernel_name, KERNELS)
    if feature_map == "linear" or kernel_name == "linear":
        if feature_map != "linear" or kernel_name != "linear":
            fail("feature_map", "'linear' exactly when kernel='linear'", f"{feature_map!r} with kernel {kernel_name!r}")
        return LinearFeatures()
    if feature_map == "rff":
        if kernel_name != "rbf":
            fail("feature_map", "'nystrom' for a kernel other than rbf (Fourier features need a shift-invariant kernel)",
                 f"'rff' with kernel {kernel_name!r}")
        return RandomFourierFeatures(dim_in, n_features, gamma, generator=generator)
    if sample is None or sample.shape[0] < 1:
        fail("sample", "patches to draw Nystrom landmarks from", sample)
    idx = torch.randperm(sample.shape[0], generator=generator)[:n_features]
    return NystromFeatures(sample[idx], kernel_name, gamma)
