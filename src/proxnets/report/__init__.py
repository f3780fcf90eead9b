"""Experiment suites, the claims table, and the self-contained HTML report."""

from proxnets.report.suite import Claim, Figure, SuiteContext, SuiteResult, Table

__all__ = ["Claim", "Figure", "SuiteContext", "SuiteResult", "Table"]
