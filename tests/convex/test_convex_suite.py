"""The ``reproduce convex`` suite at size smoke: attributed, falsifiable claims; the certificate
claims hold (the accuracy and memory claims are decided by their own measurements)."""

import pytest

from proxnets.convex.experiments import MUTATIONS, run
from proxnets.report.suite import SuiteContext


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_convex_suite_smoke(tmp_path):
    res = run(SuiteContext(out_dir=tmp_path, size="smoke", log=lambda m: None))
    assert res.method == "convex" and len(res.claims) == 16
    assert all(c.falsified_by in MUTATIONS for c in res.claims)
    assert set(MUTATIONS) == {c.falsified_by for c in res.claims}
    certificate_claims = [c for c in res.claims if c.falsified_by in
                          ("two-iterations", "dual-step-sign", "infeasible-dual", "no-nuclear-norm", "random-filters")]
    assert len(certificate_claims) == 5 and all(c.holds for c in certificate_claims), [c.claim for c in certificate_claims]
    exact = [c for c in res.claims if c.falsified_by.startswith("exact-") and c.falsified_by != "exact-dense-kernel"]
    assert len(exact) == 5 and all(c.holds for c in exact), [(c.claim, c.value) for c in exact if not c.holds]
    stats = [c for c in res.claims if c.falsified_by in ("shuffled-labels", "variant-dccnn-shuffled")]
    assert len(stats) == 3 and all(c.details["seeds"] >= 3 and len(c.details["interval"]) == 2 for c in stats)
    assert all(c.machine_dependent and c.details["machine"] for c in res.claims
               if c.falsified_by in ("cached-dual", "exact-dense-kernel"))
    for fig in res.figures:
        assert (tmp_path / fig.path.name).stat().st_size > 0
    assert (tmp_path / "convex_results.json").exists()
