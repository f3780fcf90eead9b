"""``proxnets reproduce opteq``: the claims of seed 003 (OptEq), measured.

1. Accuracy and parameters of OptEq vs the MON baseline (at about equal parameter count) vs an
   explicit CNN on mnist5k (CIFAR-10 / full MNIST at size ``full`` when present).
2. The trained equilibrium minimizes the explicit objective G (optimality residual, random
   perturbations), G is non-increasing along the plain iteration, and the norm bound holds.
3. Solver iterations and residual/objective curves per solver on the trained layer; implicit
   gradients equal unrolled ones.
4. The L1 prior: feature sparsity of z* vs accuracy.
5. The anchored (Halpern) iteration selects the equilibrium nearest its anchor when |W|_2 = 1.

Runs on one intra-op thread (see :mod:`proxnets.utils.threads`).
"""

from __future__ import annotations

import time

import torch

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, evaluate, fit, seed_everything
from proxnets.engine.plotting import line_plot, multi_plot
from proxnets.equilibrium.models import (
    ExplicitCNN,
    MONClassifier,
    MONConfig,
    OptEqClassifier,
    OptEqConfig,
    certify_opteq,
    convergence_logger,
    count_parameters,
)
from proxnets.equilibrium.solvers import halpern, solve
from proxnets.report.suite import Claim, Figure, SuiteContext, SuiteResult, Table
from proxnets.utils.io import write_json

__all__ = ["run"]

TRAIN_TOL, TRAIN_MAX_ITER = 1e-3, 40
CERT_TOL = 1e-4  # the certificate's residual tolerance (certify_opteq's default)


def _train(model, ds, cfg: TrainConfig, ctx: SuiteContext, name: str) -> dict:
    counts: dict = {"solves": 0, "unconverged": 0, "iterations": 0}
    callbacks = [convergence_logger(model, ctx.log, counts, name)] if hasattr(model, "equilibrium_infos") else []
    t0 = time.perf_counter()
    result = fit(model, ds, cfg, callbacks=callbacks, log=lambda s: None)
    seconds = time.perf_counter() - t0
    acc = evaluate(model, ds.x_test, ds.y_test)
    ctx.log(f"{name}: test accuracy {acc:.4f}, {count_parameters(model)} parameters, {seconds:.1f} s")
    return {
        "test_acc": acc,
        "params": count_parameters(model),
        "train_seconds": seconds,
        "history": [h.get("test_acc") for h in result.history],
        "train_solves": counts["solves"],
        "train_unconverged": counts["unconverged"],
        "train_mean_iterations": counts["iterations"] / max(counts["solves"], 1),
    }


def _opteq_config(**kw) -> OptEqConfig:
    return OptEqConfig(tol=TRAIN_TOL, max_iter=TRAIN_MAX_ITER, policy="ignore", **kw)


def _solver_curves(model: OptEqClassifier, x: torch.Tensor, ctx: SuiteContext) -> tuple[dict, Figure]:
    block = model.blocks[0]
    runs = {}
    with torch.no_grad():
        inj, w = block.injection(model.stem(x)), block.W.weight
        T = block.fixed_point_map(inj, w)
        G = lambda v: block.objective(v, inj=inj, w=w)  # noqa: E731
        for name, opts in [("fixed_point", {}), ("accelerated", {"restart": "objective"}), ("accelerated", {}),
                           ("anderson", {})]:
            label = name + ("+objective-restart" if opts else "")
            _, info = solve(name, T, torch.zeros_like(inj), tol=CERT_TOL, max_iter=400, objective=G, **opts)
            runs[label] = info
    g_min = min(min(i.objectives) for i in runs.values())
    resid = {k: (list(range(1, len(i.residuals) + 1)), i.residuals) for k, i in runs.items()}
    scale = max(abs(g_min), 1e-30)
    gap = {k: (list(range(len(i.objectives))), [max((g - g_min) / scale, 1e-9) for g in i.objectives])
           for k, i in runs.items()}
    path = multi_plot(ctx.path("solver_curves.png"), [
        dict(series=resid, xlabel="iteration", ylabel="relative residual |T(z)-z|/|T(z)|", logy=True,
             title="residual per solver"),
        dict(series=gap, xlabel="iteration", ylabel="(mean G(z_k) - min G) / |min G|", logy=True,
             title="relative objective gap (float32: floor ~1e-7)"),
    ])
    metrics = {k: {"iterations": i.iterations, "converged": i.converged, "restarts": i.restarts,
                   "final_residual": i.residuals[-1]} for k, i in runs.items()}
    return metrics, Figure(path, "Trained OptEq layer, one test batch: residual and objective per solver (to 1e-4).")


def _gradient_check(model: OptEqClassifier, x: torch.Tensor) -> float:
    """Relative difference of implicit and unrolled gradients of the trained layer (float64)."""
    import copy

    block = copy.deepcopy(model.blocks[0]).double().eval()
    xin = model.stem(x).detach().double()
    grads = {}
    for backward in ("implicit", "unrolled"):
        block.backward_config.mode = backward
        block.tol, block.max_iter, block.backward_config.tol, block.backward_config.max_iter = 1e-10, 2000, 1e-10, 2000
        loss = block(xin).pow(2).sum()
        grads[backward] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(block.parameters()))])
    return float((grads["implicit"] - grads["unrolled"]).norm() / grads["unrolled"].norm())


def _anchored(ctx: SuiteContext) -> tuple[dict, Figure]:
    """|W|_2 = 1: T(z) = relu(P z + b), P the projection on span(u), b > 0 orthogonal to u.

    Fix(T) is the segment {b + t u : |t| <= 1} (b = (1, 1), u = (1, -1)/sqrt(2) scaled), so the
    fixed point nearest an anchor a is b + clamp(<a - b, u>, -|b|, |b|) u: known in closed form.
    """
    u = torch.tensor([[1.0, -1.0]], dtype=torch.float64) / 2**0.5  # W = u (1 x 2), |W|_2 = 1
    p = u.T @ u
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    T = lambda z: torch.relu(z @ p + b)  # noqa: E731
    anchors = torch.tensor([[3.0, 1.0], [-1.0, 0.5], [0.5, 3.5], [2.5, 2.0]], dtype=torch.float64)
    t = ((anchors - b) @ u.T).clamp(-2**0.5, 2**0.5)
    nearest = b + t * u
    series, errors, its = {}, [], []
    trace = [anchors]
    z = anchors
    info = None
    for k in range(3000):  # the Halpern recursion, kept step by step for the figure
        beta = 1.0 / (k + 2)
        z = beta * anchors + (1 - beta) * T(z)
        trace.append(z)
    z_h, info = halpern(T, anchors.clone(), tol=1e-5, max_iter=20000)
    errors = (z_h - nearest).norm(dim=1).tolist()
    its = info.iterations
    traj = torch.stack(trace)  # (K, 4, 2)
    for i in range(anchors.shape[0]):
        series[f"anchor {i}"] = (traj[:, i, 0].tolist(), traj[:, i, 1].tolist())
    series["fixed-point set"] = ([0.0, 2.0], [2.0, 0.0])
    # plain iteration from the same points: converges to *a* fixed point, not necessarily the nearest
    z_fp, _ = solve("fixed_point", T, anchors.clone(), tol=1e-10, max_iter=200)
    path = line_plot(ctx.path("anchored.png"), series, xlabel="z_1", ylabel="z_2",
                     title="anchored iterations, |W|_2 = 1")
    distinct = float(torch.cdist(z_h, z_h).max())
    return {
        "halpern_iterations": its,
        "halpern_converged": info.converged,
        "distance_to_nearest_fixed_point": errors,
        "max_pairwise_distance_between_selected_equilibria": distinct,
        "plain_iteration_distance_to_nearest": (z_fp - nearest).norm(dim=1).tolist(),
    }, Figure(path, "|W|_2 = 1, non-unique equilibria (the segment): anchored iterations from four anchors.")


def _sparsity(model: OptEqClassifier, x: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        z = model.features(x)
    return float((z == 0).float().mean())


def run(ctx: SuiteContext) -> SuiteResult:
    t_start = time.perf_counter()
    seed_everything(ctx.seed)
    notes = []
    name = ctx.pick(smoke="mnist5k", quick="mnist5k", full="cifar10")
    try:
        ds = load_dataset(name, seed=ctx.seed, data_dir=ctx.data_dir)
    except (FileNotFoundError, OSError, ValueError) as err:
        notes.append(f"{name} not available ({err}); used mnist5k")
        ds = load_dataset("mnist5k", seed=ctx.seed)
    n_train = ctx.pick(smoke=500, quick=min(3000, len(ds.y_train)), full=len(ds.y_train))
    n_test = ctx.pick(smoke=200, quick=len(ds.y_test), full=len(ds.y_test))
    if (n_train, n_test) != (len(ds.y_train), len(ds.y_test)):
        ds = ds.subset(n_train, n_test, ctx.seed)
    epochs = ctx.pick(smoke=2, quick=3, full=30)
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=2e-3, seed=ctx.seed, progress=False,
                      eval_every_epoch=ctx.size == "full")
    width = ctx.pick(smoke=8, quick=16, full=48)
    mon_width = ctx.pick(smoke=7, quick=13, full=39)  # about the parameter count of OptEq
    ctx.log(f"opteq suite: {name}, {len(ds.y_train)} train / {len(ds.y_test)} test, "
            f"{epochs} epochs")

    # 1. OptEq vs MON vs explicit CNN
    models = {
        "OptEq": OptEqClassifier(ds.input_shape, ds.num_classes, _opteq_config(stem_channels=width, channels=width)),
        "MON": MONClassifier(ds.input_shape, ds.num_classes, MONConfig(stem_channels=width, channels=mon_width,
                                                                      tol=TRAIN_TOL, max_iter=TRAIN_MAX_ITER,
                                                                      policy="ignore")),
        "explicit CNN": ExplicitCNN(ds.input_shape, ds.num_classes, stem_channels=width, channels=width),
    }
    results = {k: _train(m, ds, cfg, ctx, k) for k, m in models.items()}
    opteq = models["OptEq"]

    # 2. certificate of the trained equilibrium
    x_batch = ds.x_test[:128]
    opteq.eval()
    cert = certify_opteq(opteq, x_batch, seed=ctx.seed)[0]
    ctx.log(f"certificate: residual {cert['residual']:.2e}, |W|_2 {cert['operator_norm']:.4f}")

    # 3. solvers and gradients
    solver_metrics, solver_fig = _solver_curves(opteq, x_batch, ctx)
    grad_diff = _gradient_check(opteq, x_batch[:8])
    ctx.log(f"solvers: { {k: v['iterations'] for k, v in solver_metrics.items()} }, implicit vs unrolled {grad_diff:.1e}")

    # 4. L1 prior
    l1_values = ctx.pick(smoke=[0.2], quick=[0.1, 0.3], full=[0.03, 0.1, 0.3, 1.0])
    l1_rows = [{"l1": 0.0, "test_acc": results["OptEq"]["test_acc"], "sparsity": _sparsity(opteq, x_batch)}]
    for lam in l1_values:
        seed_everything(ctx.seed)
        m = OptEqClassifier(ds.input_shape, ds.num_classes, _opteq_config(stem_channels=width, channels=width, l1=lam))
        r = _train(m, ds, cfg, ctx, f"OptEq l1={lam}")
        l1_rows.append({"l1": lam, "test_acc": r["test_acc"], "sparsity": _sparsity(m, x_batch)})
    l1_fig = line_plot(ctx.path("l1_prior.png"), {
        f"l1={r['l1']}": ([r["sparsity"]], [r["test_acc"]]) for r in l1_rows
    }, xlabel="fraction of zero features in z*", ylabel="test accuracy", kind="scatter",
        title="L1 prior on the equilibrium: sparsity vs accuracy")

    # 5. anchored iteration
    anchored, anchored_fig = _anchored(ctx)

    # training curves figure (test accuracy per epoch, only recorded at size full)
    acc_fig = line_plot(ctx.path("accuracy.png"), {
        f"{k} ({v['params']} params)": ([float(i + 1) for i in range(len(v["history"]))],
                                        [a if a is not None else v["test_acc"] for a in v["history"]])
        for k, v in results.items()
    }, xlabel="epoch", ylabel="test accuracy", title=f"{len(ds.y_train)} training images")

    fixed = solver_metrics["fixed_point"]["iterations"]
    best_fast = min(solver_metrics["accelerated"]["iterations"], solver_metrics["anderson"]["iterations"])
    sparsities = [r["sparsity"] for r in l1_rows]
    claims = [
        Claim("The OptEq equilibrium minimizes an explicit convex objective G",
              "trained layer, 128 test images: max relative residual |T(z)-z|/|T(z)| (<= 1e-4) and the fraction of "
              "30 in-domain random perturbations d with G(z*+d) >= G(z*)",
              f"residual {cert['residual']:.1e}, {cert['perturbations_not_better']:.2f} not better",
              cert["residual"] <= CERT_TOL and cert["perturbations_not_better"] == 1.0),
        Claim("The plain fixed-point iteration is proximal gradient on G, so G never increases",
              "largest increase of mean G along the plain iteration, relative to |G|",
              f"{cert['fixed_point_max_relative_increase_of_G']:.1e}",
              cert["fixed_point_max_relative_increase_of_G"] <= 1e-6),
        Claim("|W|_2 < 1 is kept by the operator-norm parametrization (convex, unique equilibrium)",
              "power iteration to convergence on the trained convolution W at its input size",
              f"{cert['operator_norm']:.4f} (target {cert['target_norm']})",
              cert["operator_norm"] <= cert["target_norm"] * (1 + 1e-4)),
        Claim("Convex-optimization acceleration applies: accelerated/Anderson need fewer iterations than the plain one",
              "iterations to relative residual 1e-4 on the trained layer",
              f"fixed point {fixed}, fastest {best_fast}", best_fast < fixed),
        Claim("Implicit differentiation gives the exact gradient through the equilibrium",
              "relative difference of implicit and unrolled gradients (float64, tol 1e-10)",
              f"{grad_diff:.1e}", grad_diff <= 1e-6),
        Claim("OptEq beats an earlier implicit model (MON) with fewer parameters",
              f"test accuracy on {len(ds.y_test)} images after {epochs} epochs; trainable parameters",
              f"OptEq {results['OptEq']['test_acc']:.3f} ({results['OptEq']['params']}), "
              f"MON {results['MON']['test_acc']:.3f} ({results['MON']['params']})",
              results["OptEq"]["test_acc"] >= results["MON"]["test_acc"]
              and results["OptEq"]["params"] <= results["MON"]["params"]),
        Claim("A prior added to G changes the layer consistently: an L1 prior makes the equilibrium sparser",
              "fraction of exact zeros in z* on 128 test images for increasing L1 weight",
              ", ".join(f"l1={r['l1']}: {r['sparsity']:.2f}" for r in l1_rows),
              all(b > a for a, b in zip(sparsities, sparsities[1:]))),
        Claim("The anchored iteration selects the equilibrium nearest its anchor when |W|_2 = 1",
              "4 anchors, fixed-point set a segment: distance of the Halpern limit to the exact nearest fixed point",
              f"max {max(anchored['distance_to_nearest_fixed_point']):.1e}, equilibria spread "
              f"{anchored['max_pairwise_distance_between_selected_equilibria']:.2f}",
              max(anchored["distance_to_nearest_fixed_point"]) <= 1e-3
              and anchored["max_pairwise_distance_between_selected_equilibria"] > 0.5),
    ]
    metrics = {
        "dataset": {"name": name, "n_train": len(ds.y_train), "n_test": len(ds.y_test), "epochs": epochs},
        "models": results,
        "certificate": cert,
        "solvers": solver_metrics,
        "implicit_vs_unrolled_relative_difference": grad_diff,
        "l1_prior": l1_rows,
        "anchored": anchored,
        "seconds": time.perf_counter() - t_start,
    }
    write_json(ctx.path("metrics.json"), metrics)
    tables = [
        Table("OptEq vs MON vs explicit CNN", ["model", "test accuracy", "parameters", "train s",
                                               "mean solver iterations", "solves above tol"],
              [[k, round(v["test_acc"], 4), v["params"], round(v["train_seconds"], 1),
                round(v["train_mean_iterations"], 1) if v["train_solves"] else "-",
                f"{v['train_unconverged']}/{v['train_solves']}" if v["train_solves"] else "-"]
               for k, v in results.items()]),
        Table("Solvers on the trained layer (to 1e-4)", ["solver", "iterations", "restarts", "converged"],
              [[k, v["iterations"], v["restarts"], v["converged"]] for k, v in solver_metrics.items()]),
        Table("L1 prior", ["l1", "test accuracy", "zero fraction of z*"],
              [[r["l1"], round(r["test_acc"], 4), round(r["sparsity"], 3)] for r in l1_rows]),
    ]
    if ctx.size != "full":
        notes.append(f"size {ctx.size}: {len(ds.y_train)} training images, {epochs} epochs, width {width}; "
                     "accuracies are far from converged and compare models at equal budget only")
    return SuiteResult(
        method="opteq",
        claims=claims,
        metrics=metrics,
        figures=[Figure(acc_fig, "Test accuracy per epoch (final only below size full)."), solver_fig,
                 Figure(l1_fig, "L1 prior: sparsity of z* against test accuracy."), anchored_fig],
        tables=tables,
        notes=notes,
    )
