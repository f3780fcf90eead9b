"""Property-based fuzzing of the public API of every package (issue 13, item 7).

Property: every call of a public entry point (``specs.entries()``), with a valid baseline or with
one of the bad inputs of ``specs.mutations()`` (NaN/inf, wrong dtype or device, wrong rank, empty
batch, Python lists, label vectors of the wrong length / range / dtype, bad numbers), either
returns finite results or raises ValueError/TypeError whose message names the argument.
Hypothesis draws the entry, the mutation, the seed and the batch size.

Default run: a small profile (50 examples per package, ~5 s in all); ``@pytest.mark.slow`` runs 400.
``tests/fuzz/count_outcomes.py`` enumerates every (entry, mutation) instead and prints the counts.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from specs import entries, mutations, run  # noqa: E402

PACKAGES = ["capsules", "convex", "pmp", "equilibrium", "stable", "solvers", "norm_bounds", "data", "utils"]
ENTRIES = entries()


def _case(data, package):
    pool = [e for e in ENTRIES if e.package == package]
    entry = data.draw(st.sampled_from(pool), label="entry")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    batch = data.draw(st.integers(1, 4), label="batch")
    kw = entry.build(torch.Generator().manual_seed(seed), batch)
    muts = mutations(entry, kw)
    mut = data.draw(st.sampled_from(muts), label="mutation")
    return entry, mut, seed, batch


def _check(data, package):
    entry, mut, seed, batch = _case(data, package)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome, detail = run(entry, mut, seed=seed, batch=batch)
    assert outcome in ("ok", "clear"), f"{entry.name}({mut.arg}: {mut.what}, batch {batch}): {outcome}: {detail}"


_FAST = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_SLOW = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("package", PACKAGES)
@_FAST
@given(data=st.data())
def test_public_api_returns_finite_or_names_the_argument(package, data):
    _check(data, package)


@pytest.mark.slow
@pytest.mark.parametrize("package", PACKAGES)
@_SLOW
@given(data=st.data())
def test_public_api_fuzz_large(package, data):
    _check(data, package)


def test_every_package_has_entries_and_every_entry_a_working_baseline():
    assert {e.package for e in ENTRIES} == set(PACKAGES)
    for e in ENTRIES:
        base = mutations(e, e.build(torch.Generator().manual_seed(0), 2))[0]
        assert run(e, base, seed=0, batch=2)[0] == "ok", e.name


def test_known_defects_of_issue_13_are_fixed():
    """The defects named in the issue, directly."""
    from proxnets.capsules import ReconstructionDecoder, margin_loss, reconstruction_loss, squash
    from proxnets.stable import margins

    s = torch.randn(4, 8) * 1e20
    v = squash(s)
    assert bool(torch.isfinite(v).all()) and torch.allclose(v.norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError, match=r"y: expected integer class indices of shape \(3,\), got 'shape \(1,\)'"):
        margins(torch.randn(3, 5), torch.tensor([1]))
    dec = ReconstructionDecoder(5, 4, (1, 6, 6), hidden=(8,))
    with pytest.raises(ValueError, match=r"labels: expected integer class indices of shape \(3,\)"):
        dec(torch.randn(3, 5, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="lengths: expected a non-empty batch"):
        margin_loss(torch.rand(0, 5), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="images: expected a non-empty batch"):
        reconstruction_loss(torch.rand(0, 1, 4, 4), torch.rand(0, 1, 4, 4))
