"""The ``reproduce capsules`` suite at size smoke: every claim measured, attributed, falsifiable."""

from __future__ import annotations

import pytest

from proxnets.report.suite import SuiteContext

# At smoke size (2 seeds, 300 test images) the equivalence intervals are far wider than the +-1 point
# margin, and the intervals over 2 seeds (t = 12.7) of muting and of "learns the task" are too wide for
# their thresholds: those claims are measured but need not hold (the mean accuracy is checked instead);
# every other claim must.


@pytest.mark.timeout(300)  # ~8 s on 2 idle cores; a loaded machine stalls OpenMP threads
def test_capsules_smoke_suite(tmp_path):
    from proxnets.capsules.experiments import MUTATIONS, SETTINGS, run

    result = run(SuiteContext(out_dir=tmp_path, size="smoke", log=lambda m: None))
    assert result.method == "capsules"
    assert len(result.claims) == 12
    assert sum("by_dataset" in c.details for c in result.claims) == 4  # the four equivalence claims
    failing = [(c.claim, c.value) for c in result.claims
               if not c.holds and "by_dataset" not in c.details and "mutes" not in c.claim
               and "learns the task" not in c.claim]
    assert not failing, failing
    for c in result.claims:
        assert c.falsified_by in MUTATIONS
        assert c.source in ("seed", "project") or c.source == "cited: Paik, Kwak & Kim 2019"
    assert {c.source for c in result.claims} == {"seed", "project", "cited: Paik, Kwak & Kim 2019"}
    for fig in result.figures:
        assert (tmp_path / fig.path).stat().st_size > 1000
    assert (tmp_path / "capsules_results.json").exists()
    acc = result.metrics["accuracy"]["mnist5k"]
    assert set(acc) == set(SETTINGS) and all(len(v) == 2 for v in acc.values())
    assert result.metrics["accuracy_summary"]["mnist5k"]["r=3"]["mean"] > 0.5  # chance is 0.1
    comp = result.metrics["routing_comparison"]
    # the comparison the regularized routing is for: no polarization, fast convergence, one limit
    assert comp["regularized"]["entropy_ratio"]["mean"] > 0.5 > comp["r=3"]["entropy_ratio"]["mean"]
    assert comp["regularized"]["passes_to_tol"]["mean"] < comp["r=3"]["passes_to_tol"]["mean"]
    assert comp["regularized"]["start_spread"]["mean"] < 1e-6 < comp["r=3"]["start_spread"]["mean"]
    for c in result.claims:
        if c.details.get("seeds"):
            assert "n_test" in c.details


def test_training_one_model_per_setting_uses_that_setting(tmp_path):
    from proxnets.capsules.experiments import train_setting
    from proxnets.data import load_dataset

    ds = load_dataset("mnist5k", n_train=200, n_test=50)
    ctx = SuiteContext(out_dir=tmp_path, size="smoke", log=lambda m: None)
    model, _ = train_setting(ctx, ds, "random", 0)
    assert model.classes.couplings == "random"
    model, _ = train_setting(ctx, ds, "r=5", 0)
    assert model.classes.iterations == 5 and model.classes.couplings == "routing"
    a, _ = train_setting(ctx, ds, "r=3", 0)
    b, _ = train_setting(ctx, ds, "r=3", 0, shuffle_labels=True)
    assert not all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))


def test_seeds_needed_is_the_smallest_n_whose_interval_fits_the_margin():
    import math

    from scipy import stats

    from proxnets.capsules.experiments import _seeds_needed

    diffs = [-0.01, -0.002, -0.01]
    m = sum(diffs) / 3
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / 2)
    n = _seeds_needed(diffs, 0.01)

    def fits(k):
        return stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k) + abs(m) <= 0.01

    assert n is not None and fits(n) and not fits(n - 1)
    assert _seeds_needed([-0.015, -0.015, -0.004], 0.01) is None  # the mean itself is beyond the margin
    assert _seeds_needed([0.0, 0.0, 0.0], 0.01) == 2


def test_quick_seeds_are_a_paired_prefix_per_dataset(tmp_path):
    # The seed counts were fixed before the new seeds were trained (experiments.QUICK_SEEDS): 6 on mnist5k, where
    # r = 5 and regularized routing are compared with r = 3, 3 on mnist5k-rot. Every setting of a dataset must use
    # the same seeds, or the paired differences would pair different models.
    from proxnets.capsules.experiments import QUICK_SEEDS, _dataset_seeds

    assert QUICK_SEEDS == {"mnist5k": 6, "mnist5k-rot": 3}
    quick = SuiteContext(out_dir=tmp_path, size="quick", seed=10, log=lambda m: None)
    seeds = [10 + k for k in range(max(QUICK_SEEDS.values()))]
    assert _dataset_seeds(quick, "mnist5k", seeds) == seeds
    assert _dataset_seeds(quick, "mnist5k-rot", seeds) == seeds[:3]
    assert _dataset_seeds(quick, "mnist5k", seeds[:1]) == seeds[:1]  # a mutation run keeps its single seed
    for size in ("smoke", "full"):
        ctx = SuiteContext(out_dir=tmp_path, size=size, log=lambda m: None)
        assert _dataset_seeds(ctx, "mnist5k-rot", [0, 1, 2]) == [0, 1, 2]
