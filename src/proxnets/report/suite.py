"""The contract between a method's experiments and ``proxnets reproduce``.

Each method exposes ``proxnets.<method>.experiments.run(ctx: SuiteContext) -> SuiteResult``.
The suite writes its plots (PNG) and any extra files under ``ctx.out_dir``, and returns:

- ``claims``: one :class:`Claim` per claim, measured; its verdict is ``value op threshold``,
  computed by :class:`Claim` itself (never passed in). A claim that does not hold is reported as such.
- ``metrics``: every number it measured (JSON-able nested dict): goes to ``results.json``.
- ``figures`` and ``tables``: what the HTML report shows.

``ctx.size`` selects the budget: ``"smoke"`` (CI: seconds), ``"quick"`` (the README run command:
all five suites together within 15 minutes on 2 CPU cores, i.e. about 2-3 minutes each), ``"full"``
(full datasets and the papers' sizes, for a GPU).

Falsifiability. Each suite module also exposes ``MUTATIONS: dict[name, description]``: deliberately
broken variants of the method (routing with a softmax over the wrong axis, a block without its
norm constraint, ...). Every claim names in ``falsified_by`` the variant that must flip its verdict
to "does not hold"; with ``ctx.mutation = name`` the suite runs that variant (and may skip parts
whose claims the variant cannot flip: :meth:`SuiteContext.runs`). The test suite runs each variant
at smoke size and asserts the flips (:mod:`proxnets.report.falsify`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from proxnets.certificates import OPS, compare

__all__ = ["SIZES", "SOURCES", "Claim", "Figure", "Table", "SuiteContext", "SuiteResult", "check_source"]

SIZES = ("smoke", "quick", "full")
SOURCES = ("seed", "cited", "project")


def check_source(source: str) -> str:
    """``"seed"``, ``"cited: <reference>"`` or ``"project"``."""
    if source in ("seed", "project") or (isinstance(source, str) and source.startswith("cited: ") and len(source) > 7):
        return source
    raise ValueError(f"source: expected 'seed', 'cited: <reference>' or 'project', got {source!r}")


@dataclasses.dataclass
class Claim:
    """One row of the claims table.

    - ``claim``: the claim in one sentence; ``measurement``: how it was tested.
    - ``value``: the measured number; ``op`` and ``threshold``: the verdict is ``value op threshold``
      (the threshold lives here only, and the report prints it beside the value).
    - ``holds``: computed from ``value``, ``op`` and ``threshold`` (and recomputed on load, so a
      stored verdict can never disagree with its numbers).
    - ``source``: ``"seed"`` (stated by the seed paper; ``section`` quotes where, or says
      ``"abstract"``), ``"cited: <reference>"`` (prior work the seed discusses) or ``"project"``.
    - ``falsified_by``: the name of the broken variant (a key of the suite's ``MUTATIONS``) that
      flips this verdict.
    - ``machine_dependent``: memory and wall-time claims; the only ones whose value may change
      between two runs with the same seed (``details["machine"]`` names the machine).
    - ``details``: e.g. ``{"interval": [lo, hi], "seeds": 3, "n_test": 1000}`` for statistical claims.
    """

    claim: str
    measurement: str
    value: Any
    op: str
    threshold: Any
    source: str
    falsified_by: str
    section: str = ""
    machine_dependent: bool = False
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    holds: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op: expected one of {list(OPS)}, got {self.op!r}")
        check_source(self.source)
        if self.source == "seed" and not self.section:
            raise ValueError(f"section: expected where seed states {self.claim!r} (a section, or 'abstract'), got ''")
        if not self.falsified_by:
            raise ValueError(f"falsified_by: expected the broken variant that flips {self.claim!r}, got ''")
        if isinstance(self.value, torch.Tensor):
            self.value = self.value.item()
        self.holds = compare(self.value, self.op, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Claim":
        """Rebuild from ``to_dict``; ``holds`` is recomputed, whatever the stored value says."""
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in fields})


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
    mutation: str | None = None

    def runs(self, *mutations: str) -> bool:
        """Whether to run a part of the suite whose claims ``mutations`` can flip: always in a
        normal run; under a mutation only when it is one of them (keeps the mutation tests cheap)."""
        return self.mutation is None or self.mutation in mutations

    def broken(self, name: str) -> bool:
        """``True`` when the suite runs the broken variant ``name``."""
        return self.mutation == name

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
            claims=[Claim.from_dict(c) for c in d.get("claims", [])],
            metrics=d.get("metrics", {}),
            figures=[Figure(Path(f["path"]), f["caption"]) for f in d.get("figures", [])],
            tables=[Table(**t) for t in d.get("tables", [])],
            notes=list(d.get("notes", [])),
        )
