"""The ``reproduce pmp`` suite at size smoke: claims measured, figures written."""

import pytest

from proxnets.report.suite import SuiteContext


@pytest.mark.timeout(400)  # about 15 s on an idle 2-core machine
def test_suite_smoke(tmp_path):
    from proxnets.pmp.experiments import run

    res = run(SuiteContext(out_dir=tmp_path, size="smoke", log=lambda s: None))
    assert res.method == "pmp"
    claims = {c.claim.split(":")[0]: c for c in res.claims}
    assert len(res.claims) == 6
    # the certificate claims must hold even at smoke size
    assert claims["Full-batch bSQH reduces the loss"].holds
    assert claims["Sparsity increases with rho"].holds
    for fig in res.figures:
        assert (tmp_path / fig.path.name).exists()
    assert (tmp_path / "pmp_results.json").exists()
