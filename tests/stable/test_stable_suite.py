"""The reproduce suite at size smoke: every claim holds, figures exist."""

import json

import pytest
import torch

from proxnets.report.suite import SuiteContext
from proxnets.stable.experiments import run


@pytest.mark.timeout(120)
def test_stable_suite_smoke(tmp_path):
    result = run(SuiteContext(out_dir=tmp_path, size="smoke", log=lambda s: None))
    assert result.method == "stable"
    assert len(result.claims) >= 6
    failing = [c.claim for c in result.claims if not c.holds]
    assert not failing, failing
    for fig in result.figures:
        assert (tmp_path / fig.path).is_file(), fig.path
    json.dumps(result.to_dict())  # the runner writes it as JSON
    assert torch.get_num_threads() >= 1
