"""Benchmark: bSQH (L0) vs Adam (dense) vs Adam + global magnitude pruning + fine-tuning.

Same LeNet-5-style model, same data (mnist5k), batch 64, one run. Prints

- the time of one optimizer step on a fixed batch (median of repeats) and the epoch time (median
  over epochs), bSQH / Adam (target: <= 1.5);
- the wall time to reach a target test accuracy (training time only, evaluation excluded);
- the test accuracy at equal sparsity: bSQH's density, Adam pruned to it and fine-tuned.

    python benchmarks/bench_pmp.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, fit
from proxnets.pmp import LeNet5
from proxnets.pmp.baselines import magnitude_prune
from proxnets.pmp.sparsity import weight_density
from proxnets.pmp.training import bsqh_optimizer, train_bsqh
from proxnets.utils.benchmark import Timing, time_fn


def step_time(make_opt, x, y, repeats: int) -> Timing:
    torch.manual_seed(0)
    model = LeNet5()
    opt = make_opt(model)

    def closure(backward: bool = True):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss.detach()

    return time_fn(lambda: opt.step(closure), warmup=3, repeats=repeats)


def time_to(history: list[dict], target: float) -> float:
    """Training seconds until the first epoch whose test accuracy reaches ``target`` (inf if never)."""
    total = 0.0
    for rec in history:
        total += rec["epoch_time"]
        if rec["test_acc"] >= target:
            return total
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="subset of 2000 images, 4 epochs")
    ap.add_argument("--rho", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: steadier timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset("mnist5k", seed=0)
    if args.quick:
        ds = ds.subset(2000, 1000, seed=0)
    epochs, target = (4, 0.8) if args.quick else (10, 0.9)
    quiet = lambda s: None  # noqa: E731
    print(f"data: {ds}; LeNet-5; batch 64; {epochs} epochs; rho={args.rho}; target accuracy {target}; "
          f"{args.threads} thread(s)")

    xb, yb = ds.x_train[:64], ds.y_train[:64]
    t_b = step_time(lambda m: bsqh_optimizer(m, args.rho), xb, yb, repeats=30)
    t_a = step_time(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), xb, yb, repeats=30)
    print(f"step time (batch 64): bSQH {t_b}, Adam {t_a}, ratio bSQH/Adam {t_b.median / t_a.median:.2f} "
          "(target <= 1.5)")

    cfg = TrainConfig(epochs=epochs, batch_size=64, seed=0, device="cpu", progress=False, schedule="cosine")
    torch.manual_seed(0)
    r = train_bsqh(LeNet5(), ds, args.rho, epochs=epochs, schedule="cosine", log=quiet)
    hist_b = r["history"]
    info = r["optimizer"].info()
    torch.manual_seed(0)
    dense = LeNet5()
    hist_a = fit(dense, ds, TrainConfig(**{**cfg.to_dict(), "optimizer": "adam", "lr": 1e-3}), log=quiet).history
    med = lambda h: sorted(e["epoch_time"] for e in h)[len(h) // 2]  # noqa: E731
    print(f"epoch time (median of {epochs}): bSQH {med(hist_b):.3f} s, Adam {med(hist_a):.3f} s, "
          f"ratio {med(hist_b) / med(hist_a):.2f}; bSQH acceptance ratio {info.acceptance_ratio:.3f}, "
          f"{(info.accepted + info.rejected) / max(info.iterations, 1):.2f} trial forwards per step")

    density = r["density"]
    t0 = time.perf_counter()
    pruned = magnitude_prune(copy.deepcopy(dense), density)
    hist_p = fit(pruned, ds, TrainConfig(**{**cfg.to_dict(), "optimizer": "adam", "lr": 3e-4, "epochs": 1}),
                 log=quiet).history
    t_prune = time.perf_counter() - t0
    acc_b, acc_a, acc_p = hist_b[-1]["test_acc"], hist_a[-1]["test_acc"], hist_p[-1]["test_acc"]
    print(f"time to {target:.0%} test accuracy: bSQH {time_to(hist_b, target):.2f} s, "
          f"Adam dense {time_to(hist_a, target):.2f} s")
    print(f"final test accuracy: bSQH {acc_b:.4f} at density {density:.3f} "
          f"({r['iterations']} steps), Adam dense {acc_a:.4f}")
    print(f"equal sparsity (density {weight_density(pruned):.3f}): bSQH {acc_b:.4f} vs Adam + magnitude pruning "
          f"+ 1 epoch fine-tuning {acc_p:.4f} (difference {acc_b - acc_p:+.4f}; Adam + pruning total time "
          f"{sum(e['epoch_time'] for e in hist_a) + t_prune:.2f} s vs bSQH {sum(e['epoch_time'] for e in hist_b):.2f} s)")


if __name__ == "__main__":
    main()
