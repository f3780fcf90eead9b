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
