"""Thread settings for small models: OMP_WAIT_POLICY and torch's thread count (README "Performance").

One training step of a small CNN (batch 64 of 1x28x28, SGD), median of 30 steps after 10 warm-up
steps, in a fresh interpreter per setting (OMP_WAIT_POLICY is read when torch loads OpenMP), the
four settings interleaved over ``--rounds`` rounds so that a change of machine load hits them all.
``--busy N`` runs N CPU-bound processes meanwhile: a shared machine, reproducibly.

    python benchmarks/bench_threads.py [--rounds 3] [--busy 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SETTINGS = [("unset", 0), ("unset", 1), ("PASSIVE", 0), ("PASSIVE", 1)]  # threads 0: torch's default


def child(threads: int) -> None:
    import torch
    from torch import nn

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 5), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10))  # (B, 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    times = []
    for _ in range(40):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    print(torch.get_num_threads(), 1000 * statistics.median(times[10:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound processes running meanwhile")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        measure(args)
    finally:
        for b in busy:
            b.kill()


def measure(args: argparse.Namespace) -> None:
    results: dict[tuple[str, int], list[float]] = {s: [] for s in SETTINGS}
    threads_of: dict[tuple[str, int], int] = {}
    for _ in range(args.rounds):
        for policy, threads in SETTINGS:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "unset":
                env["OMP_WAIT_POLICY"] = policy
            out = subprocess.run([sys.executable, __file__, "--child", str(threads)], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            threads_of[(policy, threads)] = int(out[0])
            results[(policy, threads)].append(float(out[1]))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    best = min(statistics.median(v) for v in results.values())
    print(f"{os.cpu_count()} cores, 1-min load {load:.1f}, {args.busy} busy processes, {args.rounds} rounds")
    for (policy, threads), v in results.items():
        m = statistics.median(v)
        print(f"OMP_WAIT_POLICY={policy:<8} threads={threads_of[(policy, threads)]}: {m:8.2f} ms/step "
              f"(rounds {', '.join(f'{t:.1f}' for t in v)}), {m / best:5.1f}x the fastest")


if __name__ == "__main__":
    main()
