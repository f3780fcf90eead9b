"""Explicit Runge-Kutta steps, their circle-contractivity radii, and averagedness algebra.

A vector field ``F`` satisfies the *circle condition* with radius ``rho`` when
``|F(x) - F(y) + rho (x - y)| <= rho |x - y|``. For ``F = -grad V`` with ``grad V`` Lipschitz with
constant ``nu`` and cocoercive (Baillon-Haddad: ``V`` convex), ``rho = nu / 2``. A Runge-Kutta
method with circle-contractivity radius ``r`` is then non-expansive for step sizes
``h * rho <= r``, i.e.

    h * nu <= 2 r.

Euler, Heun (the SSP trapezoid rule) and classical RK4 all have ``r = 1``.

Averagedness. ``T`` is ``alpha``-averaged (``alpha`` in (0, 1]) when ``T = (1 - alpha) I + alpha N``
with ``N`` non-expansive; equivalently, for all ``x, y``,

    |T x - T y|^2 <= |x - y|^2 - (1 - alpha) / alpha * |(I - T) x - (I - T) y|^2.

One Euler step ``I - h grad V`` is ``alpha = h nu / 2`` averaged. Compositions of averaged maps
with constants ``alpha_i`` are averaged with ``alpha = K / (1 + K)``, ``K = sum alpha_i / (1 - alpha_i)``
(Combettes & Yamada 2015); ``(I + T) / 2`` is ``alpha / 2`` averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

__all__ = ["RK_METHODS", "RKMethod", "compose_averaged", "step_averagedness"]

Field = Callable[[torch.Tensor], torch.Tensor]


def _euler(f: Field, x: torch.Tensor, h: float) -> torch.Tensor:
    return x + h * f(x)


def _heun(f: Field, x: torch.Tensor, h: float) -> torch.Tensor:
    k1 = f(x)
    k2 = f(x + h * k1)
    return x + 0.5 * h * (k1 + k2)


def _rk4(f: Field, x: torch.Tensor, h: float) -> torch.Tensor:
    k1 = f(x)
    k2 = f(x + 0.5 * h * k1)
    k3 = f(x + 0.5 * h * k2)
    k4 = f(x + h * k3)
    return x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)


class RKMethod:
    """An explicit Runge-Kutta step ``step(F, x, h)`` with its circle-contractivity radius ``r``."""

    def __init__(self, name: str, step: Callable[[Field, torch.Tensor, float], torch.Tensor], radius: float, stages: int):
        self.name, self.step, self.radius, self.stages = name, step, radius, stages

    def __repr__(self) -> str:
        return f"RKMethod({self.name!r}, r={self.radius}, stages={self.stages})"


RK_METHODS = {
    "euler": RKMethod("euler", _euler, 1.0, 1),
    "heun": RKMethod("heun", _heun, 1.0, 2),
    "rk4": RKMethod("rk4", _rk4, 1.0, 4),
}


def compose_averaged(alphas: Iterable[float]) -> float:
    """Averagedness constant of a composition: ``K / (1 + K)``, ``K = sum alpha_i / (1 - alpha_i)``."""
    k = 0.0
    for a in alphas:
        if a >= 1.0:
            return 1.0
        k += a / (1.0 - a)
    return k / (1.0 + k)


def step_averagedness(method: str, h_nu: float) -> float:
    """``alpha`` of one step of ``method`` on ``-grad V`` (``grad V`` ``nu``-cocoercive) at ``h * nu``.

    Euler: ``h nu / 2``. Heun ``= (I + E o E) / 2`` with ``E`` an Euler step: half the constant of
    ``E o E``. RK4 has no such decomposition: ``math.nan`` (only non-expansiveness is certified).
    """
    a = h_nu / 2.0
    if method == "euler":
        return min(a, 1.0)
    if method == "heun":
        return 0.5 * compose_averaged([a, a])
    return math.nan
