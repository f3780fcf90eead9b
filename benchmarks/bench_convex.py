"""Peak memory and wall time: DCCNN (dual, streamed features) vs CCNN (primal, cached features).

Both solve the same regularized program (same features, same lam, same iteration budget and gap
tolerance) on mnist5k for n = 1000, 2000, 4000 training images; each fit runs once in a forked
child, which reports the peak memory it adds (peak resident set), its wall time, the duality gap
reached and the test error. Runs are single: a full fit takes minutes on 2 shared cores. Two time
ratios: the fixed-pass one (both solvers run the same budget) and the same-gap one (DCCNN's CPU time
until its certified gap first reaches the cached primal's final certified gap, :func:`cpu_to_reach`,
against the primal's whole fit).

    python benchmarks/bench_convex.py [--quick] [--json PATH] [--sizes N ...] [--max-iter T] [--cache-mb MB] [--fresh-memory]
    python benchmarks/bench_convex.py --exact [--iters 1]   # the kernel-only dual vs cached CCNN, n = 250, 500, 1000

``--exact``: DCCNN(loss="hinge", feature_map="exact") (kernel blocks streamed) against CCNN with
cached random features (D = 256) on the same patches (5x5, stride 2, pool 2: P = 36), 10 classes
one-vs-rest, a fixed number of iterations each, each fit in a fresh interpreter
(:func:`proxnets.convex.experiments.exact_bench_job`): peak memory added and seconds per iteration.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from proxnets.convex.experiments import rff_bench_estimator
from proxnets.convex.sources import fixed_mmap_threshold
from proxnets.data import load_dataset
from proxnets.utils.benchmark import fresh_peak_memory_mb, peak_memory_mb
from proxnets.utils.io import read_json, write_json



def timed_records(start: float) -> None:
    """From now on every solver trace (:class:`~proxnets.convex.primal.GapTrace`) keeps ``cpu_marks``: the
    process CPU seconds since ``start`` at each iteration it records (in a benchmark child only)."""
    from proxnets.convex.primal import GapTrace

    record = GapTrace.record

    def timed(self, *args, **kwargs):
        out = record(self, *args, **kwargs)
        self.__dict__.setdefault("cpu_marks", []).append(time.process_time() - start)
        return out

    GapTrace.record = timed


def cpu_to_reach(gaps: list[float], marks: list[float], total_cpu: float, target: float) -> tuple[int | None, float | None]:
    """``(pass, CPU s)``: the first pass whose certified gap is ``<= target`` and the fit's CPU time had the
    solver stopped there: CPU up to that pass's record (featurization fit and earlier passes included)
    plus everything the fit did after its solver's last record (recovery, head). ``(None, None)`` if no
    pass reaches ``target``."""
    if len(gaps) != len(marks) or not gaps:
        raise ValueError(f"gaps, marks: expected two lists of one length >= 1, got lengths {len(gaps)} and {len(marks)}")
    reach = next((t for t, g in enumerate(gaps) if g <= target), None)
    if reach is None:
        return None, None
    return reach + 1, marks[reach] + (total_cpu - marks[-1])


def run(n: int, max_iter: int, data, tmp: Path, cache_mb: float = 0.0, fresh: bool = False) -> dict:
    """One fit per method in a forked child: peak memory it adds, its wall time, its test error.
    ``cache_mb``: DCCNN keeps that many MiB of feature chunks between passes (the same iterates).
    ``fresh``: also each fit in a fresh interpreter (``*_fresh_mem_mb``, ``*_fresh_cpu_s``)."""
    sub = data.subset(n_train=n, n_test=None, seed=0) if n < len(data.y_train) else data
    row = {"n": n}
    for name in ("dccnn", "ccnn_cached"):
        out = tmp / f"{name}_{n}.json"

        def fit(name=name, out=out) -> None:
            t0, c0 = time.perf_counter(), time.process_time()
            timed_records(c0)
            est = rff_bench_estimator(name, max_iter, cache_mb).fit(sub.x_train, sub.y_train)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0  # CPU: one thread, less load-dependent
            err = 100 * (1 - est.score(sub.x_test, sub.y_test))
            gaps = est.trace_.residuals
            write_json(out, {"time_s": seconds, "cpu_s": cpu, "test_err": err, "gap": est.trace_.gap, "iters": est.trace_.iterations,
                             "gaps": gaps, "cpu_marks": est.trace_.cpu_marks})

        row[f"{name}_mem_mb"] = peak_memory_mb(fit)
        for key, v in read_json(out).items():
            row[f"{name}_{key}"] = v
    if fresh:  # the same fits again, each in a fresh interpreter: peak memory without the fork's library-page faults
        for name in ("dccnn", "ccnn_cached"):
            res = fresh_peak_memory_mb("proxnets.convex.experiments:rff_bench_job",
                                       dict(n=n, method=name, max_iter=max_iter, cache_mb=cache_mb), timeout=3600.0)
            row[f"{name}_fresh_mem_mb"], row[f"{name}_fresh_cpu_s"] = res["peak_mb"], res["result"]["cpu_s"]
    return row


def main_exact(iters: int, json_path: str | None, sizes: tuple[int, ...] = (250, 500, 1000)) -> None:
    """Each fit in a fresh interpreter (``fresh_peak_memory_mb``: VmHWM reset, minus VmRSS before the
    fit; a forked child would count the library pages it faults in, a ~30 MiB floor for both methods).
    Beside CCNN's measured peak, the size of its cached tensor ``Q (n, P, D)`` alone (``n P D`` floats):
    the part of the baseline's peak that no implementation of a cached primal can avoid (the rest are
    its solver's temporaries, e.g. the step estimate's 512-image subsample)."""
    rows = []
    for n in sizes:
        r = {"n": n}
        for name in ("exact", "ccnn_cached"):
            res = fresh_peak_memory_mb("proxnets.convex.experiments:exact_bench_job", dict(n=n, method=name, iters=iters),
                                       timeout=3600.0)
            r[f"{name}_mem_mb"] = res["peak_mb"]
            r.update({f"{name}_{k}": v for k, v in res["result"].items()})
        rows.append(r)
        print(f"n={n}: exact dual {r['exact_mem_mb']:.1f} MiB {r['exact_time_s'] / r['exact_iters']:.1f} s/iter | "
              f"CCNN cached {r['ccnn_cached_mem_mb']:.1f} MiB {r['ccnn_cached_time_s'] / r['ccnn_cached_iters']:.1f} s/iter | "
              f"memory ratio {r['ccnn_cached_mem_mb'] / max(r['exact_mem_mb'], 1e-9):.2f}x | the cached tensor alone "
              f"{r['ccnn_cached_cache_mb']:.1f} MiB: {r['ccnn_cached_cache_mb'] / max(r['exact_mem_mb'], 1e-9):.2f}x", flush=True)
    if json_path:
        write_json(json_path, {"rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 500, 1000 and 30 iterations")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--exact", action="store_true", help="the kernel-only dual vs cached CCNN at n = 250, 500, 1000")
    ap.add_argument("--iters", type=int, default=1, help="iterations per fit with --exact")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="training sizes (default 1000 2000 4000; --quick 500 1000; --exact 250 500 1000)")
    ap.add_argument("--max-iter", type=int, default=None, help="iteration budget of both solvers (default 150; --quick 30)")
    ap.add_argument("--fresh-memory", action="store_true",
                    help="also run each fit in a fresh interpreter (peak memory without a forked child's library-page faults)")
    ap.add_argument("--cache-mb", type=float, default=0.0, help="MiB of feature chunks DCCNN keeps between passes")
    args = ap.parse_args()
    if args.exact:
        return main_exact(args.iters, args.json, tuple(args.sizes or (250, 500, 1000)))
    torch.set_num_threads(1)  # shared 2-core machine: one thread per process, both methods alike
    fixed_mmap_threshold()  # peak RSS = live memory, not allocator history (both methods alike)
    data = load_dataset("mnist5k")
    sizes, max_iter = ((500, 1000), 30) if args.quick else ((1000, 2000, 4000), 150)
    sizes, max_iter = tuple(args.sizes or sizes), args.max_iter or max_iter
    # warm-up in the parent: libraries and solver code paths loaded before any child is measured
    small = data.subset(n_train=100, n_test=None, seed=0)
    for name in ("dccnn", "ccnn_cached"):
        rff_bench_estimator(name, 2).fit(small.x_train, small.y_train)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_convex_"))
    for n in sizes:
        t0 = time.perf_counter()
        row = run(n, max_iter, data, tmp, args.cache_mb, args.fresh_memory)
        rows.append(row)
        print(f"n={n}: DCCNN {row['dccnn_mem_mb']:.1f} MiB {row['dccnn_time_s']:.1f} s ({row['dccnn_cpu_s']:.1f} s CPU) err {row['dccnn_test_err']:.2f}% "
              f"gap {row['dccnn_gap']:.2e} | CCNN cached {row['ccnn_cached_mem_mb']:.1f} MiB {row['ccnn_cached_time_s']:.1f} s ({row['ccnn_cached_cpu_s']:.1f} s CPU) "
              f"err {row['ccnn_cached_test_err']:.2f}% gap {row['ccnn_cached_gap']:.2e} "
              f"| memory ratio {row['ccnn_cached_mem_mb'] / max(row['dccnn_mem_mb'], 1e-9):.2f}x, "
              f"time ratio (dual/primal) {row['dccnn_time_s'] / row['ccnn_cached_time_s']:.2f}x  [{time.perf_counter() - t0:.0f} s]",
              flush=True)
        if args.fresh_memory:
            print(f"  fresh interpreters: DCCNN {row['dccnn_fresh_mem_mb']:.1f} MiB ({row['dccnn_fresh_cpu_s']:.1f} s CPU) | CCNN cached "
                  f"{row['ccnn_cached_fresh_mem_mb']:.1f} MiB ({row['ccnn_cached_fresh_cpu_s']:.1f} s CPU) | memory ratio "
                  f"{row['ccnn_cached_fresh_mem_mb'] / max(row['dccnn_fresh_mem_mb'], 1e-9):.2f}x, CPU ratio "
                  f"{row['dccnn_fresh_cpu_s'] / row['ccnn_cached_fresh_cpu_s']:.2f}x", flush=True)
        reach, reach_cpu = cpu_to_reach(row["dccnn_gaps"], row["dccnn_cpu_marks"], row["dccnn_cpu_s"], row["ccnn_cached_gap"])
        row["dccnn_reach_pass"], row["dccnn_reach_cpu_s"] = reach, reach_cpu
        row["same_gap_cpu_ratio"] = reach_cpu / row["ccnn_cached_cpu_s"] if reach_cpu is not None else None
        same = f"{row['same_gap_cpu_ratio']:.2f}x" if reach is not None else "not reached"
        print(f"  DCCNN reaches CCNN's final gap {row['ccnn_cached_gap']:.2e} after {reach} of {row['dccnn_iters']} passes "
              f"(CCNN: {row['ccnn_cached_iters']}), {reach_cpu or float('nan'):.1f} s CPU: same-gap CPU ratio {same} "
              f"(fixed-pass {row['dccnn_cpu_s'] / row['ccnn_cached_cpu_s']:.2f}x)", flush=True)
    last = rows[-1]
    ratio = last["ccnn_cached_mem_mb"] / max(last["dccnn_mem_mb"], 1e-9)
    dmem = [r["dccnn_mem_mb"] for r in rows]
    growth = ((dmem[-1] - dmem[0]) / max(dmem[0], 1e-9) / ((rows[-1]["n"] - rows[0]["n"]) / rows[0]["n"])
              if len(rows) > 1 else float("nan"))  # one size (--sizes N): no growth
    err_diff = abs(last["dccnn_test_err"] - last["ccnn_cached_test_err"])
    print(f"memory at n={last['n']}: DCCNN {last['dccnn_mem_mb']:.1f} MiB vs cached primal {last['ccnn_cached_mem_mb']:.1f} MiB: "
          f"{ratio:.2f}x lower (target >= 5x: {'met' if ratio >= 5 else 'NOT met'})")
    print(f"DCCNN memory growth relative to linear in n: {growth:.2f} (<= 1 means at most linear)")
    print(f"test error difference at n={last['n']}: {err_diff:.2f} points (target <= 0.5: {'met' if err_diff <= 0.5 else 'NOT met'})")
    tratio = last["dccnn_time_s"] / last["ccnn_cached_time_s"]
    cratio = last["dccnn_cpu_s"] / last["ccnn_cached_cpu_s"]
    print(f"time at n={last['n']}: DCCNN {tratio:.2f}x the cached primal's wall time (target <= 3x: {'met' if tratio <= 3 else 'NOT met'}), "
          f"{cratio:.2f}x its CPU time ({last['dccnn_cpu_s']:.1f} vs {last['ccnn_cached_cpu_s']:.1f} s), DCCNN cache {args.cache_mb:g} MiB, "
          f"load {os.getloadavg()[0]:.1f}")
    sratio = last["same_gap_cpu_ratio"]
    print(f"same-gap time at n={last['n']} (DCCNN's CPU to reach the cached primal's final certified gap, each solver's "
          f"own certificate, vs the primal's whole fit): "
          + (f"{sratio:.2f}x (target <= 3x: {'met' if sratio <= 3 else 'NOT met'})" if sratio is not None else "not reached")
          + f"; the fixed-pass CPU ratio above is {cratio:.2f}x")
    if args.json:
        write_json(args.json, {"rows": rows, "memory_ratio": ratio, "memory_growth": growth, "err_diff": err_diff,
                               "time_ratio": tratio, "cpu_ratio": cratio, "same_gap_cpu_ratio": sratio, "cache_mb": args.cache_mb, "max_iter": max_iter})


if __name__ == "__main__":
    main()
