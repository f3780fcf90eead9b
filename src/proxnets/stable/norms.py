"""Operator norms of the stable package's layers: re-exports of :mod:`proxnets.constraints` (the one
operator-norm constraint, shared with OptEq) and of the rigorous bounds of :mod:`proxnets.norm_bounds`.

The names users imported from here keep working: :class:`OperatorNorm`, :class:`OperatorNormConstraint`,
:func:`constrain_operator_norm`, :func:`constrained_scale`, :func:`find_constraint`,
:func:`layer_operator`, :class:`NormConstraintWarning`, and :func:`fourier_upper_bound` (a tensor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proxnets.constraints import (
    KINDS, RESCALES, NormConstraintWarning, OperatorNorm, OperatorNormConstraint, constrain_operator_norm,
    constrained_scale, find_constraint, layer_operator,
)
from proxnets.norm_bounds import fourier_norm_bound

__all__ = [
    "NormConstraintWarning",
    "OperatorNorm",
    "OperatorNormConstraint",
    "constrain_operator_norm",
    "constrained_scale",
    "find_constraint",
    "fourier_upper_bound",
    "layer_operator",
    "KINDS",
    "RESCALES",
]


def fourier_upper_bound(weight: torch.Tensor, in_shape: Sequence[int], padding: int = 0) -> torch.Tensor:
    """A rigorous upper bound of ``|A|_2`` for a stride-1 zero-padded convolution on ``(C, H, W)``
    (the Fourier-symbol bound with its round-off margin, :func:`proxnets.norm_bounds.fourier_norm_bound`)."""
    return torch.tensor(fourier_norm_bound(weight, in_shape, padding).value, dtype=weight.dtype)
