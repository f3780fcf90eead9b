"""A tiny suite used by the report tests (measures something real: least squares via lstsq vs solve)."""

import torch

from proxnets.engine.plotting import line_plot
from proxnets.report.suite import Claim, Figure, SuiteContext, SuiteResult, Table

CALLS = []
MUTATIONS = {"perturbed_solution": "x + 0.1", "none": "the claim always fails"}


def run(ctx: SuiteContext) -> SuiteResult:
    CALLS.append(ctx.size)
    a = torch.randn(20, 5, dtype=torch.float64)
    b = torch.randn(20, dtype=torch.float64)
    x = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
    if ctx.broken("perturbed_solution"):
        x = x + 0.1
    residual = float((a.T @ (a @ x - b)).norm())
    steps = list(range(1, 6))
    line_plot(ctx.path("curve.png"), {"residual": (steps, [10.0 ** -s for s in steps])}, xlabel="k", ylabel="r", logy=True)
    return SuiteResult(
        "fake",
        claims=[Claim("normal equations hold at the least-squares solution", "|A^T (A x - b)|", residual, "<=", 1e-8,
                      source="project", falsified_by="perturbed_solution"),
                Claim("a claim that fails", "always", 1.0, "<", 0.0, source="project", falsified_by="none")],
        metrics={"residual": residual, "first": float(torch.rand(1))},
        figures=[Figure(ctx.path("curve.png"), "residual curve")],
        tables=[Table("numbers", ["k", "r"], [[1, 0.1], [2, 0.01]])],
        notes=["a note"],
    )
