"""Lipschitz-safe glue between non-expansive blocks: every layer here is 1-Lipschitz (or has a
certified constant), so stacking them with blocks keeps the whole network's bound.

- :func:`lipschitz_conv2d`, :func:`lipschitz_linear`: lift / transition / projection layers with
  operator norm ``<= bound`` at their input size (:func:`constrain_operator_norm`).
- :class:`ScaledAvgPool2d`: ``k * avgpool_k`` (stride ``k``). Each output averages ``k^2`` disjoint
  inputs, so ``avgpool_k`` has norm ``1/k``; the scaled pooling has norm exactly 1.
- :class:`ScaledGlobalAvgPool`: ``sqrt(H W) * mean_{H,W}`` (norm 1; ``mean`` alone has ``1/sqrt(HW)``).
- :class:`ZeroChannelPad`: ``(B, C, H, W) -> (B, C', H, W)`` by zero channels (an isometry) and
  :class:`ChannelSelect` its adjoint (keep the first ``C`` channels; norm 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.stable.lipschitz import LipschitzBound
from proxnets.stable.norms import constrain_operator_norm
from proxnets.utils.validation import check_int

__all__ = ["lipschitz_conv2d", "lipschitz_linear", "ScaledAvgPool2d", "ScaledGlobalAvgPool", "ZeroChannelPad", "ChannelSelect"]


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


class _OneLipschitz(nn.Module):
    """A layer whose Lipschitz constant is 1 by construction (stated in its docstring)."""

    def lipschitz_constant(self, mode: str = "rigorous") -> LipschitzBound:
        return LipschitzBound(1.0, True, "1-Lipschitz by construction")


class ScaledAvgPool2d(_OneLipschitz):
    """``k * avg_pool2d(x, k)``: ``(B, C, H, W) -> (B, C, H // k, W // k)``, 1-Lipschitz."""

    def __init__(self, kernel_size: int = 2):
        super().__init__()
        self.kernel_size = check_int("kernel_size", kernel_size, low=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel_size * F.avg_pool2d(x, self.kernel_size)


class ScaledGlobalAvgPool(_OneLipschitz):
    """``sqrt(H W) * mean_{H, W}``: ``(B, C, H, W) -> (B, C)``, 1-Lipschitz."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * (x.shape[2] * x.shape[3]) ** 0.5


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
