"""Benchmark: bSQH (L0) vs Adam, same run, ratios (``proxnets bench pmp``).

Same LeNet-5, same data (mnist5k), batch 64. Prints

- step time on a fixed batch, bSQH / Adam, measured *interleaved* (one bSQH step, one Adam step,
  repeated; the median of the paired ratios), so that a load change on a shared machine hits both;
  target <= 1.3. Also a no-grad forward alone (the trial forward's cost) and where a bSQH step's time
  goes (sweep, closed-form update, trial forward, bookkeeping);
- epoch time, bSQH / Adam, also interleaved (median of the paired per-epoch ratios), target <= 1.35;
- full batch: an iteration with the accepted trial's graph reused as the next sweep vs without;
- the test accuracy at equal density: bSQH with ``target_density``, Adam pruned to bSQH's density
  and fine-tuned as many epochs;
- structured sparsity: bSQH with the filter-level L0 (``structure="filter"``) priced by multiply-adds
  (:func:`~proxnets.pmp.sparsity.mac_param_groups`) at a target fraction of them,
  its zero filters removed (:func:`~proxnets.pmp.sparsity.remove_zero_filters`), the largest output
  difference, and the inference time dense vs exported, interleaved (median of the paired ratios).

- the trial forward's variants (before / now / ``inference_mode`` / ``channels_last`` / 2 threads) over an
  Adam step, in one shuffled interleaved run (:func:`trial_forward_variants`).

``--layer-pilot SEEDS`` runs only the layer-rule pilot (:func:`layer_pilot`) from which the suite's paired
design was fixed: seeds 10 .. 10 + SEEDS - 1 (not the claim's), one ``map+activation`` sweep from every state of a
20-sweep ``map`` reference run; per-state means and sds of the paired difference, and the per-seed means over the
suite's states.

``--structured-compare SEEDS`` runs only the structured comparison (:func:`structured_compare`): the
filter-level L0 bSQH against Adam + filter magnitude pruning (``filter_prune``) at bSQH's MAC fraction,
equal epochs, lr and pruning variant on validation, SEEDS seeds with intervals, exported inference time
per seed; the loop is the pmp suite's (``proxnets.pmp.experiments.structured``).

The floor of the step ratio is ``1 + trials x (no-grad forward / Adam step)``: bSQH's only work
beyond Adam's is its trial forward(s); the bookkeeping is the measured ratio minus that floor.

    python benchmarks/bench_pmp.py [--quick] [--structured-compare SEEDS | --layer-pilot SEEDS]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, evaluate, fit
from proxnets.pmp import LeNet5, mac_param_groups, remove_zero_filters, sparsity_report
from proxnets.pmp.baselines import magnitude_prune
from proxnets.pmp.experiments import _carve_validation, pick_adam_lr, structured
from proxnets.utils.stats import difference_interval, mean_interval
from proxnets.pmp.sparsity import weight_density
from proxnets.pmp.training import bsqh_optimizer, full_batch_bsqh, train_bsqh
from proxnets.report.suite import SuiteContext


def _closure(model, opt, x, y):
    def closure(backward: bool = True):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss.detach()

    return closure


def interleaved_step_ratio(x, y, repeats: int, target_density: float | None = None) -> dict[str, float]:
    """Median over steps of (bSQH step time / Adam step time), measured back to back, in mini-batch mode.

    Each step takes the next batch of 64 of ``(x, y)`` (cycling), the same batch for both optimizers: a
    new batch every step is mini-batch mode (the step on one fixed batch is a full-batch run on 64
    images, where the acceptance test rejects more). Wall time and the thread's CPU time
    (``time.thread_time``, one torch thread: what another session's load does not add); medians of the
    paired ratios. ``forward``: a no-grad forward + loss on the same batch (the trial forward's cost).
    """
    torch.manual_seed(0)
    mb, ma = LeNet5(), LeNet5()
    ob = bsqh_optimizer(mb, 1.0, record_history=False, target_density=target_density)
    oa = torch.optim.Adam(ma.parameters(), lr=1e-3)
    n = len(x) // 64
    t: dict[str, list[float]] = {k: [] for k in ("bw", "aw", "fw", "bc", "ac", "fc")}
    clock = time.thread_time
    for i in range(repeats + 5):
        j = (i % n) * 64
        xb, yb = x[j:j + 64], y[j:j + 64]
        cb, ca = _closure(mb, ob, xb, yb), _closure(ma, oa, xb, yb)
        w0, c0 = time.perf_counter(), clock()
        ob.step(cb)
        w1, c1 = time.perf_counter(), clock()
        oa.step(ca)
        w2, c2 = time.perf_counter(), clock()
        with torch.no_grad():
            ca(backward=False)
        w3, c3 = time.perf_counter(), clock()
        if i >= 5:  # warm-up
            for k, v in zip(t, (w1 - w0, w2 - w1, w3 - w2, c1 - c0, c2 - c1, c3 - c2)):
                t[k].append(v)
    med = statistics.median
    trials = (ob.run_state["accepted"] + ob.run_state["rejected"]) / max(ob.run_state["iteration"], 1)
    return dict(ratio=med([b / a for b, a in zip(t["bw"], t["aw"])]), bsqh=med(t["bw"]), adam=med(t["aw"]),
                forward=med(t["fw"]), cpu_ratio=med([b / a for b, a in zip(t["bc"], t["ac"])]),
                cpu_bsqh=med(t["bc"]), cpu_adam=med(t["ac"]), cpu_forward=med(t["fc"]), trials=trials)


def _act_then_pool(m, x):
    """LeNet-5 in the seed's order map -> ReLU -> pool (the no-grad forward before this session's change)."""
    x = m.pool(m.act(m.conv1(x)))
    x = m.pool(m.act(m.conv2(x)))
    return m.fc3(m.act(m.fc2(m.act(m.fc1(x.flatten(1))))))


def trial_forward_variants(x, y, repeats: int) -> dict[str, float]:
    """The trial forward's cost, per variant, over an Adam step's (thread CPU time): interleaved in a shuffled
    order, the median of the paired ratios (at 2 threads the main thread's CPU only: a lower bound). Variants: map -> ReLU -> pool (before), LeNet5's no-grad path pool -> ReLU (now), the same
    under ``torch.inference_mode``, channels_last memory, and 2 threads (Adam's step at 2 threads too)."""
    import random

    torch.manual_seed(0)
    m, ma = LeNet5(), LeNet5()
    mcl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    oa = torch.optim.Adam(ma.parameters(), lr=1e-3)

    def adam():
        oa.zero_grad(set_to_none=True)
        F.cross_entropy(ma(x), y).backward()
        oa.step()

    def ng(f):
        with torch.no_grad():
            return f()

    def im(f):
        with torch.inference_mode():
            return f()

    variants = {"act->pool (before)": lambda: ng(lambda: F.cross_entropy(_act_then_pool(m, x), y)),
                "pool->act (now)": lambda: ng(lambda: F.cross_entropy(m(x), y)),
                "pool->act + inference_mode": lambda: im(lambda: F.cross_entropy(m(x), y)),
                "pool->act + channels_last": lambda: ng(lambda: F.cross_entropy(mcl(xcl), y))}
    ref = float(variants["act->pool (before)"]())
    assert all(float(f()) == ref for f in variants.values())  # the same loss bit for bit
    threads = torch.get_num_threads()
    out = {}
    for nt in (threads, 2):
        torch.set_num_threads(nt)
        t: dict[str, list[float]] = {k: [] for k in ["adam", *variants]}
        for i in range(repeats + 5):
            keys = list(t)
            random.Random(i).shuffle(keys)
            for k in keys:
                t0 = time.thread_time()  # the thread's CPU time: wall time at load 7-10 scatters by 2-5x
                (adam if k == "adam" else variants[k])()
                if i >= 5:
                    t[k].append(time.thread_time() - t0)
        for k in variants:
            out[f"{k} [{nt} thr]"] = statistics.median([a / b for a, b in zip(t[k], t["adam"])])
        out[f"Adam step ms [{nt} thr]"] = statistics.median(t["adam"]) * 1e3
        if nt == 2 == threads:
            break
    torch.set_num_threads(threads)
    return out


def inference_ratio(dense, small, x, repeats: int) -> dict[str, float]:
    """Median over repeats of (exported / dense) no-grad forward time on ``x``, interleaved."""
    td, ts = [], []
    with torch.no_grad():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            dense(x)
            t1 = time.perf_counter()
            small(x)
            t2 = time.perf_counter()
            if i >= 3:
                td.append(t1 - t0)
                ts.append(t2 - t1)
    return dict(ratio=statistics.median([b / a for a, b in zip(td, ts)]), dense=statistics.median(td),
                exported=statistics.median(ts))


def structured_export(ds, density: float, epochs: int, repeats: int) -> dict[str, float]:
    """bSQH with the filter-level L0 priced by multiply-adds (``mac_param_groups``), target ``density``
    on the kept fraction of MACs; its zero filters removed; inference dense vs exported."""
    torch.manual_seed(0)
    model = LeNet5()
    r = train_bsqh(model, ds, 1.0, epochs=epochs, schedule="cosine", target_density=density,
                   param_groups=mac_param_groups(model, 1.0, ds.input_shape, structure="filter"), eval_every_epoch=False)
    model.eval()
    small = remove_zero_filters(model).eval()
    x = ds.x_test[:256]
    with torch.no_grad():
        diff = float((small(x) - model(x)).abs().max())
    t = inference_ratio(model, small, x, repeats)
    widths = (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features, small.fc2.out_features)
    rep = sparsity_report(model, ds.input_shape)["total"]
    return dict(density=r["density"], macs=rep["macs_sparse"] / rep["macs_dense"], test_acc=r["test_acc"],
                test_acc_exported=evaluate(small, ds.x_test, ds.y_test), max_diff=diff, widths=widths,
                params_dense=sum(p.numel() for p in model.parameters()),
                params_exported=sum(p.numel() for p in small.parameters()), **t)


def structured_compare(ds, seeds: list[int], mac_target: float, epochs: int, ft_epochs: int,
                       repeats: int) -> list[dict]:
    """Filter-level L0 bSQH vs Adam + filter magnitude pruning (``filter_prune``) at bSQH's MAC fraction.

    The suite's loop (:func:`proxnets.pmp.experiments.structured`), batch 64, on a validation split carved from
    the training images: Adam's lr picked on it as the suite's frontier picks it
    (:func:`~proxnets.pmp.experiments.pick_adam_lr`, first seed), the pruning variant as ``structured`` picks it.
    Each model's zero filters are then removed; inference time exported / Adam dense on 256 test images,
    interleaved, medians of the paired ratios.
    """
    part, val = _carve_validation(ds, 0)
    lr, by_lr = pick_adam_lr(part, val, seeds[0], epochs, 64)
    print(f"  Adam lr on validation: {lr:g} (" + ", ".join(f"{a:g}: {v:.4f}" for a, (v, _) in by_lr.items()) + ")")
    ctx = SuiteContext(out_dir=Path(tempfile.gettempdir()), size="quick", log=lambda m: print("  " + m))
    out = structured(ctx, part, val, seeds, epochs, ft_epochs, 64, dense={seeds[0]: by_lr[lr][1]}, lr=lr,
                     keep_models=True, mac_target=mac_target)
    print("  pruning variant on validation: " + ", ".join(f"{k} {v:.4f}" for k, v in out["variant_val"].items())
          + f" -> {out['variant']}")
    width = lambda m: (m.conv1.out_channels, m.conv2.out_channels, m.fc1.out_features, m.fc2.out_features)  # noqa: E731
    x = part.x_test[:256]
    rows = []
    for c in out["compare"]:
        m = out["_models"][c["seed"]]
        dense = m["dense"].eval()
        sb, sp = remove_zero_filters(m["bsqh"].eval()).eval(), remove_zero_filters(m["prune"].eval()).eval()
        tb, tp = inference_ratio(dense, sb, x, repeats), inference_ratio(dense, sp, x, repeats)
        rows.append(dict(c, acc_dense=evaluate(dense, part.x_test, part.y_test), widths_bsqh=width(sb),
                         widths_prune=width(sp), time_bsqh=tb["ratio"], time_prune=tp["ratio"],
                         train_s_bsqh=m["train_s"], lr=lr, variant=out["variant"]))
        r = rows[-1]
        print(f"  seed {r['seed']}: Adam dense {r['acc_dense']:.4f}; widths {r['widths_bsqh']} / {r['widths_prune']}; "
              f"exported inference / dense {r['time_bsqh']:.2f} / {r['time_prune']:.2f}")
    return rows


def step_breakdown(x, y, repeats: int) -> dict[str, float]:
    """Where a bSQH step's time goes (torch profiler, CPU time per step, ms)."""
    torch.manual_seed(0)
    model = LeNet5()
    opt = bsqh_optimizer(model, 1.0, record_history=False)
    closure = _closure(model, opt, x, y)
    for _ in range(3):
        opt.step(closure)
    from torch.profiler import ProfilerActivity, profile, record_function

    sections = {"sweep (forward+backward)": 0.0, "trial forward": 0.0, "step total": 0.0}
    orig_sweep, orig_trial = opt._sweep, opt._trial_loss

    def sweep(c):
        with record_function("sweep (forward+backward)"):
            return orig_sweep(c)

    def trial(c):
        with record_function("trial forward"):
            return orig_trial(c)

    opt._sweep, opt._trial_loss = sweep, trial
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            with record_function("step total"):
                opt.step(closure)
    for ev in prof.key_averages():
        if ev.key in sections:
            sections[ev.key] = ev.cpu_time_total / 1e3 / repeats
    sections["update + bookkeeping"] = (sections["step total"] - sections["sweep (forward+backward)"]
                                        - sections["trial forward"])
    return sections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="subset of 2000 images, 4 epochs")
    ap.add_argument("--target-density", type=float, default=0.1)
    ap.add_argument("--structured-density", type=float, default=0.3,
                    help="target fraction of multiply-adds of the filter-level L0 run whose zero filters are removed")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: steadier timings on a shared machine)")
    ap.add_argument("--layer-pilot", type=int, default=0, metavar="SEEDS",
                    help="only: the layer-rule pilot on seeds 10 .. 10 + SEEDS - 1 (the suite's design came from it)")
    ap.add_argument("--structured-compare", type=int, default=0, metavar="SEEDS",
                    help="only: filter-level bSQH vs Adam + filter magnitude pruning at equal MACs, this many seeds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset("mnist5k", seed=0)
    if args.quick:
        ds = ds.subset(2000, 1000, seed=0)
    if args.layer_pilot:
        layer_pilot(list(range(10, 10 + args.layer_pilot)))
        return
    if args.structured_compare:
        compare_main(ds, args)
        return
    epochs = 4 if args.quick else 10
    quiet = lambda s: None  # noqa: E731
    print(f"data: {ds}; LeNet-5; batch 64; {epochs} epochs; target density {args.target_density}; "
          f"{args.threads} thread(s)")

    xb, yb = ds.x_train[:64], ds.y_train[:64]
    for td in (None, args.target_density):
        s = interleaved_step_ratio(ds.x_train, ds.y_train, repeats=120 if args.quick else 400, target_density=td)
        floor = 1.0 + s["trials"] * s["cpu_forward"] / s["cpu_adam"]
        print(f"step time, mini-batch (a new batch of 64 each step, interleaved, medians; target_density={td}): "
              f"wall bSQH {s['bsqh'] * 1e3:.2f} ms, Adam {s['adam'] * 1e3:.2f} ms, ratio {s['ratio']:.3f} "
              f"(target <= 1.3); thread CPU bSQH {s['cpu_bsqh'] * 1e3:.2f} ms, Adam {s['cpu_adam'] * 1e3:.2f} ms, "
              f"ratio {s['cpu_ratio']:.3f}; a no-grad forward {s['cpu_forward'] / s['cpu_adam']:.3f} of Adam's step "
              f"(CPU); {s['trials']:.3f} trial forwards per step; floor 1 + trials x forward / Adam = {floor:.3f}, "
              f"the rest {s['cpu_ratio'] - floor:+.3f}")
    tv = trial_forward_variants(xb, yb, repeats=60 if args.quick else 200)
    print("trial forward / Adam step (no grad, batch 64, shuffled interleaving, medians of paired ratios; same loss "
          "bit for bit): " + ", ".join(f"{k} {v:.3f}" if "ms" not in k else f"{k} {v:.2f}" for k, v in tv.items()))
    br = step_breakdown(xb, yb, repeats=30)
    print("bSQH step breakdown (CPU ms per step, torch profiler): "
          + ", ".join(f"{k} {v:.2f}" for k, v in br.items()))

    cfg = TrainConfig(epochs=epochs, batch_size=64, seed=0, device="cpu", progress=False, schedule="cosine")
    torch.manual_seed(0)
    r = train_bsqh(LeNet5(), ds, 1.0, epochs=epochs, schedule="cosine", log=quiet, target_density=args.target_density)
    hist_b = r["history"]
    info = r["optimizer"].info()
    torch.manual_seed(0)
    dense = LeNet5()
    hist_a = fit(dense, ds, TrainConfig(**{**cfg.to_dict(), "optimizer": "adam", "lr": 1e-3}), log=quiet).history
    # epoch time interleaved (one bSQH epoch, one Adam epoch, repeated; no evaluation), so that a
    # change of load on a shared machine hits both; the median of the paired ratios
    torch.manual_seed(0)
    mb, ma = LeNet5(), LeNet5()
    ob = bsqh_optimizer(mb, 1.0, target_density=args.target_density)
    oa = torch.optim.Adam(ma.parameters(), lr=1e-3)
    ratios, tb, ta, cpu = [], [], [], []
    for e in range(2 * epochs):
        one = TrainConfig(epochs=1, batch_size=64, seed=e, device="cpu", progress=False, eval_every_epoch=False)
        t0, c0 = time.perf_counter(), time.thread_time()
        fit(mb, ds, one, optimizer=ob, log=quiet)
        t1, c1 = time.perf_counter(), time.thread_time()
        fit(ma, ds, one, optimizer=oa, log=quiet)
        t2, c2 = time.perf_counter(), time.thread_time()
        tb.append(t1 - t0)
        ta.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
        cpu.append((c1 - c0) / (c2 - c1))
    print(f"epoch time (interleaved, medians of {2 * epochs}, no evaluation, target_density={args.target_density}): "
          f"bSQH {statistics.median(tb):.3f} s, Adam {statistics.median(ta):.3f} s, ratio {statistics.median(ratios):.3f}, "
          f"thread CPU ratio {statistics.median(cpu):.3f} (target <= 1.35); in the training "
          f"run: bSQH acceptance ratio {info.acceptance_ratio:.3f}, "
          f"{(info.accepted + info.rejected) / max(info.iterations, 1):.2f} trial forwards per step")

    x, y = ds.x_train[:1000], ds.y_train[:1000]
    times = {}
    for reuse in (False, True):
        torch.manual_seed(0)
        fb = full_batch_bsqh(LeNet5(), x, y, 1.0, iterations=12, audit=False, reuse_trial=reuse, eps=1.0,
                             eps_min=1e-6, eta=0.1)
        t = fb["times"]
        times[reuse] = (t[-1] - t[1]) / (len(t) - 2)  # per iteration, the first excluded
    print(f"full batch (1000 images): {times[False] * 1e3:.1f} ms per iteration without reuse, "
          f"{times[True] * 1e3:.1f} ms with the accepted trial's graph reused (ratio {times[True] / times[False]:.2f})")

    ex = structured_export(ds, args.structured_density, epochs, repeats=40 if args.quick else 200)
    print(f"filter-level L0 priced by multiply-adds (mac_param_groups, structure='filter', target MAC fraction "
          f"{args.structured_density}): MAC fraction {ex['macs']:.3f}, weight density {ex['density']:.3f}, widths (6, 16, 120, 84) -> {ex['widths']}, parameters {ex['params_dense']} -> "
          f"{ex['params_exported']}; largest output difference exported vs sparse {ex['max_diff']:.2g}; test acc "
          f"{ex['test_acc']:.4f} / exported {ex['test_acc_exported']:.4f}; inference on 256 images (no grad, "
          f"interleaved, medians): dense {ex['dense'] * 1e3:.2f} ms, exported {ex['exported'] * 1e3:.2f} ms, "
          f"ratio exported/dense {ex['ratio']:.2f}")

    density = r["density"]
    pruned = magnitude_prune(copy.deepcopy(dense), density)
    fit(pruned, ds, TrainConfig(**{**cfg.to_dict(), "optimizer": "adam", "lr": 3e-4, "epochs": 1}), log=quiet)
    acc_b, acc_a = hist_b[-1]["test_acc"], hist_a[-1]["test_acc"]
    acc_p = evaluate(pruned, ds.x_test, ds.y_test)
    print(f"final test accuracy: bSQH {acc_b:.4f} at density {density:.3f} ({r['iterations']} steps), Adam dense "
          f"{acc_a:.4f}; Adam + magnitude pruning to density {weight_density(pruned):.3f} + 1 epoch fine-tuning "
          f"{acc_p:.4f} (difference bSQH - pruning {acc_b - acc_p:+.4f}; one seed, no fine-tuning for bSQH)")


def layer_pilot(seeds: list[int], sweeps: int = 20) -> None:
    """The pilot of the suite's layer-rule design: every state of a ``sweeps``-sweep reference run, ``seeds``."""
    from proxnets.pmp.experiments import LAYER_FIRST, LAYER_SWEEPS, layer_rules

    ds = load_dataset("mnist5k", seed=0)
    lsub = ds.subset(600, 1000, seed=0).subset(256, 10, seed=0)  # the suite's layer subset at quick size
    ctx = SuiteContext(out_dir=Path(tempfile.mkdtemp()), size="quick", log=lambda s: None)
    c0 = time.process_time()
    out = layer_rules(ctx, lsub, seeds, sweeps, 0, 1)
    print(f"layer pilot: {len(lsub.x_train)} images, seeds {seeds}, one map+activation sweep from each of the "
          f"{sweeps} states of a map run; {time.process_time() - c0:.1f} s CPU")
    for t in range(sweeps):
        d = [r["states"][t]["diff"] for r in out.values() if len(r["states"]) > t]
        cn = statistics.mean(r["states"][t]["cpu_nl"] for r in out.values() if len(r["states"]) > t)
        print(f"  state {t:2d}: J_after(map+activation) - J_after(map) mean {statistics.mean(d):+.4f}, sd "
              f"{statistics.stdev(d):.4f}; map+activation sweep {cn:.3f} s CPU")
    means = [statistics.mean(q["diff"] for q in r["states"][LAYER_FIRST:LAYER_SWEEPS]) for r in out.values()]
    print(f"per-seed means over states {LAYER_FIRST}..{LAYER_SWEEPS - 1} (the suite's): "
          + ", ".join(f"{m:+.4f}" for m in means)
          + f"; mean {statistics.mean(means):+.4f}, sd {statistics.stdev(means):.4f}")


def compare_main(ds, args) -> None:
    epochs, ft = (8, 2) if args.quick else (10, 2)
    seeds = list(range(args.structured_compare))
    print(f"structured comparison: {ds}, validation = a fifth of the training images; LeNet-5; {epochs} + {ft} "
          f"epochs each; MAC target {args.structured_density}; seeds {seeds}; {args.threads} thread(s)")
    t0 = time.perf_counter()
    rows = structured_compare(ds, seeds, args.structured_density, epochs, ft, repeats=40 if args.quick else 100)
    ab, ap_ = [r["acc_bsqh"] for r in rows], [r["acc_prune"] for r in rows]
    if len(rows) >= 2:  # an interval needs two seeds
        line = lambda v: "{:.4f} [{:.4f}, {:.4f}]".format(*mean_interval(v))  # noqa: E731
        print(f"test accuracy (mean, 95% interval over {len(rows)} seeds): bSQH {line(ab)}, Adam + filter pruning + ft "
              f"{line(ap_)}; difference bSQH - pruning " + "{:+.4f} [{:+.4f}, {:+.4f}]".format(*difference_interval(ab, ap_)))
    else:
        print(f"test accuracy (one seed, no interval): bSQH {ab[0]:.4f}, Adam + filter pruning + ft {ap_[0]:.4f}; "
              f"difference bSQH - pruning {ab[0] - ap_[0]:+.4f}")
    print("exported inference time / dense (median of interleaved pairs, per seed): bSQH "
          + ", ".join(f"{r['time_bsqh']:.2f}" for r in rows) + "; pruning " + ", ".join(f"{r['time_prune']:.2f}" for r in rows)
          + f"; MAC fractions bSQH {[round(r['macs_bsqh'], 4) for r in rows]}, pruning "
          f"{[round(r['macs_prune'], 4) for r in rows]}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
