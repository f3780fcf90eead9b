"""The ``reproduce pmp`` suite at size smoke: claims attributed, the mechanism claims hold, figures written.

The broken variants (``MUTATIONS``) are run by ``tests/report/test_claims_falsifiable.py -k pmp``;
here the intact run shows that the claims they flip do hold at smoke size where the smoke budget
allows it (the interval claims need the seeds of the quick size: with 2 seeds a 95% t-interval is
12.7 standard errors wide, so they are not asserted here).
"""

import pytest

from proxnets.report.suite import SuiteContext


@pytest.mark.timeout(400)  # a few seconds on an idle 2-core machine
def test_suite_smoke(tmp_path):
    from proxnets.pmp.experiments import MUTATIONS, run

    res = run(SuiteContext(out_dir=tmp_path, size="smoke", log=lambda s: None))
    assert res.method == "pmp"
    claims = {c.claim: c for c in res.claims}
    assert len(res.claims) == 12
    for c in res.claims:
        assert c.falsified_by in MUTATIONS and c.source in ("seed", "project")
        if "interval" in c.details:
            assert c.details["seeds"] >= 2 and c.details["n_test"] > 0
    for name in ("Every accepted full-batch bSQH iteration decreases J_B by at least eta * tau",
                 "The acceptance test is exercised: every full-batch run rejects some trial steps",
                 "Full-batch bSQH lowers the cross-entropy itself, not only the L0 price",
                 "Sparsity increases as the target density is lowered (rho adapted by bSQH)",
                 "bSQH with the L0 regularizer trains a sparse CNN: most weights are exactly zero",
                 "Removing the zero filters of a filter-level-L0 bSQH LeNet-5 gives a smaller dense network with the "
                 "same outputs"):
        assert claims[name].holds, (name, claims[name].value)
    # the mechanism is exercised: the guaranteed decrease is a real fraction of the actual one
    dec = claims["Every accepted full-batch bSQH iteration decreases J_B by at least eta * tau"].details
    assert min(g / a for g, a in zip(dec["guaranteed_decrease"], dec["actual_decrease"])) > 0.01
    for fig in res.figures:
        assert (tmp_path / fig.path.name).exists()
    assert (tmp_path / "pmp_results.json").exists()
    st = res.metrics["structured"]  # the export removed filters (a claim about nothing removed would be empty)
    assert st["params_exported"] < st["params_dense"] and st["macs"] <= 0.35
