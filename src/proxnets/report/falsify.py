"""Running a suite's deliberately broken variants (see :mod:`proxnets.report.suite`).

:func:`run_mutation` runs ``method``'s suite with ``ctx.mutation = name``; :func:`flipped_claims`
checks that every claim naming ``name`` in ``falsified_by`` is present and does not hold. The test
suite calls both for every entry of every suite's ``MUTATIONS`` at smoke size.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from proxnets.engine.device import seed_everything
from proxnets.report.registry import SUITES
from proxnets.report.suite import SuiteContext, SuiteResult
from proxnets.utils.threads import intra_op_threads
from proxnets.utils.validation import check_choice

__all__ = ["mutations", "run_mutation", "flipped_claims"]


def mutations(method: str) -> dict[str, str]:
    """``{name: description}`` of the broken variants of ``method``'s suite."""
    check_choice("method", method, SUITES)
    return dict(getattr(importlib.import_module(SUITES[method]), "MUTATIONS", {}))


def run_mutation(method: str, name: str | None, out_dir: Path, *, size: str = "smoke", seed: int = 0) -> SuiteResult:
    """Run ``method``'s suite under the broken variant ``name`` (``None``: the intact suite)."""
    if name is not None:
        check_choice("mutation", name, sorted(mutations(method)))
    module = importlib.import_module(SUITES[method])
    seed_everything(seed)
    ctx = SuiteContext(out_dir=Path(out_dir), size=size, device=torch.device("cpu"), seed=seed,
                       log=lambda msg: None, mutation=name)
    with intra_op_threads(1):
        return module.run(ctx)


def flipped_claims(result: SuiteResult, name: str) -> tuple[list[str], list[str]]:
    """``(flipped, not_flipped)``: claims falsified by ``name`` that do / do not fail under it."""
    targets = [c for c in result.claims if c.falsified_by == name]
    return [c.claim for c in targets if not c.holds], [c.claim for c in targets if c.holds]
