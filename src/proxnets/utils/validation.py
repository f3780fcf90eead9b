"""Validation at the boundary.

Every public function checks its arguments here and raises an error that names the argument,
the expected value and the received one, in the form ``"<name>: expected <what>, got <value>"``.
The math inside never re-checks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "fail",
    "check_choice",
    "check_int",
    "check_number",
    "check_probability",
    "check_tensor",
]


def fail(name: str, expected: str, got: Any, exc: type[Exception] = ValueError) -> None:
    """Raise ``exc`` with the house message format."""
    raise exc(f"{name}: expected {expected}, got {got!r}")


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Check a finite real number within an interval; returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
        isinstance(value, torch.Tensor) and value.numel() == 1
    ):
        fail(name, "a real number", value, TypeError)
    v = float(value)
    lo_b = "[" if low_inclusive else "("
    hi_b = "]" if high_inclusive else ")"
    interval = f"{lo_b}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi_b}"
    if not math.isfinite(v):
        fail(name, f"a finite number in {interval}", value)
    if low is not None and (v < low or (v == low and not low_inclusive)):
        fail(name, f"a number in {interval}", value)
    if high is not None and (v > high or (v == high and not high_inclusive)):
        fail(name, f"a number in {interval}", value)
    return v


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Check an integer (not bool) within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(name, "an integer", value, TypeError)
    if low is not None and value < low:
        fail(name, f"an integer >= {low}", value)
    if high is not None and value > high:
        fail(name, f"an integer <= {high}", value)
    return value


def check_probability(name: str, value: Any, *, open_interval: bool = False) -> float:
    """Check a number in [0, 1] (or (0, 1) when ``open_interval``)."""
    return check_number(
        name, value, low=0.0, high=1.0, low_inclusive=not open_interval, high_inclusive=not open_interval
    )


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Check membership; the error lists the valid choices."""
    choices = list(choices)
    if value not in choices:
        fail(name, f"one of {choices}", value)
    return value


def check_tensor(
    name: str,
    x: Any,
    *,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    floating: bool = True,
    finite: bool = True,
) -> torch.Tensor:
    """Check a tensor's rank, shape (``None`` entries are free), dtype kind and finiteness."""
    if not isinstance(x, torch.Tensor):
        fail(name, "a torch.Tensor", type(x).__name__, TypeError)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            fail(name, f"a tensor with {want} dimensions", f"shape {tuple(x.shape)}")
    if shape is not None:
        if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            fail(name, f"shape {want}", f"shape {tuple(x.shape)}")
    if floating and not (x.is_floating_point() or x.is_complex()):
        fail(name, "a floating-point tensor", f"dtype {x.dtype}", TypeError)
    if finite and (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
        fail(name, "finite values", "a tensor containing NaN or inf")
    return x
