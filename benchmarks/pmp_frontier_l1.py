"""The pmp frontier at quick data size with the "L1 then prune" baseline (not in the suite's quick budget).

    PYTHONPATH=src python benchmarks/pmp_frontier_l1.py [--seeds 3] [--out runs/bench/pmp-l1] [--threads 1]

The suite's quick frontier (``proxnets reproduce pmp --quick``: LeNet-5, mnist5k, 1600 training / 400 validation
images, 1000 test + 2000 held-out images, 8 + 2 epochs, targets 0.4 / 0.2 / 0.1; the same seeds, data and code,
``experiments.frontier``) plus :func:`proxnets.pmp.experiments.l1_prune`, which the suite runs at size full only:
L1-prox SGD at the strength whose training run reaches each target density (``strength_search``), global
magnitude pruning to bSQH's measured density, the same fine-tuning epochs. Prints the accuracy-vs-density table
with 95% intervals and paired differences; writes ``frontier_l1.json``, ``frontier_l1.png`` (every seed, and
every unpruned L1 probe) and ``frontier_l1.md`` under ``--out``. No claim: figures only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from proxnets.data import load_dataset
from proxnets.engine.plotting import Panel, multi_plot
from proxnets.pmp.experiments import (
    FRONTIER_INTERVAL_COLUMNS,
    _frontier_rows,
    frontier,
    frontier_budget,
    frontier_data,
    frontier_interval_rows,
    frontier_series,
)
from proxnets.report.suite import SuiteContext
from proxnets.utils.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (the suite's grid seeds: 3)")
    parser.add_argument("--out", type=Path, default=Path("runs") / "bench" / "pmp-l1")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error(f"--seeds: expected an integer >= 2 (intervals), got {args.seeds}")
    torch.set_num_threads(args.threads)
    ctx = SuiteContext(out_dir=args.out, size="quick", log=lambda m: print(f"[pmp-l1] {m}", flush=True))
    ds, val = frontier_data(ctx, load_dataset("mnist5k", seed=ctx.seed))
    b = frontier_budget(ctx)
    seeds = list(range(args.seeds))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fr = frontier(ctx, ds, val, seeds, b["rhos"], b["epochs"], b["ft_epochs"], b["batch"], True, l1=True)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rows = frontier_interval_rows(fr, b["rhos"])
    md = ["| " + " | ".join(FRONTIER_INTERVAL_COLUMNS) + " |", "|" + "---|" * len(FRONTIER_INTERVAL_COLUMNS)]
    md += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    md += ["", "| method | target | density | test acc | val acc | |", "|---|---|---|---|---|---|"]
    md += ["| " + " | ".join(str(v) for v in r) + " |" for r in _frontier_rows(fr, b["rhos"], None)]
    md += ["", "| seed | target | lr | strength | probes | L1 density (in band) | density | test acc | val acc |",
           "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {p['seed']} | {p['rho']:g} | {p['lr']:g} | {p['strength']:.3g} | {p['probes']} | "
           f"{p['l1_density']:.3f} ({'yes' if p['within'] else 'no'}) | {p['density']:.4f} | {p['test_acc']:.4f} | "
           f"{p['val_acc']:.4f} |" for p in fr["l1_prune"]]
    md += ["", f"lr on validation by target (first seed, after pruning and fine-tuning): {fr['l1_lr_val']}; "
               f"Adam lr {fr['adam_lr']:g}; {len(ds.x_train)} training / {len(val[0])} validation / "
               f"{len(ds.x_test)} test images; {cpu:.1f} s CPU, {wall:.1f} s wall ({torch.get_num_threads()} thread)"]
    text = "\n".join(md)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier_l1.md").write_text(text + "\n")
    write_json(args.out / "frontier_l1.json", dict({k: v for k, v in fr.items() if not k.startswith("_")},
                                                   cpu_s=cpu, wall_s=wall, seeds=seeds, budget=b))
    multi_plot(args.out / "frontier_l1.png", [Panel(series=frontier_series(fr), kind="scatter",
                                                    xlabel="fraction of nonzero weights", ylabel="test accuracy",
                                                    title="accuracy vs density (every seed)")])


if __name__ == "__main__":
    main()
