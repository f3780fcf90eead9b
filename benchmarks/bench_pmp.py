"""Benchmark: bSQH (L0) vs Adam, same run, ratios (``proxnets bench pmp``).

Same LeNet-5, same data (mnist5k), batch 64, thread CPU time. Every timing is taken in ``--rounds`` (default 15)
interleaved rounds (:func:`proxnets.utils.benchmark.interleaved_rounds`: each variant called call by call in an
order drawn per round, so load from other sessions hits a round alike) and reported as the median and IQR of the
per-round ratios, with a verdict against the target (:func:`~proxnets.utils.benchmark.verdict`: met / not met
only when the whole IQR is on one side). Prints

- where a step's time goes beyond Adam's (torch profiler, :func:`step_breakdown`);
- step time, mini-batch, bSQH / Adam (target <= 1.3), with and without ``target_density``
  (:func:`step_rounds`): the bSQH trial forwards timed in place give the floor ``1 + trial forwards / Adam step``
  and the rest (update and bookkeeping beyond Adam's update); the levers ``inference_mode`` for the trial and the
  last stop's pool as variants of the same run (their weights must end equal to bSQH's bit for bit);
- the trial forward's variants over an Adam step (:func:`trial_forward_variants`; ``--compile`` adds a
  ``torch.compile``'d one, its compile time printed separately);
- epoch time, bSQH / Adam (target <= 1.35, :func:`epoch_rounds`); ``--timings-only`` stops here;
- full batch: an iteration with the accepted trial's graph reused as the next sweep vs without;
- structured sparsity: bSQH with the filter-level L0 (``structure="filter"``) priced by multiply-adds
  (:func:`~proxnets.pmp.sparsity.mac_param_groups`) at a target fraction of them,
  its zero filters removed (:func:`~proxnets.pmp.sparsity.remove_zero_filters`), the largest output
  difference, and the inference time dense vs exported (rounds, median of the per-round ratios);
- the test accuracy at equal density: bSQH with ``target_density``, Adam pruned to bSQH's density
  and fine-tuned as many epochs.

``--layer-pilot SEEDS`` runs only the layer-rule pilot (:func:`layer_pilot`) from which the suite's paired
design was fixed: seeds 10 .. 10 + SEEDS - 1 (not the claim's), one ``map+activation`` sweep from every state of a
20-sweep ``map`` reference run; per-state means and sds of the paired difference, and the per-seed means over the
suite's states.

``--structured-compare SEEDS`` runs only the structured comparison (:func:`structured_compare`): the
filter-level L0 bSQH against Adam + filter magnitude pruning (``filter_prune``) at bSQH's MAC fraction,
equal epochs, lr and pruning variant on validation, SEEDS seeds with intervals, exported inference time
per seed; the loop is the pmp suite's (``proxnets.pmp.experiments.structured``).

    python benchmarks/bench_pmp.py [--quick] [--rounds N] [--compile] [--timings-only]
                                   [--structured-compare SEEDS | --layer-pilot SEEDS]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, evaluate, fit
from proxnets.pmp import BSQH, LeNet5, mac_param_groups, remove_zero_filters, sparsity_report
from proxnets.pmp.baselines import magnitude_prune
from proxnets.pmp.models import MaxPool2x2
from proxnets.pmp.experiments import _carve_validation, pick_adam_lr, structured
from proxnets.utils.stats import difference_interval, mean_interval
from proxnets.pmp.sparsity import weight_density
from proxnets.pmp.training import bsqh_optimizer, full_batch_bsqh, train_bsqh
from proxnets.report.suite import SuiteContext
from proxnets.utils.benchmark import interleaved_rounds, spread, verdict


def _closure(model, opt, x, y):
    def closure(backward: bool = True):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss.detach()

    return closure


class _PoolColumnsFirst(MaxPool2x2):
    """``MaxPool2x2``'s no-grad path before this stop: column pairs first, then row pairs (the same maximum)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.max_pool2d(x, 2)
        h, w = x.shape[-2], x.shape[-1]
        pairs = x.view(*x.shape[:-1], w // 2, 2)
        cols = torch.maximum(pairs[..., 0], pairs[..., 1]).view(*x.shape[:-2], h // 2, 2, w // 2)
        return torch.maximum(cols[..., 0, :], cols[..., 1, :])


class _InferenceModeTrial(BSQH):
    """The lever "``torch.inference_mode`` instead of ``no_grad`` for the trial forward" (measured, not kept)."""

    def _trial_loss(self, closure):
        with torch.inference_mode():
            return super()._trial_loss(closure)


def _load() -> float:
    return os.getloadavg()[0]


def _ratio_text(r: tuple[float, float, float], target: float | None = None) -> str:
    text = f"{r[0]:.3f} (IQR {r[1]:.3f}-{r[2]:.3f}"
    return text + (f"; <= {target}: {verdict(r, target, True)})" if target is not None else ")")


def step_rounds(x, y, rounds: int, steps: int, target_density: float | None = None) -> dict[str, Any]:
    """bSQH's step against Adam's, mini-batch, in ``rounds`` interleaved rounds of ``steps`` steps each (thread CPU).

    Every variant has its own LeNet-5 (same initial weights) and takes the next batch of 64 of ``(x, y)``
    (cycling), so all see the same batch sequence; a round calls them step by step in an order drawn per round.
    Variants: Adam, bSQH (the library), bSQH with its trial forward under ``torch.inference_mode`` and bSQH
    with the pool of the last stop (columns first) -- both exact, so the three bSQH runs must end with the same
    weights bit for bit (checked: the levers change nothing the algorithm decides). The library bSQH's trial
    forwards are also timed in place (its ``_trial_loss`` wrapped: the batch its sweep has just checked, the
    weights just written), which splits its round into Adam's + trial forwards + the rest (update, bookkeeping,
    minus Adam's update). Per-round ratios to Adam's round: median and IQR.
    """
    torch.manual_seed(0)
    init = LeNet5()
    models = {k: copy.deepcopy(init) for k in ("adam", "bsqh", "bsqh inference_mode", "bsqh pool before")}
    models["bsqh pool before"].pool = _PoolColumnsFirst()
    opts = {"adam": torch.optim.Adam(models["adam"].parameters(), lr=1e-3)}
    for k, cls in (("bsqh", BSQH), ("bsqh inference_mode", _InferenceModeTrial), ("bsqh pool before", BSQH)):
        opts[k] = bsqh_optimizer(models[k], 1.0, optimizer_class=cls, record_history=False,
                                 target_density=target_density)
    n = len(x) // 64
    counter = dict.fromkeys(models, 0)
    warmup = 5
    ob = opts["bsqh"]
    trial_time = [0.0] * rounds
    orig_trial = ob._trial_loss

    def timed_trial(c):  # the in-place trial forward, summed per round (bSQH step number -> round)
        t0 = time.thread_time()
        out = orig_trial(c)
        r = (counter["bsqh"] - 1 - warmup) // steps
        if r >= 0:
            trial_time[r] += time.thread_time() - t0
        return out

    ob._trial_loss = timed_trial

    def stepper(k):
        m, o = models[k], opts[k]

        def run():
            j = (counter[k] % n) * 64
            counter[k] += 1
            return o.step(_closure(m, o, x[j:j + 64], y[j:j + 64]))
        return run

    load0 = _load()
    t = interleaved_rounds({k: stepper(k) for k in models}, rounds, calls=steps, clock=time.thread_time,
                           shuffle=True, warmup=warmup)
    trials = (ob.run_state["accepted"] + ob.run_state["rejected"]) / max(ob.run_state["iteration"], 1)
    ref = [p for p in models["bsqh"].parameters()]
    same = all(all(torch.equal(p, q) for p, q in zip(ref, models[k].parameters()))
               and opts[k].run_state["rejected"] == ob.run_state["rejected"]
               for k in ("bsqh inference_mode", "bsqh pool before"))
    per = {k: spread([a / b for a, b in zip(t[k], t["adam"])]) for k in models if k != "adam"}
    per["trial forwards"] = spread([f / a for f, a in zip(trial_time, t["adam"])])
    floor = spread([1.0 + f / a for f, a in zip(trial_time, t["adam"])])
    rest = spread([(b - a - f) / a for b, a, f in zip(t["bsqh"], t["adam"], trial_time)])
    return dict(per=per, floor=floor, rest=rest, trials=trials, same=same, adam_ms=statistics.median(t["adam"]) / steps * 1e3,
                bsqh_ms=statistics.median(t["bsqh"]) / steps * 1e3, load=(load0, _load()))


def _act_then_pool(m, x):
    """LeNet-5 in the seed's order map -> ReLU -> pool (the no-grad forward before the pool-first change)."""
    x = m.pool(m.act(m.conv1(x)))
    x = m.pool(m.act(m.conv2(x)))
    return m.fc3(m.act(m.fc2(m.act(m.fc1(x.flatten(1))))))


def _functional(m, x):
    """LeNet5's no-grad forward without module calls (no hooks can run: measured, not kept)."""
    x = torch.relu(m.pool(F.conv2d(x, m.conv1.weight, m.conv1.bias, padding=2)))
    x = torch.relu(m.pool(F.conv2d(x, m.conv2.weight, m.conv2.bias)))
    x = torch.relu(F.linear(x.flatten(1), m.fc1.weight, m.fc1.bias))
    return F.linear(torch.relu(F.linear(x, m.fc2.weight, m.fc2.bias)), m.fc3.weight, m.fc3.bias)


def _fused_conv_relu(m, x):
    """conv + bias + ReLU as one oneDNN primitive (``mkldnn._convolution_pointwise``), then the pool."""
    cpr = torch.ops.mkldnn._convolution_pointwise
    x = m.pool(cpr(x, m.conv1.weight, m.conv1.bias, [2, 2], [1, 1], [1, 1], 1, "relu", [], ""))
    x = m.pool(cpr(x, m.conv2.weight, m.conv2.bias, [0, 0], [1, 1], [1, 1], 1, "relu", [], ""))
    x = torch.relu(F.linear(x.flatten(1), m.fc1.weight, m.fc1.bias))
    return F.linear(torch.relu(F.linear(x, m.fc2.weight, m.fc2.bias)), m.fc3.weight, m.fc3.bias)


def trial_forward_variants(x, y, rounds: int, calls: int, compiled: bool = False) -> dict[str, Any]:
    """The trial forward's variants over an Adam step (thread CPU, 1 thread): ``rounds`` rounds of ``calls`` calls
    of each, shuffled per round; median and IQR of the per-round ratios. All give the same loss bit for bit
    (asserted), except ``torch.compile`` (``compiled=True``: its compile time is reported separately and its
    largest loss difference is printed). Variants: ``LeNet5``'s no-grad path (now: pool rows first, then ReLU),
    the last stop's pool (columns first), the seed's order ReLU -> pool, ``torch.inference_mode``,
    ``channels_last`` weights and input, conv + bias + ReLU fused by oneDNN, a functional forward without module
    calls, and the compiled functional forward."""
    torch.manual_seed(0)
    m, ma = LeNet5(), LeNet5()
    mold = copy.deepcopy(m)
    mold.pool = _PoolColumnsFirst()
    mcl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    oa = torch.optim.Adam(ma.parameters(), lr=1e-3)

    def adam():
        oa.zero_grad(set_to_none=True)
        F.cross_entropy(ma(x), y).backward()
        oa.step()

    def ng(f):
        with torch.no_grad():
            return F.cross_entropy(f(), y)

    def im(f):
        with torch.inference_mode():
            return F.cross_entropy(f(), y)

    variants = {"now (pool rows first -> ReLU)": lambda: ng(lambda: m(x)),
                "pool columns first (last stop)": lambda: ng(lambda: mold(x)),
                "ReLU -> pool (seed order)": lambda: ng(lambda: _act_then_pool(m, x)),
                "inference_mode": lambda: im(lambda: m(x)),
                "channels_last": lambda: ng(lambda: mcl(xcl)),
                "functional (no module calls)": lambda: ng(lambda: _functional(m, x))}
    if hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        variants["conv+bias+ReLU fused (oneDNN)"] = lambda: ng(lambda: _fused_conv_relu(m, x))
    ref = float(variants["ReLU -> pool (seed order)"]())
    assert all(float(f()) == ref for f in variants.values())  # the same loss bit for bit
    out: dict[str, Any] = {}
    if compiled:
        fn = torch.compile(_functional, dynamic=False)
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            diff = abs(float(F.cross_entropy(fn(m, x), y)) - ref)
        out["compile"] = (time.perf_counter() - w0, time.process_time() - c0, diff)
        variants["torch.compile (functional)"] = lambda: ng(lambda: fn(m, x))
    load0 = _load()
    t = interleaved_rounds({"adam": adam, **variants}, rounds, calls=calls, clock=time.thread_time, shuffle=True,
                           warmup=3)
    out["per"] = {k: spread([v / a for v, a in zip(t[k], t["adam"])]) for k in variants}
    out["adam_ms"] = statistics.median(t["adam"]) / calls * 1e3
    out["load"] = (load0, _load())
    return out


def epoch_rounds(ds, rounds: int, target_density: float | None) -> dict[str, Any]:
    """Epoch time bSQH / Adam (no evaluation, thread CPU), ``rounds`` interleaved rounds of one epoch each (order
    drawn per round, after one warm-up epoch each); median and IQR of the per-round ratios."""
    quiet = lambda s: None  # noqa: E731
    torch.manual_seed(0)
    mb, ma = LeNet5(), LeNet5()
    ob = bsqh_optimizer(mb, 1.0, target_density=target_density)
    oa = torch.optim.Adam(ma.parameters(), lr=1e-3)
    seeds = {"bsqh": 0, "adam": 0}

    def epoch(k, m, o):
        def run():
            one = TrainConfig(epochs=1, batch_size=64, seed=seeds[k], device="cpu", progress=False,
                              eval_every_epoch=False)
            seeds[k] += 1
            fit(m, ds, one, optimizer=o, log=quiet)
        return run

    load0 = _load()
    t = interleaved_rounds({"bsqh": epoch("bsqh", mb, ob), "adam": epoch("adam", ma, oa)}, rounds,
                           clock=time.thread_time, shuffle=True)
    info = ob.info()
    return dict(ratio=spread([b / a for b, a in zip(t["bsqh"], t["adam"])]), bsqh=statistics.median(t["bsqh"]),
                adam=statistics.median(t["adam"]), acceptance=info.acceptance_ratio,
                trials=(info.accepted + info.rejected) / max(info.iterations, 1), load=(load0, _load()))


def inference_ratio(dense, small, x, repeats: int) -> dict[str, float]:
    """(exported / dense) no-grad forward time on ``x``: 15 interleaved rounds of ``max(repeats // 15, 1)`` calls each
    (order drawn per round, thread CPU: wall time at load 5-10 scattered this ratio by +-0.2); median of the per-round
    ratios, and of the per-call times."""
    calls = max(repeats // 15, 1)

    def run(m):
        def f():
            with torch.no_grad():
                m(x)
        return f

    t = interleaved_rounds({"dense": run(dense), "exported": run(small)}, 15, calls=calls, clock=time.thread_time,
                           shuffle=True, warmup=3)
    return dict(ratio=spread([s / d for d, s in zip(t["dense"], t["exported"])])[0],
                dense=statistics.median(t["dense"]) / calls, exported=statistics.median(t["exported"]) / calls)


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
    """Where a bSQH step's time goes beyond Adam's (torch profiler, CPU ms per step, the two interleaved).

    Mini-batch (the next batch of 64 each step, the same for both). bSQH: sweep (forward + backward), trial
    forward(s), the rest (closed-form update, price search, bookkeeping); Adam: sweep and update. Beyond Adam:
    bSQH total - Adam total = trial forward + (bSQH rest - Adam update) + (sweep difference: noise).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.manual_seed(0)
    model, ma = LeNet5(), LeNet5()
    opt = bsqh_optimizer(model, 1.0, record_history=False)
    oa = torch.optim.Adam(ma.parameters(), lr=1e-3)
    n = len(x) // 64

    def batch(i):
        j = (i % n) * 64
        return x[j:j + 64], y[j:j + 64]

    def adam_closure(xb, yb):
        inner = _closure(ma, oa, xb, yb)

        def closure():
            with record_function("adam sweep"):
                return inner()
        return closure

    for i in range(5):
        opt.step(_closure(model, opt, *batch(i)))
        oa.step(_closure(ma, oa, *batch(i)))
    keys = ("bsqh sweep", "bsqh trial forward", "bsqh step", "adam sweep", "adam step")
    orig_sweep, orig_trial = opt._sweep, opt._trial_loss

    def sweep(c):
        with record_function("bsqh sweep"):
            return orig_sweep(c)

    def trial(c):
        with record_function("bsqh trial forward"):
            return orig_trial(c)

    opt._sweep, opt._trial_loss = sweep, trial
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(5, 5 + repeats):
            with record_function("bsqh step"):
                opt.step(_closure(model, opt, *batch(i)))
            with record_function("adam step"):
                oa.step(adam_closure(*batch(i)))
    sec = dict.fromkeys(keys, 0.0)
    for ev in prof.key_averages():
        if ev.key in sec:
            sec[ev.key] = ev.cpu_time_total / 1e3 / repeats
    sec["bsqh rest (update, bookkeeping)"] = sec["bsqh step"] - sec["bsqh sweep"] - sec["bsqh trial forward"]
    sec["adam update"] = sec["adam step"] - sec["adam sweep"]
    sec["beyond Adam"] = sec["bsqh step"] - sec["adam step"]
    return sec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="subset of 2000 images, 4 epochs")
    ap.add_argument("--target-density", type=float, default=0.1)
    ap.add_argument("--structured-density", type=float, default=0.3,
                    help="target fraction of multiply-adds of the filter-level L0 run whose zero filters are removed")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the step, forward and epoch timings")
    ap.add_argument("--compile", action="store_true",
                    help="also time a torch.compile'd trial forward (its compile time printed separately)")
    ap.add_argument("--timings-only", action="store_true",
                    help="stop after the step, trial-forward and epoch timings (no training runs, export, accuracy)")
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
    br = step_breakdown(ds.x_train, ds.y_train, repeats=30)
    print("profile of a step (torch profiler, CPU ms per step, bSQH and Adam interleaved, mini-batch): "
          + ", ".join(f"{k} {v:.2f}" for k, v in br.items()))
    rounds, steps = args.rounds, 20 if args.quick else 50
    for td in (None, args.target_density):
        s = step_rounds(ds.x_train, ds.y_train, rounds, steps, target_density=td)
        p = s["per"]
        print(f"step, mini-batch (a new batch of 64 each step; target_density={td}; {rounds} interleaved rounds of "
              f"{steps} steps, thread CPU, load {s['load'][0]:.1f} -> {s['load'][1]:.1f}): Adam {s['adam_ms']:.2f} ms, "
              f"bSQH {s['bsqh_ms']:.2f} ms per step; per-round ratio to Adam: bSQH {_ratio_text(p['bsqh'], 1.3)}, "
              f"trial under inference_mode {_ratio_text(p['bsqh inference_mode'])}, pool of the last stop "
              f"{_ratio_text(p['bsqh pool before'])}; {s['trials']:.3f} trial forwards per step, timed in place "
              f"{_ratio_text(p['trial forwards'])} of Adam's step: floor 1 + trial forwards {_ratio_text(s['floor'])}, "
              f"the rest {s['rest'][0]:+.3f} (IQR {s['rest'][1]:+.3f}-{s['rest'][2]:+.3f}); the three bSQH runs "
              f"end with the same weights and rejections: {s['same']}")
    tv = trial_forward_variants(xb, yb, rounds, 20 if args.quick else 50, compiled=args.compile)
    if "compile" in tv:
        w, c, d = tv["compile"]
        print(f"torch.compile of the functional trial forward: first call {w:.1f} s wall / {c:.1f} s CPU "
              f"(this process; excluded from the rounds), loss differs from eager by {d:.2g}")
    print(f"trial forward / Adam step (no grad, batch 64, {rounds} shuffled rounds, thread CPU, load {tv['load'][0]:.1f} "
          f"-> {tv['load'][1]:.1f}, Adam {tv['adam_ms']:.2f} ms; same loss bit for bit): "
          + ", ".join(f"{k} {_ratio_text(v)}" for k, v in tv["per"].items()))

    er = epoch_rounds(ds, rounds, args.target_density)
    print(f"epoch (no evaluation, target_density={args.target_density}; {rounds} interleaved rounds of one epoch each, "
          f"thread CPU, load {er['load'][0]:.1f} -> {er['load'][1]:.1f}): bSQH {er['bsqh']:.3f} s, Adam "
          f"{er['adam']:.3f} s, per-round ratio {_ratio_text(er['ratio'], 1.35)}; acceptance ratio "
          f"{er['acceptance']:.3f}, {er['trials']:.2f} trial forwards per step")

    if args.timings_only:
        return

    cfg = TrainConfig(epochs=epochs, batch_size=64, seed=0, device="cpu", progress=False, schedule="cosine")
    torch.manual_seed(0)
    r = train_bsqh(LeNet5(), ds, 1.0, epochs=epochs, schedule="cosine", log=quiet, target_density=args.target_density)
    hist_b = r["history"]
    torch.manual_seed(0)
    dense = LeNet5()
    hist_a = fit(dense, ds, TrainConfig(**{**cfg.to_dict(), "optimizer": "adam", "lr": 1e-3}), log=quiet).history
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
          f"15 interleaved rounds, thread CPU, medians): dense {ex['dense'] * 1e3:.2f} ms, exported {ex['exported'] * 1e3:.2f} ms, "
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
