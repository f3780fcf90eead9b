"""The reproduce suite at size smoke, and the measuring helpers its claims rest on.

The mutation runs (each broken variant flips the claims naming it) are in
``tests/report/test_claims_falsifiable.py -k stable``.
"""

import json
import math

import pytest
import torch

from proxnets.report.suite import SuiteContext
from proxnets.stable import experiments as E
from proxnets.stable.experiments import MUTATIONS, run

# At smoke size the denoisers see a few dozen training steps: whether the averaged one beats the
# tuned Gaussian smoother on the held-out photos is decided at quick size (its interval is wide here).
UNRESOLVED_AT_SMOKE = {"The averaged network is a working learned denoiser: it beats a tuned classical smoother on held-out photographs."}


@pytest.mark.timeout(300)
def test_stable_suite_smoke(tmp_path):
    result = run(SuiteContext(out_dir=tmp_path, size="smoke", log=lambda s: None))
    assert result.method == "stable"
    assert len(result.claims) >= 10
    for c in result.claims:
        assert c.falsified_by in MUTATIONS, c.claim
        assert c.source in ("seed", "project") or c.source.startswith("cited: "), c.claim
        if "interval" in c.details:
            lo, hi = c.details["interval"]
            assert lo <= hi and c.details["n_test"] >= 1
    assert {c.claim for c in result.claims} >= UNRESOLVED_AT_SMOKE
    failing = [c.claim for c in result.claims if not c.holds and c.claim not in UNRESOLVED_AT_SMOKE]
    assert not failing, failing
    for fig in result.figures:
        assert (tmp_path / fig.path).is_file(), fig.path
    json.dumps(result.to_dict())  # the runner writes it as JSON


def test_every_mutation_is_named_by_a_claim_run_under_it():
    names = set(MUTATIONS)
    assert names == {"unconstrained-block", "resnet-gradient-branch", "lying-lipschitz", "shuffled-labels", "step-past-bound",
                     "non-averaged-denoiser", "untrained-denoiser"}


def test_growth_factor_reads_the_geometric_rate():
    depths = [1, 2, 4, 8]
    assert E._growth_factor(depths, [3 * 1.3**d for d in depths]) == pytest.approx(1.3)
    assert E._growth_factor(depths, [1.0, 1.0, 1.0, 1.0]) == pytest.approx(1.0)


def test_empirical_averagedness_is_exact_on_a_reflection_average():
    # T = (1 - a) I + a N with N = -I: every pair asks exactly for alpha = a
    a = 0.3
    x = torch.rand(4, 1, 6, 6)
    assert E._empirical_averagedness(lambda z: (1 - a) * z - a * z, x, seed=0) == pytest.approx(a, rel=1e-4)
    # an expansive map is not averaged for any alpha
    assert E._empirical_averagedness(lambda z: 2.0 * z, x, seed=0) == math.inf


def test_nested_pgd_counts_never_grow_with_the_radius():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.rand(20, 1, 4, 4)
    y = model(x).argmax(1)  # all correct at eps = 0
    counts = E._nested_pgd(model, x, y, (0.0, 0.05, 0.5, 2.0), steps=10)
    assert counts[0.0] == 20
    assert list(counts.values()) == sorted(counts.values(), reverse=True)
    assert counts[2.0] < 20  # a large enough ball fools a linear model
