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
    "check_labels",
    "check_like",
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
    nonempty: bool = False,
    like: Any = None,
) -> torch.Tensor:
    """Check a tensor's rank, shape (``None`` entries are free), dtype kind and finiteness;
    ``nonempty``: at least one entry along dimension 0 (a batch); ``like``: same dtype and device
    as that tensor or module's first parameter (:func:`check_like`)."""
    if not isinstance(x, torch.Tensor):
        fail(name, "a torch.Tensor", type(x).__name__, TypeError)
    if finite and x.device.type == "meta":
        fail(name, "a tensor with data", "a tensor on the meta device")
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
    if nonempty and (x.ndim == 0 or x.shape[0] == 0):
        fail(name, "a non-empty batch", f"shape {tuple(x.shape)}")
    if like is not None:
        check_like(name, x, like)
    if finite and (x.is_floating_point() or x.is_complex()) and not _all_finite(x):
        fail(name, "finite values", "a tensor containing NaN or inf")
    return x


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``. Real tensors: from ``aminmax`` (NaN propagates through min and max), one pass
    without the boolean copy of ``isfinite`` (measured 10x faster on a (128, 1152, 8) float32 input)."""
    if x.is_complex() or x.numel() == 0:
        return bool(torch.isfinite(x).all())
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_like(name: str, x: torch.Tensor, like: Any) -> torch.Tensor:
    """``x`` has the dtype and device of ``like`` (a tensor, or a module's first parameter/buffer):
    a clear error instead of torch's "mat1 and mat2 must have the same dtype" deep in a forward."""
    if isinstance(like, torch.nn.Module):
        ref = next(iter(like.parameters()), None)
        if ref is None:
            ref = next(iter(like.buffers()), None)
        if ref is None:
            return x
    else:
        ref = like
    whose = "the model's" if isinstance(like, torch.nn.Module) else "to match"
    if x.device != ref.device:
        fail(name, f"a tensor on {ref.device} ({whose})", f"a tensor on {x.device}")
    if ref.is_floating_point() and x.dtype != ref.dtype:
        fail(name, f"dtype {ref.dtype} ({whose})", f"dtype {x.dtype}", TypeError)
    return x


def check_labels(name: str, y: Any, n: int | None = None, num_classes: int | None = None) -> torch.Tensor:
    """Class indices: an integer tensor of shape ``(n,)`` with values in ``[0, num_classes)``.

    A length-1 vector is *not* broadcast over a batch of ``n > 1``: it is an error."""
    want = f"integer class indices of shape ({'B' if n is None else n},)"
    if not isinstance(y, torch.Tensor):
        fail(name, want, type(y).__name__, TypeError)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        fail(name, want, f"dtype {y.dtype}")
    if y.ndim != 1 or (n is not None and y.shape[0] != n):
        fail(name, want, f"shape {tuple(y.shape)}")
    if y.device.type == "meta":
        fail(name, "a tensor with data", "a tensor on the meta device")
    if y.numel() and num_classes is not None:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            fail(name, f"class indices in [0, {num_classes})", f"values in [{lo}, {hi}]")
    return y
