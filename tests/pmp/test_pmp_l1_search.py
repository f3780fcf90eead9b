"""L1 then prune: the strength search reaches its density band, and the suite's L1 + prune + ft points are at the
pruning density with the lr picked on validation."""

from __future__ import annotations

import math

import pytest

from proxnets.pmp.baselines import strength_search
from proxnets.pmp.experiments import L1_BRACKET, L1_PROBES, L1_RTOL


def _curve(s50: float, k: float, calls: list[float]):
    """A monotone density curve shaped like the pilot's (density 0.5 at ``s50``, slope ``k`` in log-log)."""

    def density_at(s: float) -> float:
        calls.append(s)
        return 1.0 / (1.0 + (s / s50) ** k)

    return density_at


@pytest.mark.parametrize("k", [3.0, 6.0])
@pytest.mark.parametrize("s50", [2e-3, 6e-3])
@pytest.mark.parametrize("target", [0.4, 0.2, 0.1])
def test_search_lands_in_the_band_within_its_probes(target, s50, k):
    calls: list[float] = []
    found = strength_search(_curve(s50, k, calls), target, L1_BRACKET, L1_PROBES, L1_RTOL)
    assert found["within"] and target <= found["density"] <= target * (1 + L1_RTOL)
    assert len(calls) == len(found["probes"]) <= L1_PROBES
    exact = s50 * (1 / target - 1) ** (1 / k)  # the strength at exactly the target
    assert exact / (1 + L1_RTOL) ** 2 < found["strength"] <= exact * (1 + 1e-12)


def test_the_old_fixed_strengths_miss_the_band_the_search_reaches():
    """The broken variant: the former protocol (fixed strengths 1e-3 / 1e-2 / 3e-2, no search) on a pilot-like curve
    lands nowhere near 0.4 / 0.2 / 0.1 (0.97 / 0.11 / 0.006 in the suite's last quick run)."""
    density_at = _curve(6e-3, 3.0, [])
    fixed = [density_at(s) for s in (1e-3, 1e-2, 3e-2)]
    for target in (0.4, 0.2):
        assert not any(target <= d <= target * (1 + L1_RTOL) for d in fixed)
        assert strength_search(density_at, target, L1_BRACKET, L1_PROBES, L1_RTOL)["within"]


def test_a_search_that_cannot_reach_the_band_says_so():
    # the target outside the bracket's densities: the sparsest probe above the target, flagged
    found = strength_search(_curve(6e-3, 3.0, []), 0.4, (1e-5, 1e-4), 4, L1_RTOL)
    assert not found["within"] and found["density"] > 0.4 * (1 + L1_RTOL)
    assert found["density"] == min(d for _, d in found["probes"])
    # every probe below the target: the densest one
    found = strength_search(_curve(6e-3, 3.0, []), 0.4, (1e-1, 1.0), 4, L1_RTOL)
    assert not found["within"] and found["density"] == max(d for _, d in found["probes"]) < 0.4
    # a curve that rises with the strength (the assumption broken): bisection walks away, never a false "within"
    found = strength_search(lambda s: min(1.0, s * 10), 0.2, L1_BRACKET, L1_PROBES, L1_RTOL)
    assert found["within"] == (0.2 <= found["density"] <= 0.2 * (1 + L1_RTOL))
    assert not found["within"]


@pytest.mark.parametrize("kw, name", [(dict(target=0.0), "target"), (dict(target=1.5), "target"),
                                      (dict(bracket=(1e-2, 1e-3)), "bracket"), (dict(bracket=(0.0, 1.0)), "bracket"),
                                      (dict(probes=0), "probes"), (dict(rtol=-0.1), "rtol")])
def test_bad_arguments_name_themselves(kw, name):
    args = dict(target=0.2, bracket=L1_BRACKET, probes=3, rtol=0.25) | kw
    with pytest.raises(ValueError, match=name):
        strength_search(lambda s: 0.5, **args)
    with pytest.raises(ValueError, match="density_at"):
        strength_search(lambda s: math.nan, 0.2, L1_BRACKET, 3, 0.25)


def test_l1_prune_points_are_at_the_pruning_density_with_the_lr_picked_on_validation(monkeypatch, tmp_path):

    from proxnets.data import load_dataset
    from proxnets.pmp import experiments
    from proxnets.pmp.sparsity import SPARSIFIABLE
    from proxnets.report.suite import SuiteContext

    monkeypatch.setattr(experiments, "SGD_LRS", (0.05, 0.2))
    monkeypatch.setattr(experiments, "L1_PROBES", 3)
    monkeypatch.setattr(experiments, "L1_SEED_PROBES", 2)
    ctx = SuiteContext(out_dir=tmp_path, size="smoke", log=lambda m: None)
    ds, val = experiments.frontier_data(ctx, load_dataset("mnist5k", seed=0))
    densities = {(s, r): d for s in (0, 1) for r, d in ((0.4, 0.4012), (0.2, 0.1987))}
    out = experiments.l1_prune(ctx, ds, val, [0, 1], [0.4, 0.2], densities, epochs=1, ft_epochs=1, batch=16)
    n = sum(m.weight.numel() for m in experiments._model(ds, 0).modules() if isinstance(m, SPARSIFIABLE))
    assert len(out["l1_prune"]) == 4
    for p in out["l1_prune"]:
        # pruned to bSQH's density to one weight (zeros of an L1 run sparser than that may regrow in fine-tuning)
        assert abs(p["density"] - densities[(p["seed"], p["rho"])]) <= 1.0 / n + 1e-12
        assert p["within"] == (p["rho"] <= p["l1_density"] <= p["rho"] * (1 + L1_RTOL))
        assert any(q["strength"] == p["strength"] and q["seed"] == p["seed"] and q["density"] == p["l1_density"]
                   for q in out["l1_raw"])  # the pruned model is the picked probe's
    for rho in (0.4, 0.2):
        first, other = (next(p for p in out["l1_prune"] if p["rho"] == rho and p["seed"] == s) for s in (0, 1))
        val_by_lr = out["l1_lr_val"][str(rho)]
        assert first["lr"] == max((0.05, 0.2), key=lambda a: (val_by_lr[str(a)], -a)) == other["lr"]
        assert first["strength"] / 2 <= other["strength"] <= 2 * first["strength"]
        assert other["probes"] <= 2 and first["probes"] <= 3
    assert {(p["rho"], p["lr"]) for p in out["l1_raw"]} == {(p["rho"], p["lr"]) for p in out["l1_prune"]}
