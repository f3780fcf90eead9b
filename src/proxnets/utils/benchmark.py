"""Timing and memory measurement for ``benchmarks/``.

These machines are shared and noisy: we report medians (and the interquartile range) of repeated
runs, and compare implementations *in the same run*, printing their ratio.

- :func:`time_fn` -- median wall time of ``fn()`` after warm-up (synchronizes CUDA when used).
- :func:`peak_memory_mb` -- peak memory of one call of ``fn()``: on CUDA the allocator's peak, on
  CPU the peak resident set of a forked child running ``fn`` minus its resident set at the fork.
- :func:`fresh_peak_memory_mb` -- peak resident memory that a call adds, measured in a fresh
  interpreter (no allocator history): the child imports ``module:function``, calls it to prepare
  (load data...), resets its peak (``/proc/self/clear_refs`` = 5), runs the returned callable
  and reports ``VmHWM - VmRSS`` (peak minus the resident set before the call), Linux only.
- :func:`ratio_line` -- the one-line "A vs B" summary every benchmark prints.
- :func:`interleaved_rounds` -- per-round times of several functions called in alternation, and
  :func:`spread` / :func:`verdict` -- the median and IQR of per-round ratios and the met / not met /
  undecided call against a target (a target is decided only when the whole IQR is on one side of it).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["Timing", "time_fn", "time_interleaved", "interleaved_rounds", "spread", "verdict", "peak_memory_mb",
           "fresh_peak_memory_mb", "ratio_line"]


@dataclasses.dataclass
class Timing:
    median: float
    q1: float
    q3: float
    repeats: int

    def __str__(self) -> str:
        return f"{self.median * 1e3:.2f} ms (IQR {self.q1 * 1e3:.2f}-{self.q3 * 1e3:.2f}, n={self.repeats})"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 7, min_time: float = 0.0) -> Timing:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs (more if ``min_time`` not reached)."""
    for _ in range(warmup):
        fn()
    _sync()
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return _timing(times)


def _timing(times: list[float]) -> Timing:
    qs = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), qs[0], qs[2], len(times))


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 7) -> dict[str, Timing]:
    """Time several functions in alternation (A B A B ...), so that load from other processes on a
    shared machine hits all of them alike; returns ``{name: Timing}`` (:func:`interleaved_rounds` of one call)."""
    return {k: _timing(v) for k, v in interleaved_rounds(fns, repeats, warmup=warmup).items()}


def interleaved_rounds(fns: dict[str, Callable[[], object]], rounds: int, *, calls: int = 1,
                       clock: Callable[[], float] = time.perf_counter, shuffle: bool = False,
                       warmup: int = 1) -> dict[str, list[float]]:
    """Seconds (by ``clock``) of every function in each of ``rounds`` interleaved rounds, after ``warmup`` calls each.

    A round calls each function ``calls`` times, call by call in alternation (A B C A B C ...; with ``shuffle``
    in an order drawn per round from ``random.Random(round)``), and records each function's total: load from
    other processes hits a round's calls alike, so per-round ratios (:func:`spread`) cancel most of it.
    ``clock=time.thread_time`` counts only this thread's CPU time (one torch thread: what other processes'
    load does not add, bar cache and frequency effects).
    """
    import random

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns)
        if shuffle:
            random.Random(r).shuffle(order)
        total = dict.fromkeys(fns, 0.0)
        for _ in range(calls):
            for name in order:
                t0 = clock()
                fns[name]()
                _sync()
                total[name] += clock() - t0
        for name in fns:
            out[name].append(total[name])
    return out


def spread(xs: list[float]) -> tuple[float, float, float]:
    """``(median, first quartile, third quartile)`` of ``xs`` (e.g. per-round ratios)."""
    if not xs:
        raise ValueError("xs: expected at least one value, got an empty list")
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return statistics.median(xs), q[0], q[2]


def verdict(ratio: tuple[float, float, float], target: float, below: bool) -> str:
    """``met`` / ``not met`` when the whole interquartile range of ``ratio = (median, q1, q3)`` (:func:`spread` of
    per-round ratios) is on one side of ``target`` (``below``: the target is an upper bound), else ``undecided``
    (the noise covers it)."""
    _, lo, hi = ratio
    ok, bad = (hi <= target, lo > target) if below else (lo >= target, hi < target)
    return "met" if ok else "not met" if bad else "undecided (the IQR straddles the target)"


def _child(fn, conn) -> None:
    base = _rss_mb()
    fn()
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - base)
    conn.close()


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_memory_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak memory (MiB) that one call of ``fn()`` adds."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, child))
    proc.start()
    value = parent.recv()
    proc.join()
    return float(value)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def _fresh_child() -> None:
    """Entry point of :func:`fresh_peak_memory_mb`'s child: one JSON request on stdin, one reply line."""
    import gc
    import importlib

    req = json.loads(sys.stdin.read())
    torch.set_num_threads(int(req.get("threads", 1)))
    module, name = req["target"].split(":")
    work = getattr(importlib.import_module(module), name)(**req["kwargs"])
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current resident set
        fh.write("5")
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    print("FRESH_PEAK " + json.dumps({"peak_mb": peak - base, "base_mb": base, "seconds": seconds, "result": result}))


def fresh_peak_memory_mb(target: str, kwargs: dict[str, Any] | None = None, *, threads: int = 1,
                         timeout: float = 600.0) -> dict[str, Any]:
    """Peak memory (MiB) that ``work()`` adds, where ``work = module.function(**kwargs)``, in a fresh
    interpreter; returns ``{"peak_mb", "base_mb", "seconds", "result"}`` (``result``: what
    ``work()`` returned, JSON-able)."""
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the proxnets package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    req = json.dumps({"target": target, "kwargs": kwargs or {}, "threads": threads})
    proc = subprocess.run([sys.executable, "-c", "from proxnets.utils.benchmark import _fresh_child; _fresh_child()"],
                          input=req, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FRESH_PEAK ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"fresh_peak_memory_mb({target}) failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("FRESH_PEAK "):])


def ratio_line(name: str, ours: Timing, baseline: Timing, baseline_name: str) -> str:
    """``"<name>: ours 1.2 ms, <baseline_name> 6.0 ms, speed-up 5.00x"``."""
    return (
        f"{name}: ours {ours.median * 1e3:.2f} ms, {baseline_name} {baseline.median * 1e3:.2f} ms, "
        f"speed-up {baseline.median / ours.median:.2f}x"
    )
