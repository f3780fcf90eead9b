"""The ``reproduce capsules`` suite at size smoke: every claim measured and holding, figures written."""

from __future__ import annotations

import pytest

from proxnets.report.suite import SuiteContext


@pytest.mark.timeout(300)  # ~20 s on 2 idle cores; a loaded machine stalls OpenMP threads
def test_capsules_smoke_suite(tmp_path):
    from proxnets.capsules.experiments import run

    result = run(SuiteContext(out_dir=tmp_path, size="smoke", log=lambda m: None))
    assert result.method == "capsules"
    assert len(result.claims) == 7
    failing = [(c.claim, c.value) for c in result.claims if not c.holds]
    assert not failing, failing
    for fig in result.figures:
        assert (tmp_path / fig.path).stat().st_size > 1000
    assert (tmp_path / "capsules_results.json").exists()
    study = result.metrics["studies"]["mnist5k"]
    assert set(study["accuracy_by_updates"]) == {0, 1, 2, 3, 5, 10}
    assert set(study["prediction_change"]) >= {"1->3", "3->10", "10->50"}


def test_training_one_model_per_number_of_updates(tmp_path):
    """The 'full'-size study (one model per k), here on a small subset at smoke settings."""
    from proxnets.capsules.experiments import accuracy_trained_per_updates
    from proxnets.data import load_dataset

    ds = load_dataset("mnist5k", n_train=500, n_test=200)
    acc = accuracy_trained_per_updates(SuiteContext(out_dir=tmp_path, size="smoke", log=lambda m: None), ds, (0, 2))
    assert set(acc) == {0, 2} and all(a > 0.3 for a in acc.values())
