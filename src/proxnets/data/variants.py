"""MNIST variants of Larochelle et al. (2007), built from any MNIST-like dataset.

- ``rot``: the digit rotated by an angle uniform in [0, 2 pi) (bilinear, zero fill).
- ``rand``: background of uniform noise in [0, 1].
- ``img``: background a random patch of a natural photograph (scikit-image's grayscale photos;
  the test split draws from photographs the training split never sees).
- ``img-rot``: rotation, then a photograph background.

Backgrounds are composited with the digit as alpha: ``out = x + (1 - x) * background``, so digit
pixels stay, background pixels become noise/photo, and anti-aliased edges blend. Deterministic
given ``seed``; train and test use independent streams.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from proxnets.data.dataset import ImageDataset
from proxnets.data.images import natural_images, random_patches
from proxnets.utils.validation import check_choice, check_tensor

__all__ = ["make_variant", "rotate", "VARIANT_NAMES"]

VARIANT_NAMES = ("rot", "rand", "img", "img-rot")
# photographs reserved for the test split's backgrounds
TEST_PHOTOS = ("brick", "coins", "clock")


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each image of ``x`` (N, C, H, W) by ``angles`` (N,) radians about its centre."""
    check_tensor("x", x, ndim=4, nonempty=True)
    check_tensor("angles", angles, shape=(x.shape[0],), like=x)
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


def _apply(x: torch.Tensor, variant: str, seed: int, photos: dict[str, torch.Tensor] | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if "rot" in variant:
        x = rotate(x, torch.rand(len(x), generator=g) * 2 * math.pi)
    if variant == "rand":
        bg = torch.rand(x.shape, generator=g)
    elif variant.startswith("img"):
        bg = random_patches(photos, x.shape[-1], len(x), seed=seed + 7)
        if bg.shape[1] != x.shape[1]:
            bg = bg.mean(1, keepdim=True).expand_as(x)
    else:
        return x
    return x + (1 - x) * bg


def make_variant(ds: ImageDataset, variant: str, seed: int = 0) -> ImageDataset:
    """Return ``ds`` transformed into ``variant`` (one of :data:`VARIANT_NAMES`)."""
    check_choice("variant", variant, VARIANT_NAMES)
    train_ph = test_ph = None
    if variant.startswith("img"):
        gray = natural_images(gray=True)
        train_ph = {k: v for k, v in gray.items() if k not in TEST_PHOTOS}
        test_ph = {k: v for k, v in gray.items() if k in TEST_PHOTOS}
    return dataclasses.replace(
        ds,
        name=f"{ds.name}-{variant}",
        x_train=_apply(ds.x_train, variant, seed * 2 + 1, train_ph),
        x_test=_apply(ds.x_test, variant, seed * 2 + 2, test_ph),
    )
