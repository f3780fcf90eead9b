"""``proxnets reproduce pmp``: bSQH with an L0 cost on a LeNet-5-style CNN (mnist5k).

1. Frontier: test accuracy against the fraction of nonzero weights, bSQH at several rho vs Adam +
   global magnitude pruning + fine-tuning at the same density vs SGD with iterative hard
   thresholding (IHT) at the same density.
2. Full-batch vs mini-batch bSQH on one training subset: J and eps traces, acceptance ratio, J
   against wall time; the sufficient-decrease certificate checked on every full-batch iteration.
3. The two eps rules (plain sigma/zeta and curvature) compared in both modes.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, fit
from proxnets.engine.plotting import Panel, multi_plot
from proxnets.pmp.baselines import ProxSGD, magnitude_prune
from proxnets.pmp.models import LeNet5
from proxnets.pmp.sparsity import sparsity_param_groups, sparsity_report, weight_density
from proxnets.pmp.training import full_batch_bsqh, train_bsqh
from proxnets.report.suite import Claim, Figure, SuiteContext, SuiteResult, Table
from proxnets.utils.io import write_json

__all__ = ["run"]

RULES = ("sigma-zeta", "curvature")


def _model(ds, seed: int) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5(ds.input_shape, ds.num_classes)


def _cfg(epochs: int, seed: int, **kw: Any) -> TrainConfig:
    """Every run of the frontier: batch 64, cosine schedule (for bSQH it scales the step 1/(2 eps))."""
    return TrainConfig(epochs=epochs, batch_size=64, seed=seed, device="cpu", progress=False, schedule="cosine", **kw)


def frontier(ctx: SuiteContext, ds, rhos, epochs: int, ft_epochs: int) -> dict[str, Any]:
    """bSQH at each rho (then ``ft_epochs`` with its zeros frozen); Adam dense then pruned to each bSQH density and fine-tuned; IHT at each density."""
    quiet = lambda s: None  # noqa: E731
    out: dict[str, Any] = {"bsqh": [], "prune": [], "iht": []}
    for rho in rhos:
        r = train_bsqh(_model(ds, ctx.seed), ds, rho, epochs=epochs, seed=ctx.seed, log=quiet, schedule="cosine",
                       finetune_epochs=ft_epochs)
        info = r["optimizer"].info()
        out["bsqh"].append(dict(rho=rho, density=r["density"], acc=r["test_acc"], time=r["time"],
                                acceptance=info.acceptance_ratio, stopped=info.stopped))
        ctx.log(f"bSQH rho={rho:g}: acc {r['test_acc']:.4f} density {r['density']:.3f} ({r['time']:.1f}s)")
        if "_sparsest" not in out or r["density"] < out["_sparsest_density"]:
            out["_sparsest"], out["_sparsest_density"] = r["model"], r["density"]
    dense = _model(ds, ctx.seed)
    t0 = time.perf_counter()
    res = fit(dense, ds, _cfg(epochs, ctx.seed, lr=1e-3, optimizer="adam"), log=quiet)
    out["adam_dense"] = dict(acc=res.final["test_acc"], time=time.perf_counter() - t0, density=1.0)
    ctx.log(f"Adam dense: acc {res.final['test_acc']:.4f}")
    for point in out["bsqh"]:
        pruned = magnitude_prune(copy.deepcopy(dense), point["density"])
        r = fit(pruned, ds, _cfg(ft_epochs, ctx.seed + 1, lr=3e-4, optimizer="adam"), log=quiet)
        out["prune"].append(dict(density=weight_density(pruned), acc=r.final["test_acc"]))
        model = _model(ds, ctx.seed)
        groups = sparsity_param_groups(model, 0.0)
        groups[0].update(prox="iht", strength=point["density"])
        r = fit(model, ds, _cfg(epochs, ctx.seed), optimizer=ProxSGD(groups, lr=0.05, momentum=0.9), log=quiet)
        out["iht"].append(dict(density=weight_density(model), acc=r.final["test_acc"]))
        ctx.log(f"density {point['density']:.3f}: prune+ft acc {out['prune'][-1]['acc']:.4f}, "
                f"IHT acc {out['iht'][-1]['acc']:.4f}")
    return out


def modes(ctx: SuiteContext, ds, rho: float, n: int, iterations: int, mini_epochs: int) -> dict[str, Any]:
    """Full-batch and mini-batch bSQH with both eps rules on the same ``n`` training examples."""
    sub = ds.subset(n, len(ds.x_test), seed=ctx.seed)
    x, y = sub.x_train, sub.y_train

    def objective(model) -> float:
        with torch.no_grad():
            nnz = sum(int((p != 0).sum()) for g in sparsity_param_groups(model, rho)[:1] for p in g["params"])
            return float(F.cross_entropy(model(x), y)) + rho * nnz

    out: dict[str, Any] = {}
    for rule in RULES:
        # same eps_min as the mini-batch runs: without the step cap, full-batch bSQH at this rho
        # descends to the all-zero network (J = log 10 < J of any useful sparse net; docs/pmp.md)
        r = full_batch_bsqh(_model(ds, ctx.seed), x, y, rho, iterations=iterations, eps_rule=rule)
        opt = r["optimizer"]
        hist = opt.history
        violations = sum(1 for h in hist if h["accepted"] and h["J_after"] - h["J_before"] > -opt.eta * h["tau"])
        info = opt.info()
        out[f"full/{rule}"] = dict(
            J=[hist[0]["J_before"]] + [h["J_after"] for h in hist], time=[0.0] + r["times"],
            eps=[sum(h["eps"].values()) / len(h["eps"]) for h in hist], trials=sum(h["trials"] for h in hist),
            iterations=len(hist), acceptance=info.acceptance_ratio, violations=violations,
            monotone=all(b <= a for a, b in zip([hist[0]["J_before"]] + [h["J_after"] for h in hist],
                                                 [h["J_after"] for h in hist])),
            density=1.0 - opt.sparsity()["fraction"], stopped=info.stopped)
        # mini-batch on the same examples; J on all of them at every epoch end
        model = _model(ds, ctx.seed)
        trace_t, trace_j, t0 = [0.0], [objective(model)], [time.perf_counter()]

        def cb(event, state, model=model, trace_t=trace_t, trace_j=trace_j, t0=t0):
            if event == "epoch_end":
                trace_t.append(time.perf_counter() - t0[0])
                trace_j.append(objective(model))
                t0[0] = time.perf_counter() - trace_t[-1]  # exclude the evaluation itself

        m = train_bsqh(model, sub, rho, epochs=mini_epochs, batch_size=64, seed=ctx.seed, callbacks=[cb],
                       eps_rule=rule)
        info = m["optimizer"].info()
        mh = m["optimizer"].history
        out[f"mini/{rule}"] = dict(J=trace_j, time=trace_t, batch_J=[h["J_after"] for h in mh],
                                   eps=[sum(h["eps"].values()) / len(h["eps"]) for h in mh],
                                   trials=sum(h["trials"] for h in mh), iterations=len(mh),
                                   acceptance=info.acceptance_ratio, density=m["density"], stopped=info.stopped)
        for mode in ("full", "mini"):
            d = out[f"{mode}/{rule}"]
            ctx.log(f"{mode}-batch {rule}: J {d['J'][0]:.3f} -> {d['J'][-1]:.3f}, acceptance {d['acceptance']:.2f}, "
                    f"{d['trials'] / max(d['iterations'], 1):.2f} trial forwards/iteration")
    return out


def _j_at(trace: dict[str, Any], t: float) -> float:
    """J of a trace at wall time ``t`` (last value recorded before ``t``)."""
    best = trace["J"][0]
    for ti, j in zip(trace["time"], trace["J"]):
        if ti <= t:
            best = j
    return best


def run(ctx: SuiteContext) -> SuiteResult:
    ds = load_dataset("mnist5k", seed=ctx.seed, data_dir=ctx.data_dir)
    notes = []
    if ctx.size == "full":
        try:
            ds = load_dataset("mnist", seed=ctx.seed, data_dir=ctx.data_dir)
        except Exception as exc:  # noqa: BLE001 - absent files: fall back and say so
            notes.append(f"full MNIST not available ({exc}); ran on mnist5k")
    ds = ds.subset(ctx.pick(smoke=1000, quick=2000, full=None), ctx.pick(smoke=500, quick=1000, full=None),
                   seed=ctx.seed)
    epochs = ctx.pick(smoke=2, quick=8, full=30)
    rhos = ctx.pick(smoke=[1e-3], quick=[3e-4, 1e-3, 2e-3], full=[1e-4, 3e-4, 1e-3, 2e-3, 3e-3])
    target_acc = ctx.pick(smoke=0.7, quick=0.85, full=0.98)
    fr = frontier(ctx, ds, rhos, epochs, ft_epochs=ctx.pick(smoke=1, quick=1, full=5))
    md = modes(ctx, ds, rho=1e-3, n=ctx.pick(smoke=300, quick=600, full=4000),
               iterations=ctx.pick(smoke=12, quick=40, full=300), mini_epochs=ctx.pick(smoke=3, quick=8, full=60))

    # ---- figures
    figs = []
    frontier_png = ctx.path("frontier.png")
    multi_plot(frontier_png, [Panel(series={
        "bSQH (L0)": ([p["density"] for p in fr["bsqh"]], [p["acc"] for p in fr["bsqh"]]),
        "Adam + magnitude pruning + fine-tune": ([p["density"] for p in fr["prune"]], [p["acc"] for p in fr["prune"]]),
        "SGD + IHT": ([p["density"] for p in fr["iht"]], [p["acc"] for p in fr["iht"]]),
        "Adam dense": ([1.0], [fr["adam_dense"]["acc"]]),
    }, kind="scatter", xlabel="fraction of nonzero weights", ylabel="test accuracy", title="accuracy vs density")])
    figs.append(Figure(frontier_png, "Test accuracy against the fraction of nonzero weights (LeNet-5, mnist5k)."))
    traces_png = ctx.path("traces.png")
    panels = []
    for mode, xlabel in (("full", "iteration"), ("mini", "iteration (mini-batch)")):
        panels.append(Panel(series={r: (list(range(len(md[f"{mode}/{r}"]["eps"]))), md[f"{mode}/{r}"]["eps"])
                                    for r in RULES}, xlabel=xlabel, ylabel="mean eps", logy=True,
                            title=f"eps, {mode}-batch"))
    panels.insert(0, Panel(series={r: (list(range(len(md[f"full/{r}"]["J"]))), md[f"full/{r}"]["J"]) for r in RULES},
                           xlabel="iteration", ylabel="J", title="J, full-batch"))
    panels.insert(1, Panel(series={r: (list(range(len(md[f"mini/{r}"]["batch_J"]))), md[f"mini/{r}"]["batch_J"])
                                   for r in RULES}, xlabel="iteration", ylabel="J on the batch",
                           title="J, mini-batch (same batch)"))
    multi_plot(traces_png, panels)
    figs.append(Figure(traces_png, "J and eps traces for both eps rules, full-batch and mini-batch."))
    time_png = ctx.path("loss_vs_time.png")
    multi_plot(time_png, [Panel(series={f"{k}": (v["time"], v["J"]) for k, v in md.items()},
                                xlabel="wall time (s)", ylabel="J on the training subset", logy=True,
                                title="J against wall time")])
    figs.append(Figure(time_png, "J (loss + rho * nonzeros) on the same training subset against wall time."))

    # ---- claims (decided by the measurements)
    claims = []
    viol = sum(md[f"full/{r}"]["violations"] for r in RULES)
    n_acc = sum(round(md[f"full/{r}"]["acceptance"] * md[f"full/{r}"]["trials"]) for r in RULES)
    mono = all(md[f"full/{r}"]["monotone"] for r in RULES)
    claims.append(Claim("Full-batch bSQH reduces the loss: every accepted iteration decreases J by at least eta*tau",
                        f"{n_acc} accepted full-batch iterations (both eps rules), J recorded before/after",
                        f"{viol} violations; J monotone: {mono}", viol == 0 and mono and n_acc > 0))
    sparse_ok = [p for p in fr["bsqh"] if p["density"] <= 0.3]
    best = max(sparse_ok, key=lambda p: p["acc"]) if sparse_ok else max(fr["bsqh"], key=lambda p: -p["density"])
    claims.append(Claim(f"bSQH with the L0 cost trains a sparse CNN: >= 70% exact zeros at >= {target_acc:.0%} test accuracy",
                        f"LeNet-5 on mnist5k ({len(ds.x_train)} train), {epochs} epochs, rho in {rhos}",
                        f"acc {best['acc']:.4f} at density {best['density']:.3f} (rho={best['rho']:g})",
                        best["density"] <= 0.3 and best["acc"] >= target_acc))
    dens = [p["density"] for p in fr["bsqh"]]
    claims.append(Claim("Sparsity increases with rho", f"density of bSQH models at rho = {rhos}",
                        [round(d, 4) for d in dens], all(b < a for a, b in zip(dens, dens[1:])) if len(dens) > 1
                        else dens[0] < 1.0))
    wins = [b["acc"] >= p["acc"] for b, p in zip(fr["bsqh"], fr["prune"])]
    claims.append(Claim("At equal sparsity bSQH is at least as accurate as Adam + magnitude pruning + fine-tuning",
                        "same model, data, epochs; pruning to each bSQH density, then fine-tuning",
                        ", ".join(f"{b['density']:.3f}: {b['acc']:.4f} vs {p['acc']:.4f}"
                                  for b, p in zip(fr["bsqh"], fr["prune"])), all(wins)))
    tpi = {r: sum(md[f"{m}/{r}"]["trials"] for m in ("full", "mini"))
           / max(sum(md[f"{m}/{r}"]["iterations"] for m in ("full", "mini")), 1) for r in RULES}
    jfin = {r: md[f"full/{r}"]["J"][-1] for r in RULES}
    claims.append(Claim("The adaptive eps rule cuts the overhead of the accept/reject loop",
                        "trial forward passes per iteration over the full-batch and mini-batch runs, and final "
                        "full-batch J, curvature rule vs sigma/zeta rule",
                        f"trials/it {tpi['curvature']:.2f} vs {tpi['sigma-zeta']:.2f}; "
                        f"J {jfin['curvature']:.4f} vs {jfin['sigma-zeta']:.4f}",
                        tpi["curvature"] <= tpi["sigma-zeta"] and jfin["curvature"] <= jfin["sigma-zeta"]))
    t_common = min(md["full/curvature"]["time"][-1], md["mini/curvature"]["time"][-1])
    j_full, j_mini = _j_at(md["full/curvature"], t_common), _j_at(md["mini/curvature"], t_common)
    claims.append(Claim("Mini-batch bSQH converges faster in wall time than full-batch bSQH",
                        f"J on the same {ctx.pick(300, 600, 4000)} examples after "
                        f"{t_common:.1f}s (curvature rule)", f"mini {j_mini:.4f} vs full {j_full:.4f}",
                        j_mini < j_full))

    # ---- tables and metrics
    tables = [
        Table("Accuracy vs density (LeNet-5, mnist5k)", ["method", "rho", "density", "test acc"],
              [["bSQH", p["rho"], round(p["density"], 4), round(p["acc"], 4)] for p in fr["bsqh"]]
              + [["Adam+prune+ft", "-", round(p["density"], 4), round(p["acc"], 4)] for p in fr["prune"]]
              + [["SGD+IHT", "-", round(p["density"], 4), round(p["acc"], 4)] for p in fr["iht"]]
              + [["Adam dense", "-", 1.0, round(fr["adam_dense"]["acc"], 4)]]),
        Table("bSQH modes and eps rules (rho=1e-3)", ["mode/rule", "iterations", "acceptance", "trials/iteration",
                                                      "J start", "J end", "wall s", "density"],
              [[k, v["iterations"], round(v["acceptance"], 3), round(v["trials"] / max(v["iterations"], 1), 2),
                round(v["J"][0], 4), round(v["J"][-1], 4), round(v["time"][-1], 2), round(v["density"], 4)]
               for k, v in md.items()]),
    ]
    report = sparsity_report(fr["_sparsest"], ds.input_shape)
    tables.append(Table("Sparsest bSQH model: remaining weights and multiply-adds per example",
                        ["layer", "weights", "nonzero", "density", "MACs dense", "MACs sparse"],
                        [[r["layer"], r["weights"], r["nonzero"], round(r["density"], 4), r["macs_dense"],
                          r["macs_sparse"]] for r in report["layers"]]
                        + [["total", report["total"]["weights"], report["total"]["nonzero"],
                            round(report["total"]["density"], 4), report["total"]["macs_dense"],
                            report["total"]["macs_sparse"]]]))
    metrics = dict(sparsity_report=report, frontier={k: v for k, v in fr.items() if not k.startswith("_")},
                   modes={k: {kk: vv for kk, vv in v.items()} for k, v in md.items()},
                   epochs=epochs, n_train=len(ds.x_train), n_test=len(ds.x_test))
    write_json(ctx.path("pmp_results.json"), metrics)
    notes.append(f"bSQH: mini-batch mode through the engine (batch 64, cosine schedule on the step), eps rule "
                 f"'curvature', eps0=5, eps_min=1, {epochs} epochs + 1 epoch fine-tuning with zeros frozen (rho=0); "
                 "Adam (dense, then pruned + 1 epoch fine-tuning) and SGD+IHT share model, data, epochs and schedule.")
    notes.append("Wall times are measured on a shared machine: the loss-vs-time comparison is noisy.")
    return SuiteResult(method="pmp", claims=claims, metrics=metrics, figures=figs, tables=tables, notes=notes)
