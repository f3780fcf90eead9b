"""The target-density price search: the guessed fast path of ``order_pair`` gives the reference's result bit for bit."""

import math

import pytest
import torch

from proxnets.pmp.optimizer import ORDER_BAND, order_pair


def _reference(s: torch.Tensor, k: int) -> tuple[float, float]:
    lo = torch.kthvalue(s, s.numel() - k).values
    hi = float(torch.where(s > lo, s, math.inf).amin()) if k > 0 else math.inf
    return float(lo), hi


def _price(lo: float, hi: float) -> float:
    return math.sqrt(lo * hi) if lo > 0 and math.isfinite(hi) else 0.5 * hi


def test_order_pair_equals_kthvalue_for_every_guess():
    g = torch.Generator().manual_seed(0)
    fast = 0
    for trial in range(60):
        n = int(torch.randint(50, 3000, (1,), generator=g))
        s = torch.rand(n, generator=g) ** 2
        if trial % 3 == 0:  # ties: few distinct values, and zero scores (a dead weight with a zero gradient)
            s = (s * 8).floor() / 8
        if trial % 5 == 0:
            s[: n // 4] = 0.0
        s = s[torch.randperm(n, generator=g)]
        for k in (0, 1, n // 10, n // 2, n - 2, n - 1):
            ref = _reference(s, k)
            p = _price(*ref)
            srt = torch.sort(s, descending=True).values
            guesses = [None, p, float(srt[max(k - 3, 0)]), float(srt[min(k + 3, n - 1)]), 0.0, -1.0, 2.0,
                       float(srt[min(k + ORDER_BAND + 5, n - 1)]), math.inf, math.nan]
            for guess in guesses:
                assert order_pair(s, k, guess) == ref, (trial, k, guess)
                if guess is not None and math.isfinite(guess) and 0 < k < n:
                    c = int((s > guess).sum())
                    fast += 0 < abs(c - k) < ORDER_BAND or c == k
    assert fast > 100  # the fast path is exercised, not only the fallback


def test_order_pair_with_a_nan_score_is_the_reference():
    s = torch.tensor([0.1, 0.5, float("nan"), 0.3, 0.2, 0.4])
    for k in range(1, 5):
        ref = _reference(s, k)
        for guess in (0.25, 0.35, 0.15, 0.45):
            got = order_pair(s, k, guess)
            assert (got[0] == ref[0] or (math.isnan(got[0]) and math.isnan(ref[0]))) and got[1] == ref[1]


def test_order_pair_with_infinite_scores_is_the_reference():
    s = torch.tensor([0.1, 0.5, float("inf"), 0.3, 0.2, 0.4, float("inf"), 0.05])
    for signs in (1.0, -1.0):  # +inf only (the fast path), and -inf too (the sum is NaN: the reference)
        if signs < 0:
            s = torch.cat([s, torch.tensor([-float("inf")])])
        for k in range(1, len(s) - 1):
            ref = _reference(s, k)
            for guess in (0.25, 0.35, 0.15, 0.45, 0.0, 1.0):
                assert order_pair(s, k, guess) == ref, (k, guess)


def test_order_pair_names_a_bad_rank():
    from proxnets.pmp.optimizer import order_pair

    with pytest.raises(ValueError, match="k: expected 0 <= k < s.numel"):
        order_pair(torch.arange(5.0), 5)
    with pytest.raises(ValueError, match="k: expected"):
        order_pair(torch.ones(2, 3), 1)
