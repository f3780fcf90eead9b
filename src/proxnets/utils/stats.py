"""Intervals for claims measured over several seeds.

:func:`mean_interval` is the Student-t interval of a mean over ``n`` independent runs,

    mean +- t_{n-1, (1 + level) / 2} * s / sqrt(n),      s the sample standard deviation,

and :func:`difference_interval` that of the paired differences ``a_i - b_i`` (same seed, same
split for both methods). A comparison's verdict reads the interval: "A beats B" holds when the
lower end of the difference interval is above 0.

:func:`crossed_interval` is the interval of a grand mean over a crossed design: a table ``x_ij`` of scores of
``S`` training seeds (rows) on the same ``P`` test items (columns, e.g. photographs). Both are random draws, so
the mean's variance has a seed part, an item part and their interaction. The two-way random-effects model
``x_ij = m + a_i + b_j + e_ij`` (variances ``s_a^2, s_b^2, s_e^2``) gives, with the ANOVA mean squares

    MS_S = P sum_i (r_i - m)^2 / (S - 1),   MS_P = S sum_j (c_j - m)^2 / (P - 1),
    MS_E = sum_ij (x_ij - r_i - c_j + m)^2 / ((S - 1)(P - 1))     (r_i, c_j: row and column means),

``E MS_S = s_e^2 + P s_a^2``, ``E MS_P = s_e^2 + S s_b^2``, ``E MS_E = s_e^2``, hence

    Var(mean) = s_a^2 / S + s_b^2 / P + s_e^2 / (S P) = E(MS_S + MS_P - MS_E) / (S P).

The estimate ``V = (MS_S + MS_P - MS_E) / (S P)`` is floored at ``max(MS_S, MS_P) / (S P)`` (each of which
alone under-estimates the variance in expectation, and keeps ``V > 0``); the t quantile takes Satterthwaite's
degrees of freedom ``V^2 / sum_k (c_k MS_k)^2 / df_k`` (Satterthwaite 1946). With one row or one column it is
:func:`mean_interval` over the other axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _stats

from proxnets.utils.validation import check_number, fail

__all__ = ["mean_interval", "difference_interval", "crossed_interval", "crossed_difference_interval"]


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``; needs at least 2 finite values."""
    check_number("level", level, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    xs = [float(v) for v in values]
    if len(xs) < 2 or not all(math.isfinite(v) for v in xs):
        fail("values", "at least 2 finite numbers", values)
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in xs) / (n - 1))
    half = float(_stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def difference_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Interval of the mean paired difference ``a_i - b_i``."""
    if len(a) != len(b):
        fail("b", f"as many values as a ({len(a)})", len(b))
    return mean_interval([x - y for x, y in zip(a, b)], level)


def _table(name: str, table: Sequence[Sequence[float]]) -> list[list[float]]:
    what = "a non-empty rectangular table (seeds x items) of numbers"
    try:
        rows = [[float(v) for v in row] for row in table]
    except (TypeError, ValueError, RuntimeError, NotImplementedError):  # not 2-D, not numbers (or a tensor without data)
        fail(name, what, f"{type(table).__name__} {getattr(table, 'shape', '')}".strip())
    if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
        fail(name, what, table)
    if not all(math.isfinite(v) for r in rows for v in r):
        fail(name, "finite numbers only", table)
    if len(rows) * len(rows[0]) < 2:
        fail(name, "at least 2 values (2 seeds or 2 items)", table)
    return rows


def crossed_interval(table: Sequence[Sequence[float]], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the grand mean of ``table[seed][item]`` (module docstring: seeds and items both random)."""
    check_number("level", level, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    x = _table("table", table)
    s, p = len(x), len(x[0])
    if s == 1 or p == 1:
        return mean_interval([v for r in x for v in r], level)
    m = sum(map(sum, x)) / (s * p)
    r = [sum(row) / p for row in x]
    c = [sum(x[i][j] for i in range(s)) / s for j in range(p)]
    ms_s = p * sum((v - m) ** 2 for v in r) / (s - 1)
    ms_p = s * sum((v - m) ** 2 for v in c) / (p - 1)
    ms_e = sum((x[i][j] - r[i] - c[j] + m) ** 2 for i in range(s) for j in range(p)) / ((s - 1) * (p - 1))
    n = s * p
    var = max((ms_s + ms_p - ms_e) / n, ms_s / n, ms_p / n)
    if var == 0.0:
        return m, m, m
    # Satterthwaite: the degrees of freedom of the combination actually used
    if var == (ms_s + ms_p - ms_e) / n:
        terms = [(ms_s / n, s - 1), (ms_p / n, p - 1), (ms_e / n, (s - 1) * (p - 1))]
    else:
        terms = [(ms_s / n, s - 1)] if var == ms_s / n else [(ms_p / n, p - 1)]
    df = var**2 / sum(t**2 / d for t, d in terms if t > 0)
    half = float(_stats.t.ppf((1 + level) / 2, df)) * math.sqrt(var)
    return m, m - half, m + half


def crossed_difference_interval(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                                level: float = 0.95) -> tuple[float, float, float]:
    """:func:`crossed_interval` of the paired differences ``a[seed][item] - b[seed][item]``. ``b`` may have one row
    (a method with no training seed, e.g. TV): it is then paired with every row of ``a``."""
    x, y = _table("a", a), _table("b", b)
    if len(y) == 1 and len(x) > 1:
        y = y * len(x)
    if len(x) != len(y) or len(x[0]) != len(y[0]):
        fail("b", f"a table of {len(x)} x {len(x[0])} (or 1 x {len(x[0])}) like a", f"{len(y)} x {len(y[0])}")
    return crossed_interval([[u - v for u, v in zip(ra, rb)] for ra, rb in zip(x, y)], level)
