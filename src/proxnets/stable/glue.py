"""Lipschitz-safe glue between non-expansive blocks: every layer here is 1-Lipschitz (or has a
certified constant), so stacking them with blocks keeps the whole network's bound.

- :func:`lipschitz_conv2d`, :func:`lipschitz_linear`: lift / transition / projection layers with
  operator norm ``<= bound`` at their input size (:func:`constrain_operator_norm`).
- :class:`ScaledAvgPool2d`: ``k * avgpool_k`` (stride ``k``). Each output averages ``k^2`` disjoint
  inputs, so ``avgpool_k`` has norm ``1/k``; the scaled pooling has norm exactly 1.
- :class:`SpaceToDepth`: ``k x k`` patches into channels, a permutation (orthogonal, norm exactly 1).
- :class:`ScaledGlobalAvgPool`: ``sqrt(H W) * mean_{H,W}`` (norm 1; ``mean`` alone has ``1/sqrt(HW)``).
- :func:`orthogonal_conv1x1`, :func:`orthogonal_linear`: lift / transition / head layers whose matrix is
  Bjorck-orthonormalized (every singular value pushed to 1, not only the largest capped): see
  :class:`BjorckOrthogonal`; their constant is the rigorous (dense SVD) norm of the weight in use.
- :class:`MaxMin`: ``(a, b) -> (max(a, b), min(a, b))`` on the two halves of the channels (GroupSort of size 2,
  Anil et al. 2019): a pointwise permutation of coordinate pairs, so 1-Lipschitz and gradient-norm preserving (its
  Jacobian is a permutation matrix almost everywhere). Not monotone: it belongs in the glue, never inside a block.
- :class:`PairReflection`: on the same channel pairs, a fold across a learned line ``n . (a, b) = c`` (a Householder
  activation with an offset); MaxMin at initialization, 1-Lipschitz for every angle and offset.
- :class:`ZeroChannelPad`: ``(B, C, H, W) -> (B, C', H, W)`` by zero channels (an isometry) and
  :class:`ChannelSelect` its adjoint (keep the first ``C`` channels; norm 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import math

import torch
import torch.nn.functional as F
from torch import nn

from torch.nn.utils import parametrize

from proxnets.norm_bounds import dense_norm_bound
from proxnets.operators import linear_operator
from proxnets.stable.lipschitz import LipschitzBound
from proxnets.stable.norms import constrain_operator_norm
from proxnets.utils.validation import check_int, check_tensor

__all__ = ["lipschitz_conv2d", "lipschitz_linear", "orthogonal_conv1x1", "orthogonal_linear", "BjorckOrthogonal", "ScaledAvgPool2d", "SpaceToDepth", "ScaledGlobalAvgPool", "MaxMin", "PairReflection", "ZeroChannelPad", "ChannelSelect"]


def lipschitz_conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    in_hw: Sequence[int],
    *,
    stride: int = 1,
    padding: int = 0,
    bias: bool = True,
    bound: float = 1.0,
    rescale: str = "normalize",
) -> nn.Conv2d:
    """An ``nn.Conv2d`` whose operator norm at inputs ``(in_channels, *in_hw)`` is ``<= bound``."""
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("kernel_size", kernel_size)):
        check_int(name, v, low=1)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
    return constrain_operator_norm(conv, (in_channels, *in_hw), bound=bound, rescale=rescale)


def lipschitz_linear(in_features: int, out_features: int, *, bias: bool = True, bound: float = 1.0, rescale: str = "normalize") -> nn.Linear:
    """An ``nn.Linear`` with spectral norm ``<= bound``."""
    check_int("in_features", in_features, low=1)
    check_int("out_features", out_features, low=1)
    return constrain_operator_norm(nn.Linear(in_features, out_features, bias=bias), (in_features,), bound=bound, rescale=rescale)


class BjorckOrthogonal(nn.Module):
    """Parametrization ``V -> W``: ``W_0 = V / |V|_F``, then ``iterations`` Bjorck steps

        W <- 3/2 W - 1/2 W W^T W          (on the matrix ``V.reshape(out, -1)``)

    Why the norm stays <= 1: every singular value ``s`` of ``W_0`` is in ``[0, 1]`` (``|V|_2 <= |V|_F``) and
    a step maps it to ``f(s) = (3 s - s^3) / 2``, increasing on ``[0, 1]`` with ``f(1) = 1``; so all singular values
    rise towards 1 and never pass it (in exact arithmetic; the certificate uses the rigorous SVD bound of the
    computed ``W``, which covers round-off). Small singular values grow by 3/2 per step, so ``iterations`` >= ~15
    orthonormalizes a matrix whose singular values spread over a few decades. Unlike a rescaling by the largest
    singular value, gradients keep their norm through the layer (all singular values near 1)."""

    def __init__(self, iterations: int = 15):
        super().__init__()
        self.iterations = check_int("iterations", iterations, low=0)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        m = v.reshape(v.shape[0], -1)  # (out, in)
        w = m / m.norm().clamp_min(1e-12)
        wide = w.shape[0] <= w.shape[1]
        for _ in range(self.iterations):  # the smaller Gram matrix: (out, out) or (in, in)
            w = 1.5 * w - 0.5 * ((w @ w.T) @ w if wide else w @ (w.T @ w))
        return w.reshape(v.shape)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w


class _OrthogonalMixin:
    """``lipschitz_constant``: the rigorous norm (float64 dense SVD with its margin) of the weight evaluation
    applies; for a 1x1 stride-1 convolution the operator norm at every image size is that of its matrix."""

    _cache: tuple | None = None

    def lipschitz_constant(self, mode: str = "rigorous") -> LipschitzBound:
        w = self.weight.detach().reshape(self.weight.shape[0], -1)  # (out, in)
        key = hash(w.cpu().contiguous().numpy().tobytes())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, dense_norm_bound(linear_operator(w.double())))
        nb = self._cache[1]
        if mode in ("rigorous", "upper"):
            return LipschitzBound(nb.value, nb.rigorous, f"Bjorck-orthonormal layer, |W| by {nb.method}", nb.why)
        return LipschitzBound(nb.details.get("estimate", nb.value), False, "SVD", why=f"mode {mode!r}: the SVD value without its margin")


class OrthogonalConv1x1(_OrthogonalMixin, nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` with a :class:`BjorckOrthogonal` weight."""


class OrthogonalLinear(_OrthogonalMixin, nn.Linear):
    """An ``nn.Linear`` with a :class:`BjorckOrthogonal` weight."""


def orthogonal_conv1x1(in_channels: int, out_channels: int, *, bias: bool = True, iterations: int = 15) -> nn.Conv2d:
    """A 1x1 convolution ``C_in -> C_out`` with Bjorck-orthonormal channel matrix (norm <= 1 at every size)."""
    check_int("in_channels", in_channels, low=1)
    check_int("out_channels", out_channels, low=1)
    conv = OrthogonalConv1x1(in_channels, out_channels, 1, bias=bias)
    parametrize.register_parametrization(conv, "weight", BjorckOrthogonal(iterations))
    return conv


def orthogonal_linear(in_features: int, out_features: int, *, bias: bool = True, iterations: int = 15) -> nn.Linear:
    """An ``nn.Linear`` with Bjorck-orthonormal weight (spectral norm <= 1)."""
    check_int("in_features", in_features, low=1)
    check_int("out_features", out_features, low=1)
    lin = OrthogonalLinear(in_features, out_features, bias=bias)
    parametrize.register_parametrization(lin, "weight", BjorckOrthogonal(iterations))
    return lin


class _OneLipschitz(nn.Module):
    """A layer whose Lipschitz constant is 1 by construction (stated in its docstring)."""

    def lipschitz_constant(self, mode: str = "rigorous") -> LipschitzBound:
        return LipschitzBound(1.0, True, "1-Lipschitz by construction")


class ScaledAvgPool2d(_OneLipschitz):
    """``k * avg_pool2d(x, k)``: ``(B, C, H, W) -> (B, C, H // k, W // k)``, 1-Lipschitz.

    ``pad=True``: zero rows / columns are first appended up to a multiple of ``k``, so ``(B, C, H, W) -> (B, C,
    ceil(H / k), ceil(W / k))`` and no input is dropped. Still 1-Lipschitz: the zero padding is an isometry and every
    window still averages ``k^2`` entries (padded zeros included). (``avg_pool2d(ceil_mode=True)`` would divide a
    clipped border window by fewer entries: ``k`` times one entry, norm ``k``; that is why the padding is explicit.)"""

    def __init__(self, kernel_size: int = 2, pad: bool = False):
        super().__init__()
        self.kernel_size = check_int("kernel_size", kernel_size, low=1)
        self.pad = bool(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        check_tensor("x", x, ndim=4, finite=False)  # shapes only (NaN propagates elementwise)
        if self.pad:
            x = F.pad(x, (0, -x.shape[-1] % k, 0, -x.shape[-2] % k))  # (B, C, k ceil(H / k), k ceil(W / k))
        return k * F.avg_pool2d(x, k)


class SpaceToDepth(_OneLipschitz):
    """``(B, C, H, W) -> (B, C k^2, H / k, W / k)``: each ``k x k`` patch moved into channels (``pixel_unshuffle``).

    A permutation of the coordinates: orthogonal, so exactly 1-Lipschitz and invertible (an invertible downsampling
    that loses nothing, unlike pooling). ``H`` and ``W`` must be multiples of ``k``."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = check_int("factor", factor, low=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.factor
        check_tensor("x", x, ndim=4, finite=False)  # shapes only (a permutation: NaN propagates)
        if x.shape[-1] % k or x.shape[-2] % k:
            raise ValueError(f"x: expected (B, C, H, W) with H and W multiples of {k}, got shape {tuple(x.shape)}")
        return F.pixel_unshuffle(x, k)


class ScaledGlobalAvgPool(_OneLipschitz):
    """``sqrt(H W) * mean_{H, W}``: ``(B, C, H, W) -> (B, C)``, 1-Lipschitz."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * (x.shape[2] * x.shape[3]) ** 0.5


class MaxMin(_OneLipschitz):
    """``(B, 2m, ...) -> (B, 2m, ...)``: channels ``[:m]`` get ``max(x[:m], x[m:])``, channels ``[m:]`` the ``min``.

    Why 1-Lipschitz: per position and pair ``(a, b) -> (max, min)`` is either the identity or the swap, and
    ``|max(a, b) - max(c, d)|^2 + |min(a, b) - min(c, d)|^2 <= |a - c|^2 + |b - d|^2`` (sorting two numbers never
    increases the distance between pairs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % 2:
            raise ValueError(f"x: expected an even number of channels for MaxMin, got {x.shape[1]}")
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class PairReflection(_OneLipschitz):
    """``(B, 2m, ...) -> (B, 2m, ...)``: per channel pair ``x = (a, b) = (x[:, j], x[:, m + j])`` (the halves of MaxMin), a
    fold across the line ``n . x = c`` with the learned unit normal ``n = (cos theta_j, sin theta_j)`` and offset ``c_j``:

        f(x) = x                          if n . x >= c
        f(x) = x - 2 (n . x - c) n        otherwise (the mirror image across the line)

    ``theta`` and ``c`` are shared over the positions (``2m`` parameters). This is the Householder activation of Singla,
    Singla & Feizi (ICLR 2022) on pairs, with an offset that moves the fold off the origin.

    Why 1-Lipschitz, for every ``theta`` and ``c``: the half-planes ``H+ = {n . x >= c}`` and ``H- = {n . x <= c}`` are
    convex and cover the plane; on ``H+`` the map is the identity, on ``H-`` the affine reflection ``R`` (an isometry), and
    both agree on the line (``R`` fixes it), so ``f`` is continuous. For ``x, y`` in one piece ``|f(x) - f(y)| = |x - y|``;
    for ``x`` in ``H+``, ``y`` in ``H-`` the segment ``[x, y]`` meets the line at some ``z``, and ``|f(x) - f(y)| <=
    |f(x) - f(z)| + |f(z) - f(y)| = |x - z| + |z - y| = |x - y|``. Summing the squared pair distances over pairs and
    positions gives the l2 bound 1 of the whole layer. The Jacobian is the identity or a reflection (orthogonal) almost
    everywhere, so gradient norms are kept, as with MaxMin.

    Initialization ``theta = -pi/4``, ``c = 0``: ``n = (1, -1) / sqrt 2``, ``n . x >= 0`` iff ``a >= b``, and the reflection
    swaps ``a`` and ``b``: exactly :class:`MaxMin` (the map starts as MaxMin and learns where to fold).

    A hot-path map: shapes are checked, values are not (NaN and inf propagate elementwise)."""

    def __init__(self, channels: int):
        super().__init__()
        check_int("channels", channels, low=2)
        if channels % 2:
            raise ValueError(f"channels: expected an even number of channels for PairReflection, got {channels}")
        self.channels = channels
        self.theta = nn.Parameter(torch.full((channels // 2,), -math.pi / 4))
        self.offset = nn.Parameter(torch.zeros(channels // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, finite=False, like=self)  # type, dtype and device only (values propagate)
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise ValueError(f"x: expected (B, {self.channels}, ...) for PairReflection({self.channels}), got shape {tuple(x.shape)}")
        a, b = x.chunk(2, dim=1)
        view = (1, self.channels // 2) + (1,) * (x.ndim - 2)  # broadcast over the batch and the positions
        ca, sa, c = self.theta.cos().view(view), self.theta.sin().view(view), self.offset.view(view)
        t = 2 * (ca * a + sa * b - c).clamp(max=0)  # 2 (n . x - c) on the folded side, 0 on the kept side
        return torch.cat([a - t * ca, b - t * sa], dim=1)


class ZeroChannelPad(_OneLipschitz):
    """``(B, C, H, W) -> (B, out_channels, H, W)``: append zero channels (an isometry)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = check_int("out_channels", out_channels, low=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.out_channels - x.shape[1]
        if extra < 0:
            raise ValueError(f"x: expected at most {self.out_channels} channels, got {x.shape[1]}")
        return F.pad(x, (0, 0, 0, 0, 0, extra))


class ChannelSelect(_OneLipschitz):
    """``(B, C', H, W) -> (B, channels, H, W)``: keep the first channels (adjoint of the zero pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = check_int("channels", channels, low=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.channels]
