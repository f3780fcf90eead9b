"""Regularizers of the control problem and their closed-form proximal maps.

The bSQH objective over a batch ``B`` is

    J_B(u) = (1/|B|) sum_{s in B} Phi_s(x_L) + rho * R(u),

with the separable regularizer (per weight ``w``)

    r(w) = beta * 1[w != 0] + lam1 * |w| + (lam2 / 2) * w**2,      R(u) = sum_w r(w).

``beta`` weighs the L0 term (the count of nonzero weights), ``lam1`` an optional L1 term and
``lam2`` an optional L2 term. ``rho`` is the optimizer's (per parameter group) weight.

Why a proximal map: with the linearized Hamiltonian (see :mod:`proxnets.pmp.hamiltonian`) the
layerwise maximization of ``H - eps |u - u_k|^2`` is, weight by weight,

    argmin_w  (1/2) (w - z)^2 + t * r(w),     z = w_k - (dL/dw) / (2 eps),  t = rho / (2 eps),

i.e. ``prox_{t r}(z)``. For ``r`` above it has the closed form

    w~ = soft(z, t lam1) / (1 + t lam2),        soft(z, a) = sign(z) max(|z| - a, 0),
    keep w~  iff  max(|z| - t lam1, 0)^2 > 2 t beta (1 + t lam2),   else w = 0.

(The nonzero branch has value ``z^2/2 - max(|z|-t lam1, 0)^2 / (2 (1 + t lam2)) + t beta``
against ``z^2/2`` at zero.) A tie goes to zero, so the result is always an exact maximizer and
zeros are exact zeros.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import torch

from proxnets.utils.validation import check_number, check_tensor, fail

__all__ = ["Regularizer", "SparseRegularizer", "soft_threshold"]


@runtime_checkable
class Regularizer(Protocol):
    """What the Hamiltonian rule needs from a regularizer ``r`` (separable over weights)."""

    def value(self, w: torch.Tensor) -> torch.Tensor:
        """``R(w) = sum r(w_i)`` as a 0-d tensor."""

    def prox(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``argmin_w (1/2)(w - z)^2 + t r(w)`` elementwise; ``t`` broadcasts against ``z``."""


def soft_threshold(z: torch.Tensor, a: torch.Tensor | float) -> torch.Tensor:
    """``sign(z) * max(|z| - a, 0)`` (the proximal map of ``a |.|``); elementwise, NaN/inf in ``z``
    propagate (no finiteness check: optimizer hot path)."""
    if not isinstance(z, torch.Tensor):
        fail("z", "a torch.Tensor", type(z).__name__, TypeError)
    if not isinstance(a, torch.Tensor):
        check_number("a", a, low=0.0)
    return torch.sign(z) * torch.clamp(z.abs() - a, min=0.0)


@dataclasses.dataclass(frozen=True)
class SparseRegularizer:
    """``r(w) = beta 1[w != 0] + lam1 |w| + (lam2/2) w^2`` (L0, plus optional L1 / L2).

    Defaults to the pure L0 cost (``beta = 1``): then ``rho`` is the price of one nonzero weight.
    """

    beta: float = 1.0
    lam1: float = 0.0
    lam2: float = 0.0

    def __post_init__(self) -> None:
        for name in ("beta", "lam1", "lam2"):
            check_number(name, getattr(self, name), low=0.0)

    def value(self, w: torch.Tensor) -> torch.Tensor:
        out = w.new_zeros(())
        if self.beta:
            out = out + self.beta * (w != 0).sum().to(w.dtype)
        if self.lam1:
            out = out + self.lam1 * w.abs().sum()
        if self.lam2:
            out = out + 0.5 * self.lam2 * (w * w).sum()
        return out

    def prox(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        shrunk = torch.clamp(z.abs() - t * self.lam1, min=0.0)  # max(|z| - t lam1, 0)
        scale = 1.0 + t * self.lam2
        keep = shrunk * shrunk > 2.0 * t * self.beta * scale  # strict: a tie goes to zero
        return torch.where(keep, torch.sign(z) * shrunk / scale, torch.zeros_like(z))
