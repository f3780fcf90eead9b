"""The optimization certificate: one record type for every method.

A *certificate* is a number the theory of a method says must satisfy an inequality, measured on a
model (and inputs), together with the verdict and how much the number can be trusted:

- ``name``: what is measured (``"lipschitz"``, ``"equilibrium_residual"``, ``"duality_gap"``, ...).
- ``value``: the measured number.
- ``bound``: the number it is compared with, and ``op`` the comparison (``value op bound``).
- ``holds``: the verdict ``value op bound``, computed here (never passed in); a non-finite value
  never holds.
- ``rigorous``: ``True`` only when ``value`` is *proved* to be on the safe side of the quantity it
  stands for (an upper bound of a norm that is proved to be one, an exact residual, a gap computed
  from feasible points). A power-iteration estimate of a norm, an inner solve that did not
  converge, or a sample-based estimate make it ``False``; ``why`` says which.
- ``method``: how ``value`` was computed (``"exact SVD"``, ``"Fourier symbol"``, ``"power iteration"``).
- ``details``: anything else worth keeping (JSON-able).

Each method package exposes ``certificate(model, x, ...) -> list[Certificate]``; the CLI's
``proxnets eval`` prints them. :func:`compare` is the one comparison rule, used by certificates and
by the claims of ``proxnets reproduce``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

__all__ = ["OPS", "compare", "Certificate", "format_certificates", "all_hold"]

OPS = ("<=", "<", ">=", ">", "==")


def compare(value: Any, op: str, bound: Any) -> bool:
    """``value op bound``; ``False`` for a non-finite or non-numeric value (never a silent pass).

    Booleans compare with ``"=="`` only.
    """
    if op not in OPS:
        raise ValueError(f"op: expected one of {list(OPS)}, got {op!r}")
    if isinstance(value, bool) or isinstance(bound, bool):
        if op != "==":
            raise ValueError(f"op: expected '==' for a boolean value or bound, got {op!r}")
        return bool(value) == bool(bound)
    try:
        v, b = float(value), float(bound)
    except (TypeError, ValueError):
        return False
    if not (math.isfinite(v) and not math.isnan(b)):
        return False
    return {"<=": v <= b, "<": v < b, ">=": v >= b, ">": v > b, "==": v == b}[op]


@dataclasses.dataclass(frozen=True)
class Certificate:
    """One certificate (see the module docstring for the fields)."""

    name: str
    value: float
    bound: float
    op: str = "<="
    rigorous: bool = True
    method: str = ""
    why: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    holds: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: expected a non-empty string, got ''")
        if not self.rigorous and not self.why:
            raise ValueError(f"why: expected the reason certificate {self.name!r} is not rigorous, got ''")
        object.__setattr__(self, "holds", compare(self.value, self.op, self.bound))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        """``name: value op bound -> holds (rigorous, method)``, the form ``proxnets eval`` prints."""
        v = f"{self.value:.6g}" if isinstance(self.value, float) else str(self.value)
        b = f"{self.bound:.6g}" if isinstance(self.bound, float) else str(self.bound)
        verdict = "holds" if self.holds else "DOES NOT HOLD"
        trust = "rigorous" if self.rigorous else f"not rigorous: {self.why}"
        how = f", {self.method}" if self.method else ""
        return f"{self.name}: {v} {self.op} {b} -> {verdict} ({trust}{how})"


def format_certificates(certs: Iterable[Certificate]) -> list[str]:
    return [c.line() for c in certs]


def all_hold(certs: Iterable[Certificate], *, rigorous: bool = True) -> bool:
    """Every certificate holds (and, with ``rigorous``, each is rigorous)."""
    certs = list(certs)
    return bool(certs) and all(c.holds and (c.rigorous or not rigorous) for c in certs)
