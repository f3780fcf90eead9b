"""The benchmark's same-gap time (``benchmarks/bench_convex.py``): CPU time until DCCNN's certified gap first
reaches the cached primal's final certified gap, had its solver stopped there.

``cpu_to_reach`` takes the first pass at or below the target (not the last, not the closest), counts the
CPU up to that pass's record and adds what the fit spent after its solver's last record; a version that
takes the pass before the crossing, or forgets the post-solver time, gives other numbers here.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest


def _bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_convex.py"
    spec = importlib.util.spec_from_file_location("bench_convex_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_to_reach_takes_the_first_crossing_and_adds_the_post_solver_time():
    bench = _bench()
    gaps = [5.0, 3.0, 2.0, 1.5, 0.9, 1.1, 0.5]  # first <= 1.0 at index 4 (pass 5); 5 is above it again
    marks = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    total = 9.5  # 2.5 s after the last record (recovery, head)
    assert bench.cpu_to_reach(gaps, marks, total, 1.0) == (5, 5.0 + 2.5)
    assert bench.cpu_to_reach(gaps, marks, total, 0.9) == (5, 7.5)  # at the target counts as reached
    assert bench.cpu_to_reach(gaps, marks, total, 0.1) == (None, None)
    assert bench.cpu_to_reach(gaps, marks, total, 10.0) == (1, 1.0 + 2.5)

    def broken(gaps, marks, total_cpu, target):  # the pass before the crossing, no post-solver time
        t = next(i for i, g in enumerate(gaps) if g <= target)
        return t, marks[t - 1]

    assert broken(gaps, marks, total, 1.0) != bench.cpu_to_reach(gaps, marks, total, 1.0)
    with pytest.raises(ValueError, match="gaps, marks"):
        bench.cpu_to_reach([1.0, 2.0], [1.0], 3.0, 1.0)


def test_timed_records_mark_every_iteration_of_each_trace(monkeypatch):
    bench = _bench()
    from proxnets.convex.primal import GapTrace

    monkeypatch.setattr(GapTrace, "record", GapTrace.record)  # restored after the test
    bench.timed_records(time.process_time())
    a, b = GapTrace(), GapTrace()
    for t in range(4):
        a.record(2.0 - 0.1 * t, 1.0, 1, 0.0)
    b.record(1.0, 0.5, 1, 0.0)
    assert len(a.cpu_marks) == a.iterations == 4 and len(b.cpu_marks) == 1  # one list per trace
    assert all(x <= y for x, y in zip(a.cpu_marks, a.cpu_marks[1:])) and a.cpu_marks[0] >= 0.0
    assert a.residuals == pytest.approx([1.0, 0.9, 0.8, 0.7])  # the record itself is unchanged
    assert "cpu_marks" not in a.to_dict()  # not part of the trace's data


def test_benchmark_fits_are_the_two_methods_at_one_budget():
    import math

    from proxnets.convex.estimators import CCNN, DCCNN
    from proxnets.convex.experiments import rff_bench_estimator, rff_bench_job

    d, c = rff_bench_estimator("dccnn", 7, 3.0), rff_bench_estimator("ccnn_cached", 7)
    assert isinstance(d, DCCNN) and isinstance(c, CCNN) and not isinstance(c, DCCNN)
    assert d.max_iter == c.max_iter == 7 and d.lam == c.lam and d.tol == c.tol and d.cache_mb == 3.0
    with pytest.raises(ValueError, match="method"):
        rff_bench_estimator("dual", 5)
    out = rff_bench_job(120, "dccnn", 2)()  # what a fresh interpreter runs, here in-process
    assert out["iters"] == 2 and math.isfinite(out["gap"]) and out["gap"] >= 0.0 and out["cpu_s"] > 0.0
