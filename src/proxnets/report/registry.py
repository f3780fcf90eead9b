"""Which experiment suites exist: method name -> module exposing ``run(ctx) -> SuiteResult``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from proxnets.report.suite import SuiteContext, SuiteResult
from proxnets.utils.validation import check_choice

__all__ = ["SUITES", "get_suite", "available_suites"]

SUITES: dict[str, str] = {
    "capsules": "proxnets.capsules.experiments",
    "convex": "proxnets.convex.experiments",
    "pmp": "proxnets.pmp.experiments",
    "opteq": "proxnets.equilibrium.experiments",
    "stable": "proxnets.stable.experiments",
}


def get_suite(name: str) -> Callable[[SuiteContext], SuiteResult]:
    check_choice("method", name, SUITES)
    return importlib.import_module(SUITES[name]).run


def available_suites() -> list[str]:
    """Suites whose module is present in this installation."""
    out = []
    for name, mod in SUITES.items():
        if importlib.util.find_spec(mod) is not None:
            out.append(name)
    return out
