"""The ``reproduce convex`` suite at size smoke: claims hold, figures and JSON exist."""

import pytest

from proxnets.convex.experiments import run
from proxnets.report.suite import SuiteContext


@pytest.mark.timeout(120)
def test_convex_suite_smoke(tmp_path):
    res = run(SuiteContext(out_dir=tmp_path, size="smoke", log=lambda m: None))
    assert res.method == "convex" and len(res.claims) >= 7
    failing = [c.claim for c in res.claims if not c.holds]
    assert not failing, failing
    for fig in res.figures:
        assert (tmp_path / fig.path.name).stat().st_size > 0
    assert (tmp_path / "convex_results.json").exists()
    gaps = res.metrics["gap_and_filters"]["dual_trace"]["residuals"]
    assert min(gaps) >= 0
