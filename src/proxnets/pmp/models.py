"""Reference CNNs for bSQH experiments (ReLU and max-pooling: a discrete control system).

``LeNet5``: the classic layout for 28x28 inputs (LeCun et al. 1998, with ReLU and max-pooling):
conv 5x5 (6, pad 2) -> pool -> conv 5x5 (16) -> pool -> fc 120 -> fc 84 -> fc classes; 61.7k
parameters for MNIST. ``SmallLeNet5``: a narrower version for fast tests.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.utils.validation import check_tensor

__all__ = ["LeNet5", "MaxPool2x2", "SmallLeNet5"]


class MaxPool2x2(nn.Module):
    """2x2 max-pooling, stride 2 (``nn.MaxPool2d(2)``), with a faster path when no gradient is needed.

    Without autograd (bSQH's trial forward, evaluation) the maximum of the four strided views
    ``x[..., i::2, j::2]`` is taken: the same values bit for bit (a maximum is exact; odd trailing
    rows/columns are dropped as ``max_pool2d`` does), ~10x faster than ``max_pool2d`` on this CPU,
    which also computes the indices for a backward pass. With autograd: ``F.max_pool2d``. A contiguous
    input of even height and width is reduced in two passes instead, first over row pairs (the two
    halves of ``x.view(..., H/2, 2W)``: contiguous rows, one vectorized pass), then over adjacent column
    pairs of that half-height result: the same maximum of the same four values. On LeNet-5's
    activations (one thread) it takes 86 / 41 us where columns first took 149 / 57 us (64x6x28x28 /
    64x16x10x10) and the four strided views ~1.25x that.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.max_pool2d(x, 2)
        h, w = x.shape[-2], x.shape[-1]
        if x.dim() >= 2 and h % 2 == 0 and w % 2 == 0 and h and w and x.is_contiguous():
            rows = x.view(*x.shape[:-2], h // 2, 2 * w)  # row 2i then row 2i + 1
            pairs = torch.maximum(rows[..., :w], rows[..., w:]).view(*x.shape[:-2], h // 2, w // 2, 2)
            return torch.maximum(pairs[..., 0], pairs[..., 1])
        x = x[..., : h // 2 * 2, : w // 2 * 2]
        return torch.maximum(torch.maximum(x[..., ::2, ::2], x[..., 1::2, ::2]),
                             torch.maximum(x[..., ::2, 1::2], x[..., 1::2, 1::2]))


class LeNet5(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
                 widths: tuple[int, int, int, int] = (6, 16, 120, 84)):
        super().__init__()
        c, h, w = input_shape
        c1, c2, f1, f2 = widths
        self.conv1 = nn.Conv2d(c, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        h2, w2 = (h // 2 - 4) // 2, (w // 2 - 4) // 2  # after pool, conv 5x5, pool
        if h2 < 1 or w2 < 1:
            raise ValueError(f"input_shape: expected images of at least 12x12, got {tuple(input_shape)}")
        self.fc1 = nn.Linear(c2 * h2 * w2, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, num_classes)
        self.pool = MaxPool2x2()
        self.input_shape = (c, h, w)
        # activations as modules (not torch.relu): the seed's layer is map -> activation -> pool,
        # and LayerTape sees a module applied to a layer's output as part of that layer
        self.act = nn.ReLU()
        self._checked: tuple | None = None  # (weak reference, key) of the last input that passed check_tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bSQH's trial forward sees the batch its sweep just checked: the same tensor, unchanged (its version
        # counter), on the same parameters' dtype/device, gives the same verdict, so the check (a full
        # finiteness pass, ~0.3 ms per batch of 64 on this CPU) is not repeated
        if not isinstance(x, torch.Tensor):  # not cacheable: check_tensor names the argument and the type
            check_tensor("x", x, shape=(None, *self.input_shape), like=self)
        key = (id(x), x._version, x.shape, next(self.parameters()).dtype, next(self.parameters()).device)
        seen = self._checked
        if seen is None or seen[0]() is not x or seen[1] != key:
            check_tensor("x", x, shape=(None, *self.input_shape), like=self)
            self._checked = (weakref.ref(x), key)
        if torch.is_grad_enabled() or not self._pool_commutes():
            x = self.pool(self.act(self.conv1(x)))  # (B, c1, H/2, W/2)
            x = self.pool(self.act(self.conv2(x)))  # (B, c2, h2, w2)
        else:
            # without autograd (bSQH's trial forward, evaluation): pool first, then ReLU on 4x fewer values;
            # bit for bit the same, since a maximum commutes with a nondecreasing map: relu(max) = max(relu)
            x = self.act(self.pool(self.conv1(x)))
            x = self.act(self.pool(self.conv2(x)))
        x = x.flatten(1)  # (B, c2 h2 w2)
        x = self.act(self.fc1(x))  # (B, f1)
        x = self.act(self.fc2(x))  # (B, f2)
        return self.fc3(x)  # (B, K) class scores


    def __getstate__(self) -> dict:
        # pickling (torch.save of the module): the weak reference to the last checked input is not state
        state = dict(super().__getstate__())
        state["_checked"] = None
        return state

    def _pool_commutes(self) -> bool:
        """True when ``act(pool(z)) == pool(act(z))`` exactly: ReLU and max-pooling (a user may swap either)."""
        return type(self.act) is nn.ReLU and type(self.pool) in (MaxPool2x2, nn.MaxPool2d)


class SmallLeNet5(LeNet5):
    """LeNet5 with widths (4, 8, 32, 32): about 7k parameters for MNIST."""

    def __init__(self, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10):
        super().__init__(input_shape, num_classes, widths=(4, 8, 32, 32))
