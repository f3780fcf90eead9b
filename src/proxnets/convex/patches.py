"""The patch pipeline of a convexified CNN, as batched torch operations.

An image ``x`` of shape ``(C, H, W)`` is read through its patches: with a patch size ``(kh, kw)``,
a stride ``s`` and a zero padding ``q``, patch ``j`` is the vector ``x_j`` in ``R^d``,
``d = C kh kw`` (``F.unfold`` order), at output position ``j`` of an ``(H', W')`` grid,
``H' = (H + 2q - kh) // s + 1``.

- :func:`extract_patches` -- ``(N, C, H, W) -> (N, H' W', d)``.
- :func:`contrast_normalize` -- per patch ``(x - mean(x) 1) / (|x - mean(x) 1|_2 + eps)``.
- :class:`ZCA` / :func:`fit_zca` -- whitening ``x -> W (x - mu)``, ``W = U (S + eps I)^{-1/2} U^T``
  from the patch covariance ``U S U^T``.
- :func:`pool_features` -- average pooling of per-position features ``(N, H' W', D)`` on the grid.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from proxnets.utils.validation import check_int, check_number, check_tensor, fail

__all__ = ["pair", "grid_shape", "extract_patches", "contrast_normalize", "ZCA", "fit_zca", "pool_features"]


def pair(name: str, v: int | tuple[int, int]) -> tuple[int, int]:
    """``v`` or ``(v, v)`` as a pair of positive integers."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        fail(name, "a positive integer or a pair of them", v)
    return check_int(f"{name}[0]", v[0], low=1), check_int(f"{name}[1]", v[1], low=1)


def grid_shape(image_hw: tuple[int, int], size: tuple[int, int], stride: int, padding: int) -> tuple[int, int]:
    """Output grid ``(H', W')`` of a sliding window; raises when the window does not fit."""
    h, w = image_hw[0] + 2 * padding, image_hw[1] + 2 * padding
    if size[0] > h or size[1] > w:
        fail("patch_size", f"a window no larger than the (padded) image {h}x{w}", size)
    return (h - size[0]) // stride + 1, (w - size[1]) // stride + 1


def extract_patches(
    images: torch.Tensor, size: int | tuple[int, int], stride: int = 1, padding: int = 0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Patches ``(N, H' W', C kh kw)`` of images ``(N, C, H, W)``.

    Without ``out`` a (non-contiguous) view of ``F.unfold``'s output; with ``out`` (contiguous, that
    shape) the patches are copied into it straight from a strided view of the images, with no
    intermediate: the same values (a copy, no arithmetic; tested against ``F.unfold``).
    """
    check_tensor("images", images, ndim=4)
    size = pair("patch_size", size)
    check_int("stride", stride, low=1)
    check_int("padding", padding, low=0)
    gh, gw = grid_shape(tuple(images.shape[-2:]), size, stride, padding)
    if out is None:
        cols = F.unfold(images, size, padding=padding, stride=stride)  # (N, d, H'W')
        return cols.transpose(1, 2)  # (N, H'W', d)
    n, c = images.shape[:2]
    if tuple(out.shape) != (n, gh * gw, c * size[0] * size[1]) or not out.is_contiguous():
        fail("out", f"a contiguous tensor of shape {(n, gh * gw, c * size[0] * size[1])}", f"shape {tuple(out.shape)}")
    x = F.pad(images, (padding,) * 4) if padding else images
    view = x.unfold(2, size[0], stride).unfold(3, size[1], stride)  # (N, C, H', W', kh, kw)
    out.view(n, gh, gw, c, size[0], size[1]).copy_(view.permute(0, 2, 3, 1, 4, 5))
    return out


def contrast_normalize(patches: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """``(x - mean(x)) / (|x - mean(x)|_2 + eps)`` over the last axis (eps keeps flat patches flat)."""
    check_number("eps", eps, low=0.0, low_inclusive=False)
    centered = patches - patches.mean(dim=-1, keepdim=True)
    return centered / (centered.norm(dim=-1, keepdim=True) + eps)


@dataclasses.dataclass
class ZCA:
    """Whitening ``x -> (x - mean) @ matrix`` (``matrix`` symmetric ``(d, d)``)."""

    mean: torch.Tensor  # (d,)
    matrix: torch.Tensor  # (d, d)

    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        return (patches - self.mean) @ self.matrix

    def to(self, device: torch.device | str) -> "ZCA":
        return ZCA(self.mean.to(device), self.matrix.to(device))


def fit_zca(patches: torch.Tensor, eps: float = 0.1) -> ZCA:
    """ZCA from patches ``(M, d)``: ``W = U diag(1 / sqrt(s + eps)) U^T`` of the covariance."""
    check_tensor("patches", patches, ndim=2)
    check_number("eps", eps, low=0.0, low_inclusive=False)
    if patches.shape[0] < 2:
        fail("patches", "at least 2 patches to estimate a covariance", f"shape {tuple(patches.shape)}")
    m, d = patches.shape
    mean = sum(patches[c : c + 4096].double().sum(0) for c in range(0, m, 4096)) / m
    cov = torch.zeros(d, d, dtype=torch.float64, device=patches.device)
    for c in range(0, m, 4096):  # in row chunks: no float64 copy of all patches
        xc = patches[c : c + 4096].double() - mean
        cov += xc.T @ xc
    cov /= m - 1  # (d, d)
    s, u = torch.linalg.eigh(cov)
    w = (u * (s.clamp_min(0) + eps).rsqrt()) @ u.T
    return ZCA(mean.to(patches.dtype), w.to(patches.dtype))


def pool_features(
    features: torch.Tensor, grid: tuple[int, int], size: int, stride: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Average pooling of ``(N, H' W', D)`` on the ``grid`` -> ``(N, P, D)``, ``P`` pooled positions.

    ``out``: a contiguous ``(N, P, D)`` tensor (e.g. a slice of a larger feature tensor) the pooled
    features are written into by the pooling kernel itself (no pooled temporary, no copy; the same
    kernel on the same input, so the same values)."""
    n, m, dim = features.shape
    if m != grid[0] * grid[1]:
        fail("features", f"{grid[0] * grid[1]} positions for grid {grid}", f"shape {tuple(features.shape)}")
    if size == 1 and stride == 1:
        return features if out is None else out.copy_(features)
    # (N, H', W', D) viewed as channels-last (N, D, H', W'): pooled without copying the input
    maps = features.reshape(n, grid[0], grid[1], dim).permute(0, 3, 1, 2)
    if out is None:
        pooled = F.avg_pool2d(maps, size, stride=stride)  # (N, D, Hp, Wp)
        return pooled.flatten(2).transpose(1, 2)  # (N, P, D)
    hp, wp = (grid[0] - size) // stride + 1, (grid[1] - size) // stride + 1
    if tuple(out.shape) != (n, hp * wp, dim) or not out.is_contiguous():
        fail("out", f"a contiguous tensor of shape {(n, hp * wp, dim)}", f"shape {tuple(out.shape)}")
    # out as (N, D, Hp, Wp) in channels-last strides, the layout avg_pool2d gives a channels-last input:
    # F.avg_pool2d's defaults (no padding, floor mode, padding counted, no divisor override)
    torch.ops.aten.avg_pool2d.out(maps, [size, size], [stride, stride], [0, 0], False, True, None,
                                  out=out.view(n, hp, wp, dim).permute(0, 3, 1, 2))
    return out
