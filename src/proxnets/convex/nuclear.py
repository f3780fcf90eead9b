"""The nuclear norm, its proximal map and the projection onto its ball.

For ``A = U diag(s) V^T`` (thin SVD):

- nuclear norm ``|A|_* = sum_i s_i``; its dual norm is the spectral norm ``|A|_2 = max_i s_i``.
- :func:`singular_value_threshold` -- ``prox_{t |.|_*}(A) = U diag((s - t)_+) V^T``.
- :func:`project_nuclear_ball` -- the nearest point of ``{|B|_* <= R}`` (Frobenius distance):
  ``U diag(proj_{l1,R}(s)) V^T``, because the nearest point shares the singular vectors of ``A``
  (von Neumann's trace inequality) and its singular values are the projection of ``s`` onto the
  non-negative l1 ball.
- :func:`project_l1_ball` -- Euclidean projection onto ``{|x|_1 <= R}`` by the sort-and-threshold
  rule of Duchi et al. (2008): ``x -> sign(x) (|x| - theta)_+`` with the smallest ``theta >= 0``
  that meets the budget.
"""

from __future__ import annotations

import torch

from proxnets.utils.validation import check_number, check_tensor

__all__ = ["nuclear_norm", "project_l1_ball", "project_nuclear_ball", "singular_value_threshold"]


def nuclear_norm(a: torch.Tensor) -> torch.Tensor:
    """``sum_i s_i(A)`` of a matrix."""
    check_tensor("a", a, ndim=2)
    return torch.linalg.svdvals(a).sum()


def project_l1_ball(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Euclidean projection of a vector onto ``{|x|_1 <= radius}``."""
    check_tensor("x", x, ndim=1)
    check_number("radius", radius, low=0.0, low_inclusive=False)
    a = x.abs()
    if a.sum() <= radius:
        return x.clone()
    mu = torch.sort(a, descending=True).values
    cums = mu.cumsum(0)
    k = torch.arange(1, mu.numel() + 1, dtype=x.dtype, device=x.device)
    rho = int(torch.nonzero(mu - (cums - radius) / k > 0).max())  # last index meeting the rule
    theta = (cums[rho] - radius) / (rho + 1)
    return torch.sign(x) * (a - theta).clamp_min(0)


def project_nuclear_ball(a: torch.Tensor, radius: float) -> torch.Tensor:
    """Nearest point of ``{|B|_* <= radius}`` to the matrix ``a``."""
    check_tensor("a", a, ndim=2)
    check_number("radius", radius, low=0.0, low_inclusive=False)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    if s.sum() <= radius:
        return a.clone()
    return (u * project_l1_ball(s, radius)) @ vh


def singular_value_threshold(a: torch.Tensor, t: float) -> torch.Tensor:
    """``prox_{t |.|_*}(a) = argmin_B  t |B|_* + |B - a|_F^2 / 2``."""
    check_tensor("a", a, ndim=2)
    check_number("t", t, low=0.0)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return (u * (s - t).clamp_min(0)) @ vh
