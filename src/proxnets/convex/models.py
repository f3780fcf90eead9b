"""The back-propagation baseline of the same width: a two-layer CNN with ``r`` filters.

``x (N, C, H, W) -> conv k x k, r filters -> ReLU -> average pool -> linear -> (N, K)``: the
architecture CCNN convexifies (with ReLU in place of the kernel's nonlinearity). Its certificate
(:func:`proxnets.convex.certificate.lipschitz_certificate`) is a rigorous Lipschitz upper bound
compared with 1: the uncertified baseline, not expected to hold.
"""

from __future__ import annotations

import torch
from torch import nn

from proxnets.engine import TrainConfig, Trainable
from proxnets.utils.validation import check_int

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, *, width: int = 16, patch_size: int = 5,
                 pool_size: int = 2):
        super().__init__()
        c, h, w = input_shape
        self.input_shape = (int(c), int(h), int(w))  # the certificate's operator norms are at this size
        check_int("width", width, low=1)
        check_int("patch_size", patch_size, low=1, high=min(h, w))
        self.conv = nn.Conv2d(c, width, patch_size)
        self.pool = nn.AvgPool2d(pool_size)
        hp, wp = (h - patch_size + 1) // pool_size, (w - patch_size + 1) // pool_size
        self.head = nn.Linear(width * hp * wp, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.conv(x)))  # (N, r, Hp, Wp)
        return self.head(h.flatten(1))  # (N, K)


def small_cnn(input_shape, num_classes, **opts) -> Trainable:
    """``MODELS["convex-small-cnn"]``: the baseline with Adam, 10 epochs by default."""
    cfg = TrainConfig(epochs=opts.pop("epochs", 10), lr=opts.pop("lr", 1e-3), batch_size=opts.pop("batch_size", 64))
    from proxnets.convex.certificate import certificate

    return Trainable(model=SmallCNN(tuple(input_shape), num_classes, **opts), config=cfg,
                     certificate=lambda model, x: certificate(model, x))
