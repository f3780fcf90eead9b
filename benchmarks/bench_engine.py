"""Engine overhead: `proxnets.engine.fit` against the plain PyTorch loop a user would write.

Same model (a small CNN), data (mnist5k train split), batch size, optimizer and number of epochs,
timed in the same run; prints medians and the ratio (fit / plain). fit also writes metrics,
checkpoints every epoch and evaluates on the test split each epoch; the plain loop does none of
that, so the ratio is an upper bound on the engine's cost.

    python benchmarks/bench_engine.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, fit
from proxnets.utils.benchmark import time_interleaved


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),   # (B, 16, 12, 12)
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 4, 4)
        nn.Flatten(), nn.Linear(512, 10),
    )


def plain_loop(ds, epochs: int, batch_size: int) -> None:
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    n = len(ds.x_train)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(math.ceil(n / batch_size)):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
            loss.backward()
            opt.step()


def engine_loop(ds, epochs: int, batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, progress=False)
        fit(small_cnn(), ds, cfg, run_dir=d, log=lambda m: None)


def engine_loop_bare(ds, epochs: int, batch_size: int) -> None:
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, progress=False, eval_every_epoch=False)
    fit(small_cnn(), ds, cfg, log=lambda m: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    ds = load_dataset("mnist5k", n_train=1000 if args.quick else 4000, n_test=200 if args.quick else 1000)
    epochs, bs = 1, 128
    repeats = 3 if args.quick else 5
    t = time_interleaved({"plain": lambda: plain_loop(ds, epochs, bs), "fit": lambda: engine_loop(ds, epochs, bs),
                          "bare": lambda: engine_loop_bare(ds, epochs, bs)}, warmup=1, repeats=repeats)
    plain, ours, bare = t["plain"], t["fit"], t["bare"]
    print(f"torch threads: {torch.get_num_threads()}, train images: {len(ds.x_train)}, epochs: {epochs}, batch: {bs}")
    print(f"plain PyTorch loop: {plain}")
    print(f"proxnets fit (+ eval, metrics, checkpoint): {ours}")
    print(f"proxnets fit, loop only (no eval, no run dir): {bare}")
    print(f"ratio fit (loop only) / plain: {bare.median / plain.median:.3f}x")
    print(f"ratio fit (+ eval, metrics, checkpoint) / plain (medians, interleaved runs): {ours.median / plain.median:.3f}x")


if __name__ == "__main__":
    main()
