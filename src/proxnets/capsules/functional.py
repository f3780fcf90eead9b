"""The capsule nonlinearity and the capsule length, safe at zero.

A capsule is a vector whose length is read as a probability. With the *safe length*

    n(s) = sqrt(|s|^2 + eps)

the squash of Sabour et al. (2017) is written

    squash(s) = n^2 / (1 + n^2) * s / n = s * n / (1 + n^2).

At ``s = 0`` neither the value nor the gradient divides by zero (the plain formula ``s / |s|`` gives
NaN there): ``squash(0) = 0`` and its Jacobian there is ``sqrt(eps) / (1 + eps) * I``. The same
``eps`` enters the routing energy (:mod:`proxnets.capsules.routing`), so that
``squash(s) = g'(n(s)) * grad n(s)`` holds exactly, with ``g(r) = r - arctan(r)``.
"""

from __future__ import annotations

import torch

from proxnets.utils.validation import check_int, check_number, check_tensor

__all__ = ["EPS", "capsule_length", "squash"]

EPS = 1e-8  # inside the square root: length bias sqrt(EPS) = 1e-4 at zero, invisible at |s| ~ 1


def _scaled(s: torch.Tensor, dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``s = m u`` with ``m = max(max_i |s_i|, 1)``, and ``r = sqrt(|u|^2 + eps / m^2)`` so ``n(s) = m r``.

    Why: ``|s|^2`` overflows float32 once ``|s| > ~1.8e19`` (and ``n / (1 + n^2)`` is then
    inf / inf = NaN); ``|u| <= sqrt(D)`` never does. For ``|s|_inf <= 1`` it is the plain formula.
    """
    m = s.detach().abs().amax(dim, keepdim=True).clamp_min(1.0)  # the value does not depend on m
    u = s / m
    r = (u.pow(2).sum(dim, keepdim=True) + eps / (m * m)).sqrt()
    return u, m, r


def _capsule_length(s: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    _, m, r = _scaled(s, dim, eps)
    return (m * r).squeeze(dim)


def _squash(s: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    # s n / (1 + n^2) with n = m r:  = u r / (m^-2 + r^2), every term bounded
    u, m, r = _scaled(s, dim, eps)
    return u * (r / (1.0 / (m * m) + r * r))


def _check(s, dim, eps) -> None:
    check_tensor("s", s, ndim=tuple(range(1, 9)))
    check_int("dim", dim, low=-s.ndim, high=s.ndim - 1)
    check_number("eps", eps, low=0.0)


def capsule_length(s: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """Safe length ``n(s) = sqrt(|s|^2 + eps)`` along ``dim`` (finite gradient at ``s = 0``), computed
    scale-safely (no overflow of ``|s|^2``)."""
    _check(s, dim, eps)
    return _capsule_length(s, dim, eps)


def squash(s: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """``squash(s) = s * n / (1 + n^2)`` with the safe length ``n`` along ``dim``; ``|squash(s)| < 1``.

    Scale-safe: finite and of length -> 1 for any finite ``s`` (the plain formula is NaN above
    ``|s| ~ 1.8e19`` in float32). The library's hot paths call the unchecked ``_squash``."""
    _check(s, dim, eps)
    return _squash(s, dim, eps)
