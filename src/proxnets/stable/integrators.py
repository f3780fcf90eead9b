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

__all__ = ["RK_METHODS", "RKMethod", "NOT_AVERAGED", "compose_averaged", "step_averagedness"]

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


NOT_AVERAGED = math.inf  # the constant of a map that is not proved non-expansive


def compose_averaged(alphas: Iterable[float]) -> float:
    """Averagedness constant of a composition: ``K / (1 + K)``, ``K = sum alpha_i / (1 - alpha_i)``.

    A factor with ``alpha = 1`` (non-expansive only) makes the composition non-expansive only (1.0);
    ``nan`` (unknown) gives ``nan``; ``inf`` (not non-expansive) gives ``inf``.
    """
    k, nonexp, unknown = 0.0, False, False
    for a in alphas:
        a = float(a)
        if math.isnan(a):
            unknown = True
        elif a > 1.0:
            return NOT_AVERAGED
        elif a == 1.0:
            nonexp = True
        else:
            k += a / (1.0 - a)
    if unknown:
        return math.nan
    return 1.0 if nonexp else k / (1.0 + k)


def step_averagedness(method: str, h_nu: float) -> float:
    """``alpha`` of one step of ``method`` on ``-grad V`` (``grad V`` ``nu``-Lipschitz, ``1/nu``-cocoercive).

    - Euler ``E = I - h grad V``: ``alpha = h nu / 2`` for ``h nu <= 2``: ``E = (1 - a) I + a N`` with
      ``N = I - (2 / nu) grad V`` non-expansive (Baillon-Haddad: ``(2/nu) grad V`` is 1/2-cocoercive,
      so ``I - (2/nu) grad V`` is non-expansive), ``a = h nu / 2``. At ``h nu = 2``: 1.0 (non-expansive only).
    - Heun: ``x + h/2 (F(x) + F(x + h F(x)))`` equals ``(I + E o E) / 2`` (``E o E (x) = x + h F(x) + h F(E x)``).
      For ``h nu <= 2`` ``E o E`` is ``beta = compose(a, a)``-averaged (1.0 at ``h nu = 2``), and
      ``(I + N) / 2`` is ``beta / 2``-averaged: Heun is firmly non-expansive (``alpha <= 1/2``) on the
      whole region, with no margin.
    - RK4: non-expansive for ``h nu <= 2`` (circle contractivity ``r = 1``), no averagedness constant
      derived: ``math.nan`` (unknown).
    Outside ``h nu <= 2`` (``E`` not non-expansive): :data:`NOT_AVERAGED` (``inf``) for every method.
    """
    h_nu = float(h_nu)
    if not math.isfinite(h_nu) or h_nu < 0:
        return NOT_AVERAGED
    if h_nu > 2.0 * RK_METHODS[method].radius * (1 + 1e-12):
        return NOT_AVERAGED
    a = min(h_nu / 2.0, 1.0)
    if method == "euler":
        return a
    if method == "heun":
        return 0.5 * compose_averaged([a, a])
    return math.nan
