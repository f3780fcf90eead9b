"""The contract between a method's experiments and ``proxnets reproduce``.

Each method exposes ``proxnets.<method>.experiments.run(ctx: SuiteContext) -> SuiteResult``.
The suite writes its plots (PNG) and any extra files under ``ctx.out_dir``, and returns:

- ``claims``: one :class:`Claim` per claim of its seed, measured, with ``holds`` decided by the
  measurement (never hard-coded). A claim that does not hold is reported as such.
- ``metrics``: every number it measured (JSON-able nested dict): goes to ``results.json``.
- ``figures`` and ``tables``: what the HTML report shows.

``ctx.size`` selects the budget: ``"smoke"`` (CI: seconds), ``"quick"`` (the README run command:
all five suites together within 15 minutes on 2 CPU cores, i.e. about 2-3 minutes each), ``"full"``
(full datasets and the papers' sizes, for a GPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["SIZES", "Claim", "Figure", "Table", "SuiteContext", "SuiteResult"]

SIZES = ("smoke", "quick", "full")


@dataclasses.dataclass
class Claim:
    """One row of the claims table.

    ``claim``: the seed's claim in one sentence; ``measurement``: how it was tested;
    ``value``: the measured value (number or short text); ``holds``: the verdict.
    """

    claim: str
    measurement: str
    value: Any
    holds: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Figure:
    path: Path  # relative to the suite's out_dir or absolute
    caption: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "caption": self.caption}


@dataclasses.dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SuiteContext:
    out_dir: Path
    size: str = "quick"
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    data_dir: Path | None = None
    log: Callable[[str], None] = print

    def path(self, name: str) -> Path:
        """A file path inside the suite's directory (created)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / name

    def pick(self, smoke: Any, quick: Any, full: Any) -> Any:
        """The value for the current size: ``ctx.pick(smoke=1, quick=5, full=50)``."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.size]


@dataclasses.dataclass
class SuiteResult:
    method: str
    claims: list[Claim] = dataclasses.field(default_factory=list)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    figures: list[Figure] = dataclasses.field(default_factory=list)
    tables: list[Table] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "claims": [c.to_dict() for c in self.claims],
            "metrics": self.metrics,
            "figures": [f.to_dict() for f in self.figures],
            "tables": [t.to_dict() for t in self.tables],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteResult":
        return cls(
            method=d["method"],
            claims=[Claim(**c) for c in d.get("claims", [])],
            metrics=d.get("metrics", {}),
            figures=[Figure(Path(f["path"]), f["caption"]) for f in d.get("figures", [])],
            tables=[Table(**t) for t in d.get("tables", [])],
            notes=list(d.get("notes", [])),
        )
