"""Operator norms of the stable package's layers: re-exports of :mod:`proxnets.constraints` (the one
operator-norm constraint, shared with OptEq) and of the rigorous bounds of :mod:`proxnets.norm_bounds`.

The names users imported from here keep working: :class:`OperatorNorm`, :class:`OperatorNormConstraint`,
:func:`constrain_operator_norm`, :func:`constrained_scale`, :func:`find_constraint`,
:func:`layer_operator`, :class:`NormConstraintWarning`, and :func:`fourier_upper_bound` (a tensor).
"""

from __future__ import annotations

import math
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
    "symbol_sup_bound",
    "layer_operator",
    "KINDS",
    "RESCALES",
]


def fourier_upper_bound(weight: torch.Tensor, in_shape: Sequence[int], padding: int = 0) -> torch.Tensor:
    """A rigorous upper bound of ``|A|_2`` for a stride-1 zero-padded convolution on ``(C, H, W)``
    (the Fourier-symbol bound with its round-off margin, :func:`proxnets.norm_bounds.fourier_norm_bound`)."""
    return torch.tensor(fourier_norm_bound(weight, in_shape, padding).value, dtype=weight.dtype)


def symbol_sup_bound(weight: torch.Tensor, padding: int | None = None, grid: int = 256):
    """A rigorous bound of ``|A|_2`` valid at **every** image size, for a stride-1 convolution with
    zero padding (any amount) or circular boundary: ``S = sup_{omega in [0, 2 pi)^2} sigma_max(K(omega))``.

    Why it holds at every size: the zero-padded convolution on ``H x W`` is ``P A_Z P^T``, the restriction to
    the ``H x W`` pixels of the convolution ``A_Z`` on ``l2(Z^2)``, a Fourier multiplier whose norm is the sup of
    its symbol ``K(omega) = sum_{p,q} W[:, :, p, q] e^{-i (p omega_1 + q omega_2)}``; the circular convolution at
    size ``N`` samples the same symbol on the grid ``2 pi k / N``. Neither can exceed ``S``.

    ``S`` from a ``grid x grid`` sampling (Bernstein's inequality): for unit ``u, v``, ``f = u^H K v`` is a
    trigonometric polynomial of degree ``n_j`` in ``omega_j`` (offsets centred, ``n_j = (k_j - 1) / 2`` for odd
    kernels: a global phase leaves ``sigma_max`` unchanged), so ``|d f / d omega_j| <= n_j |f|_inf``. Every
    ``omega`` lies within ``pi / grid`` of a grid point per coordinate, hence
    ``|f|_inf (1 - pi (n_1 + n_2) / grid) <= max_grid |f|``, and taking the sup over ``u, v``:

        S <= max_grid sigma_max(K) / (1 - pi (n_1 + n_2) / grid).

    ``max_grid`` is the round-off-safe Fourier bound of :func:`proxnets.norm_bounds.fourier_norm_bound` on that
    grid (its FFT and SVD margins included). 3x3 kernels, ``grid = 256``: 2.5% above ``max_grid``.
    ``padding`` is ignored (accepted for a uniform signature). Returns a :class:`proxnets.norm_bounds.NormBound`
    with ``method = "symbol sup (any size)"``.
    """
    from proxnets.norm_bounds import NormBound

    kh, kw = (int(k) for k in weight.shape[-2:])
    degree = sum((k - 1) / 2 if k % 2 else k - 1 for k in (kh, kw))
    g = max(int(grid), kh, kw, math.ceil(4 * math.pi * degree) + 1)  # the factor stays below 4/3
    base = fourier_norm_bound(weight, (weight.shape[1], g, g), 0)
    factor = 1.0 / (1.0 - math.pi * degree / g)
    value = base.value * factor * (1 + 1e-15)  # one more rounding of the product
    return NormBound(value, base.rigorous and math.isfinite(value), "symbol sup (any size)",
                     {"grid": g, "grid_max": base.details.get("estimate"), "bernstein_factor": factor},
                     why=base.why)
