"""Every claim can fail: each suite's broken variants, run at smoke size, flip the claims that name them.

One test per (suite, variant) of every suite's ``MUTATIONS``; the intact run (in
``test_report_e2e``) checks that every claim names a variant that exists.
"""

import pytest

from proxnets.report.falsify import flipped_claims, mutations, run_mutation
from proxnets.report.registry import SUITES

CASES = [(m, name) for m in SUITES for name in mutations(m)]


@pytest.mark.parametrize("method", list(SUITES))
def test_every_suite_declares_broken_variants(method):
    assert mutations(method), f"{method}: the suite module declares no MUTATIONS"


@pytest.mark.parametrize(("method", "name"), CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_broken_variant_flips_its_claims(method, name, tmp_path):
    result = run_mutation(method, name, tmp_path)
    flipped, kept = flipped_claims(result, name)
    assert flipped or kept, f"{method}: no claim of the run under {name!r} names it in falsified_by"
    assert not kept, f"{method}: under {name!r} these claims still hold: {kept}"


# Claims whose smoke-size intervals are too wide to hold even intact: at smoke the test above shows
# only that the variant fails; the flip itself (holds intact, fails broken) is shown at quick size.
QUICK_FLIPS = [("convex", "shuffled-labels"), ("pmp", "curvature-sign"), ("pmp", "full-set-batches")]


@pytest.fixture(scope="module")
def quick_intact(tmp_path_factory):
    cache = {}

    def get(method):
        if method not in cache:
            cache[method] = run_mutation(method, None, tmp_path_factory.mktemp(f"{method}-quick"), size="quick")
        return cache[method]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(("method", "name"), QUICK_FLIPS, ids=[f"{m}-{n}" for m, n in QUICK_FLIPS])
def test_broken_variant_flips_at_quick_size(method, name, quick_intact, tmp_path):
    intact = {c.claim: c.holds for c in quick_intact(method).claims if c.falsified_by == name}
    broken = run_mutation(method, name, tmp_path, size="quick")
    flipped, kept = flipped_claims(broken, name)
    assert not kept, f"{method}: under {name!r} these claims still hold at quick size: {kept}"
    assert intact and all(intact.values()), f"{method}: not every claim naming {name!r} holds intact at quick size: {intact}"
