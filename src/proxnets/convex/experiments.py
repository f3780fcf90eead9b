"""``proxnets reproduce convex``: the claims of seed 001 measured on MNIST and its variants.

1. Test error of CCNN (primal, cached features), DCCNN (dual + recovery of ``r`` filters) and a
   back-propagation CNN with ``r`` filters, on mnist5k and the variants rand / img / rot / img-rot.
2. Duality gap against iterations for the dual (and the primal, same certificate).
3. Test accuracy against the number of recovered filters (one dual solution, several ``r``).
4. Peak memory and time per iteration against ``n``: dual with streamed features vs primal
   with cached features.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from proxnets.convex.duality import scores
from proxnets.convex.estimators import CCNN, DCCNN
from proxnets.convex.models import SmallCNN
from proxnets.convex.recovery import recover
from proxnets.convex.sources import StreamedFeatures, fixed_mmap_threshold
from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, evaluate, fit
from proxnets.engine.plotting import line_plot, multi_plot
from proxnets.report.suite import Claim, Figure, SuiteContext, SuiteResult, Table
from proxnets.utils.benchmark import peak_memory_mb
from proxnets.utils.io import write_json

__all__ = ["run"]

VARIANTS = ("mnist5k", "mnist5k-rand", "mnist5k-img", "mnist5k-rot", "mnist5k-img-rot")


def _settings(ctx: SuiteContext) -> dict:
    return dict(
        datasets=ctx.pick(smoke=("digits",), quick=VARIANTS, full=VARIANTS),
        n_train=ctx.pick(smoke=200, quick=250, full=4000),
        n_test=ctx.pick(smoke=150, quick=300, full=1000),
        est=ctx.pick(
            smoke=dict(patch_size=3, n_features=32, pool_size=2, lam=1e-2, max_iter=40, tol=1e-3),
            quick=dict(patch_size=5, n_features=48, pool_size=3, lam=1e-2, max_iter=30, tol=1e-3),
            full=dict(patch_size=5, n_features=500, pool_size=2, lam=1e-3, max_iter=1000, tol=1e-4),
        ),
        filters=ctx.pick(smoke=8, quick=8, full=25),
        gap_iters=ctx.pick(smoke=80, quick=80, full=2000),
        r_grid=ctx.pick(smoke=(1, 2, 4, 8), quick=(1, 2, 4, 8, 16), full=(1, 2, 4, 8, 16, 25, 32)),
        mem_sizes=ctx.pick(smoke=(300, 600), quick=(300, 600, 1200), full=(1000, 2000, 4000)),
        # memory runs: a large feature dimension makes the cached tensor n P D visible above the
        # process's fixed overhead; 3 iterations suffice (memory does not grow with iterations)
        mem_est=ctx.pick(smoke=dict(patch_size=5, n_features=256, pool_size=3, lam=1e-2),
                         quick=dict(patch_size=5, n_features=256, pool_size=3, lam=1e-2),
                         full=dict(patch_size=5, n_features=500, pool_size=2, lam=1e-3)),
        cnn_epochs=ctx.pick(smoke=15, quick=10, full=30),
    )


def _cnn_error(ds, width: int, patch: int, pool: int, epochs: int, seed: int) -> float:
    model = SmallCNN(ds.input_shape, ds.num_classes, width=width, patch_size=patch, pool_size=pool)
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=5e-3, seed=seed, device="cpu", progress=False)
    fit(model, ds, cfg, log=lambda m: None)
    return 100 * (1 - evaluate(model, ds.x_test, ds.y_test))


def _errors(ctx: SuiteContext, s: dict, notes: list[str]) -> tuple[list[list], dict]:
    rows, metrics = [], {}
    est = dict(s["est"], on_nonconvergence="ignore", random_state=ctx.seed)
    for name in s["datasets"]:
        try:
            ds = load_dataset(name, seed=ctx.seed, n_train=s["n_train"], n_test=s["n_test"], data_dir=ctx.data_dir)
        except (ValueError, FileNotFoundError, ImportError) as exc:  # a variant not available here
            notes.append(f"{name}: skipped ({exc})")
            continue
        t0 = time.perf_counter()
        ccnn = CCNN(**est).fit(ds.x_train, ds.y_train)
        dccnn = DCCNN(**est, n_filters=s["filters"]).fit(ds.x_train, ds.y_train)
        e_ccnn = 100 * (1 - ccnn.score(ds.x_test, ds.y_test))
        e_dccnn = 100 * (1 - dccnn.score(ds.x_test, ds.y_test))
        e_cnn = _cnn_error(ds, s["filters"], est["patch_size"], est["pool_size"], s["cnn_epochs"], ctx.seed)
        metrics[name] = dict(ccnn_err=e_ccnn, dccnn_err=e_dccnn, cnn_err=e_cnn, ccnn_gap=ccnn.trace_.gap,
                             dccnn_gap=dccnn.trace_.gap, recovery_agreement=dccnn.recovery_.agreement,
                             seconds=time.perf_counter() - t0)
        rows.append([name, round(e_ccnn, 2), round(e_dccnn, 2), round(e_cnn, 2), f"{ccnn.trace_.gap:.1e}", f"{dccnn.trace_.gap:.1e}"])
        ctx.log(f"convex: {name}: CCNN {e_ccnn:.1f}%  DCCNN(r={s['filters']}) {e_dccnn:.1f}%  CNN {e_cnn:.1f}%")
    return rows, metrics


def _gap_and_filters(ctx: SuiteContext, s: dict) -> dict:
    """One long dual solve on the first dataset: gap trace, then recovery for several r."""
    name = s["datasets"][0]
    ds = load_dataset(name, seed=ctx.seed, n_train=s["n_train"], n_test=s["n_test"], data_dir=ctx.data_dir)
    est = dict(s["est"], max_iter=s["gap_iters"], tol=0.0, on_nonconvergence="ignore", random_state=ctx.seed)
    ccnn = CCNN(**est).fit(ds.x_train, ds.y_train)
    dccnn = DCCNN(**est).fit(ds.x_train, ds.y_train)
    feat = dccnn.featurizers_[0]
    source = StreamedFeatures(feat, ds.x_train, 64)
    y = torch.as_tensor(ds.y_train)
    z_test = feat(ds.x_test)  # (n_test, P, D)
    k = ds.num_classes
    acc_full = float((scores(z_test, dccnn.dual_.theta).argmax(1) == ds.y_test).float().mean())
    acc_r, obj_r = [], []
    for r in s["r_grid"]:
        rec = recover(source, y, k, dccnn.dual_, est["lam"], n_filters=r, max_iter=100, tol=1e-4, on_nonconvergence="ignore")
        acc_r.append(float((scores(z_test @ rec.filters, rec.head).argmax(1) == ds.y_test).float().mean()))
        obj_r.append(rec.objective)
    return dict(dataset=name, dual_trace=dataclasses.asdict(dccnn.trace_), primal_trace=dataclasses.asdict(ccnn.trace_),
                r_grid=list(s["r_grid"]), acc_r=acc_r, obj_r=obj_r, acc_full_dual=acc_full,
                dual_objective=dccnn.trace_.primal[-1], active_filters=int(dccnn.filters_.shape[1]))


def _memory(ctx: SuiteContext, s: dict) -> dict:
    """Peak memory and seconds per iteration of a fixed 3-iteration solve, dual vs cached primal."""
    out = {"n": [], "dual_mb": [], "primal_mb": [], "dual_s_per_iter": [], "primal_s_per_iter": []}
    fixed_mmap_threshold()  # peak RSS = live memory, not allocator history (both methods alike)
    est = dict(s["mem_est"], max_iter=3, tol=0.0, chunk=32, on_nonconvergence="ignore", random_state=ctx.seed)
    base = load_dataset("mnist5k", seed=ctx.seed, data_dir=ctx.data_dir)
    for n in s["mem_sizes"]:
        sub = base.subset(n_train=min(n, len(base.y_train)), n_test=None, seed=ctx.seed)
        for key, cls in (("dual", DCCNN), ("primal", CCNN)):
            t0 = time.perf_counter()
            extra = {"n_filters": s["filters"]} if cls is DCCNN else {}
            mb = peak_memory_mb(lambda cls=cls, extra=extra: cls(**est, **extra).fit(sub.x_train, sub.y_train))
            out[f"{key}_mb"].append(mb)
            out[f"{key}_s_per_iter"].append((time.perf_counter() - t0) / 3)
        out["n"].append(int(len(sub.y_train)))
        ctx.log(f"convex: n={n}: dual {out['dual_mb'][-1]:.0f} MiB, cached primal {out['primal_mb'][-1]:.0f} MiB")
    return out


def run(ctx: SuiteContext) -> SuiteResult:
    s = _settings(ctx)
    notes: list[str] = []
    t0 = time.perf_counter()
    rows, err_metrics = _errors(ctx, s, notes)
    gf = _gap_and_filters(ctx, s)
    mem = _memory(ctx, s)
    metrics = {"errors": err_metrics, "gap_and_filters": gf, "memory": mem, "settings": {k: v for k, v in s.items()},
               "seconds": time.perf_counter() - t0}
    write_json(ctx.path("convex_results.json"), metrics)

    dual, primal = gf["dual_trace"], gf["primal_trace"]
    it_d = list(range(1, len(dual["residuals"]) + 1))
    it_p = list(range(1, len(primal["residuals"]) + 1))
    f_gap = line_plot(ctx.path("gap.png"), {"DCCNN (dual)": (it_d, [max(g, 1e-12) for g in dual["residuals"]]),
                                            "CCNN (primal)": (it_p, [max(g, 1e-12) for g in primal["residuals"]])},
                      xlabel="iteration (one pass over the features)", ylabel="duality gap", logy=True,
                      title=f"certified gap on {gf['dataset']}")
    f_bounds = line_plot(ctx.path("bounds.png"), {"primal F (DCCNN)": (it_d, dual["primal"]), "dual D (DCCNN)": (it_d, dual["dual"]),
                                                  "primal F (CCNN)": (it_p, primal["primal"]), "dual D (CCNN)": (it_p, primal["dual"])},
                         xlabel="iteration", ylabel="objective", title="upper and lower bounds")
    f_filters = line_plot(ctx.path("filters.png"), {"recovered CNN": (gf["r_grid"], [100 * a for a in gf["acc_r"]]),
                                                    "full dual solution": (gf["r_grid"], [100 * gf["acc_full_dual"]] * len(gf["r_grid"]))},
                          xlabel="number of recovered filters r", ylabel="test accuracy (%)", logx=True)
    f_mem = multi_plot(ctx.path("memory.png"), [
        dict(series={"DCCNN streamed": (mem["n"], mem["dual_mb"]), "CCNN cached": (mem["n"], mem["primal_mb"])},
             xlabel="n", ylabel="peak memory (MiB)"),
        dict(series={"DCCNN streamed": (mem["n"], mem["dual_s_per_iter"]), "CCNN cached": (mem["n"], mem["primal_s_per_iter"])},
             xlabel="n", ylabel="seconds per iteration (incl. setup)"),
    ])
    figures = [Figure(f_gap, "Duality gap of every iterate (dual PDHG and primal FISTA), log scale."),
               Figure(f_bounds, "Primal objective (upper bound) and feasible dual value (lower bound)."),
               Figure(f_filters, "Test accuracy of the CNN recovered with r filters from one dual solution."),
               Figure(f_mem, "Peak memory and time per iteration against the number of training images.")]
    if rows:
        series = {m: (list(range(len(rows))), [r[i] for r in rows]) for i, m in ((1, "CCNN"), (2, "DCCNN+recovery"), (3, "backprop CNN"))}
        figures.append(Figure(line_plot(ctx.path("errors.png"), series, xlabel="dataset (" + ", ".join(r[0] for r in rows) + ")",
                                        ylabel="test error (%)", kind="scatter"), "Test error per dataset."))

    # ---- claims, each decided by its measurement
    gaps = dual["residuals"]
    lower = max(max(dual["dual"]), max(primal["dual"]))
    upper = min(min(dual["primal"]), min(primal["primal"]))
    first = err_metrics.get(gf["dataset"], {})
    r_small = gf["r_grid"][-2] if len(gf["r_grid"]) > 1 else gf["r_grid"][-1]
    acc_small = gf["acc_r"][gf["r_grid"].index(r_small)]
    ratio = mem["primal_mb"][-1] / max(mem["dual_mb"][-1], 1e-9)
    dn = (mem["n"][-1] - mem["n"][0]) / mem["n"][0]
    growth = (mem["dual_mb"][-1] - mem["dual_mb"][0]) / max(mem["dual_mb"][0], 1e-9) / dn
    claims = [
        Claim("Every dual iterate gives a certified duality gap (weak duality holds at every iterate).",
              f"min over {len(gaps)} DCCNN iterates of F(Theta_t) - D(P_t) (>= 0), and lower <= upper across both solvers",
              f"min gap {min(gaps):.2e}; best lower {lower:.4f} <= best upper {upper:.4f}", min(gaps) >= -1e-9 and lower <= upper + 1e-9),
        Claim("The dual solver converges: the gap closes.",
              "DCCNN gap after the last iteration vs after the first",
              f"{gaps[0]:.3f} -> {gaps[-1]:.2e}", gaps[-1] < 0.05 * gaps[0]),
        Claim("The dual reaches the primal optimum (strong duality): DCCNN and CCNN certify the same value.",
              "|F(DCCNN) - F(CCNN)| at the end vs the sum of their gaps",
              f"{abs(dual['primal'][-1] - primal['primal'][-1]):.2e}",
              abs(dual["primal"][-1] - primal["primal"][-1]) <= gaps[-1] + primal["residuals"][-1] + 1e-9),
        Claim("Recovered filters reproduce the dual's predictions.",
              f"training-set agreement of recovered (r={s['filters']}) vs dual argmax on {gf['dataset']}",
              first.get("recovery_agreement", float("nan")), first.get("recovery_agreement", 0.0) >= 0.95),
        Claim(f"A few recovered filters keep the accuracy of the full solution (r={r_small}).",
              "test accuracy of the recovered CNN vs the dual's full-rank multiplier",
              f"{100 * acc_small:.1f}% vs {100 * gf['acc_full_dual']:.1f}%", acc_small >= gf["acc_full_dual"] - 0.01),
        Claim("DCCNN needs less memory than the primal with cached features.",
              f"peak memory ratio cached-primal / dual at n={mem['n'][-1]}", f"{ratio:.2f}x", ratio > 1.0),
        Claim("DCCNN's memory grows at most linearly in n.",
              "relative memory increase / relative increase of n (<= 1: at most linear)", f"{growth:.2f}", growth <= 1.0),
    ]
    if first:
        # "equal" up to sampling noise: two binomial standard errors of the test error (>= 1 point)
        p = first["ccnn_err"] / 100
        tol = max(1.0, 200 * (p * (1 - p) / s["n_test"]) ** 0.5)
        claims.append(Claim("DCCNN with recovery matches CCNN's test error.",
                            f"test error on {gf['dataset']} (n_train={s['n_train']}), tolerance 2 standard errors = {tol:.1f} points",
                            f"DCCNN {first['dccnn_err']:.1f}% vs CCNN {first['ccnn_err']:.1f}%",
                            abs(first["dccnn_err"] - first["ccnn_err"]) <= tol))
        claims.append(Claim("A convexified CNN is competitive with a back-propagation CNN of the same width.",
                            f"test error on {gf['dataset']}, r={s['filters']} filters, CNN trained by Adam; within {tol:.1f} points or better",
                            f"CCNN {first['ccnn_err']:.1f}% vs CNN {first['cnn_err']:.1f}%",
                            first["ccnn_err"] <= first["cnn_err"] + tol))
    notes.append("Budget-limited: quick uses a subset and few iterations; the seed's figures need size=full.")
    notes.append("The dual, its feasible shrinkage and the recovery are our derivation (see docs/convex.md).")
    tables = [Table("Test error (%) and final duality gaps", ["dataset", "CCNN", f"DCCNN (r={s['filters']})", "CNN", "CCNN gap", "DCCNN gap"], rows),
              Table("Memory vs n", ["n", "DCCNN MiB", "cached CCNN MiB"],
                    [[n, round(a, 1), round(b, 1)] for n, a, b in zip(mem["n"], mem["dual_mb"], mem["primal_mb"])])]
    return SuiteResult(method="convex", claims=claims, metrics=metrics, figures=figures, tables=tables, notes=notes)
