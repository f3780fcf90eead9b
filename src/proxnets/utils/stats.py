"""Intervals for claims measured over several seeds.

:func:`mean_interval` is the Student-t interval of a mean over ``n`` independent runs,

    mean +- t_{n-1, (1 + level) / 2} * s / sqrt(n),      s the sample standard deviation,

and :func:`difference_interval` that of the paired differences ``a_i - b_i`` (same seed, same
split for both methods). A comparison's verdict reads the interval: "A beats B" holds when the
lower end of the difference interval is above 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _stats

from proxnets.utils.validation import check_number, fail

__all__ = ["mean_interval", "difference_interval"]


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
