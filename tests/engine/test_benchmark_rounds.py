"""The benchmark helpers' statistics: per-round ratios, their IQR and the met / not met / undecided call."""

import pytest

from proxnets.utils.benchmark import interleaved_rounds, spread, verdict


def test_verdict_decides_only_when_the_whole_iqr_is_on_one_side():
    below = spread([1.20, 1.22, 1.25, 1.27, 1.28])  # q3 < 1.3
    straddle = spread([1.20, 1.26, 1.29, 1.32, 1.36])
    above = spread([1.31, 1.33, 1.35, 1.36, 1.40])
    assert verdict(below, 1.3, True) == "met"
    assert verdict(above, 1.3, True) == "not met"
    assert verdict(straddle, 1.3, True).startswith("undecided")
    # a lower bound (speed-ups): the same IQRs read the other way
    assert verdict(above, 1.3, False) == "met" and verdict(below, 1.3, False) == "not met"
    assert spread([2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="xs"):
        spread([])


def test_interleaved_rounds_calls_each_function_per_round_in_alternation():
    calls: list[str] = []
    clock = iter(range(10_000)).__next__  # one tick per reading: every call lasts exactly 1
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    t = interleaved_rounds(fns, 4, calls=3, clock=lambda: float(clock()), shuffle=True, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up
    body = calls[3:]
    assert len(body) == 4 * 3 * 3
    for r in range(4):  # within a round: the same order every pass (call by call alternation)
        rnd = body[9 * r: 9 * r + 9]
        assert rnd[0:3] == rnd[3:6] == rnd[6:9] and sorted(rnd[0:3]) == ["a", "b", "c"]
    assert t == {k: [3.0] * 4 for k in "abc"}
