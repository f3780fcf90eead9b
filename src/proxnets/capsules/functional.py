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

__all__ = ["EPS", "capsule_length", "squash"]

EPS = 1e-8  # inside the square root: length bias sqrt(EPS) = 1e-4 at zero, invisible at |s| ~ 1


def capsule_length(s: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """Safe length ``n(s) = sqrt(|s|^2 + eps)`` along ``dim`` (finite gradient at ``s = 0``)."""
    return (s.pow(2).sum(dim) + eps).sqrt()


def squash(s: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """``squash(s) = s * n / (1 + n^2)`` with the safe length ``n`` along ``dim``; ``|squash(s)| < 1``."""
    n = capsule_length(s, dim, eps).unsqueeze(dim)
    return s * (n / (1.0 + n * n))
