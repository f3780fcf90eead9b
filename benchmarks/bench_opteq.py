"""Benchmark: OptEq conv layer, forward solve to relative residual 1e-4 plus implicit backward.

Ours (every solver of the registry that suits a unique equilibrium) against TorchDEQ's ``anderson``
and ``fixed_point_iter`` (implicit differentiation, same tolerance; TorchDEQ stops on the per-sample
``|f(z) - z| / |f(z)|``, ours (:mod:`proxnets.solvers`) on ``|f(z) - z| / max(|f(z)|, |z|)``, equal at a
fixed point; the residual column recomputes TorchDEQ's stricter form for every method), on the *same* layer map
``T(z) = relu(W^T W z + U x + b)`` and the same batch of 128 MNIST stem features, in two regimes:
``|W|_2 = 0.97`` (bound active, the hard regime) and after training the classifier.
Reports per method: median time of forward+backward, median backward time, forward/backward
iterations, the residual reached (recomputed on the returned point), peak memory, and the ratio
of our fastest to TorchDEQ's fastest (target: <= 0.4), in wall time and in CPU time
(``time.process_time``, which a loaded machine distorts less). One row runs the opt-in fused bookkeeping
(``fused=True`` of :mod:`proxnets.solvers`, forward and adjoint): its kernels are compiled by an untimed first step
(wall time printed, cold compiler cache) and its ratios to TorchDEQ's fastest and to its eager twin are printed.

Also, in the same run: the joint deep OptEq (:class:`~proxnets.equilibrium.deep.DeepOptEq`, L dense layers of
width n, the bound ``|W|_2 = 0.97`` active) against one dense OptEq layer of width n, forward to 1e-4 plus
implicit backward: CPU time per layer and its ratio to the single layer's (target: <= 1); and the same for the
convolutional joint deep OptEq (:class:`~proxnets.equilibrium.deep.DeepOptEqConv2d`, L layers of 16 channels on the
stem features) against one :class:`OptEqConv2d` of 16 channels.

``--baselines`` (instead): accuracy of OptEq against its baselines at the suite's quick size (mnist5k, 1500
training / 500 validation / 1000 test images, 3 epochs, same tolerance 1e-3 and cap 100), 3 seeds, paired
95% intervals: MON twice, with forward-backward at 1.8 m / L^2 (the largest step the certificate proves safe,
zero padding) and with its own Peaceman-Rachford solver: circular padding and FFT resolvent at the suite's alpha
(``MON_PR_ALPHA`` = 2, which the next row's validation pick gave) and at alpha picked on validation, and zero padding with the CG resolvent at alpha picked on
validation; a DEQ on TorchDEQ's Anderson at equal parameters, and OptEq with equilibrium selection at
``|W|_2 <= 1`` with the feed-forward and with the learned linear anchor; with each model's training CPU time.
``--rows`` runs a subset (substrings of the row names; OptEq always runs).

Usage: ``python benchmarks/bench_opteq.py [--quick] [--breakdown | --baselines [--rows ...]]`` (``--breakdown``: the CPU time of
one step split into map applications and the rest, forward and backward, ours and TorchDEQ's, both regimes). Runs on one CPU thread (see
:mod:`proxnets.utils.threads`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, fit
from proxnets.equilibrium.layers import OptEqConv2d
from proxnets.equilibrium.models import OptEqClassifier, OptEqConfig
from proxnets.utils.threads import intra_op_threads
from proxnets.utils.benchmark import peak_memory_mb, ratio_line, time_interleaved

TOL = 1e-4
MAX_ITER = 400


def _layer_at_bound(channels: int, spatial: tuple[int, int], stem_channels: int, seed: int) -> OptEqConv2d:
    torch.manual_seed(seed)
    layer = OptEqConv2d(stem_channels, channels, spatial, target_norm=0.97, tol=TOL, max_iter=MAX_ITER, policy="warn")
    with torch.no_grad():  # make the bound active: |W|_2 = 0.97 exactly
        layer.W.parametrizations.weight.original.mul_(10.0)
    return layer.eval()


def _trained_layer(ds, steps: int, seed: int) -> tuple[OptEqConv2d, torch.nn.Module]:
    torch.manual_seed(seed)
    model = OptEqClassifier(ds.input_shape, ds.num_classes, OptEqConfig(tol=1e-3, max_iter=60, policy="ignore"))
    fit(model, ds, TrainConfig(epochs=100, max_steps=steps, batch_size=64, lr=2e-3, progress=False), log=lambda s: None)
    model.eval()  # exact refresh of the norm bound
    block = model.blocks[0]
    block.tol, block.max_iter, block.policy = TOL, MAX_ITER, "warn"
    return block, model.stem


def _run_ours(layer: OptEqConv2d, x: torch.Tensor, c: torch.Tensor, solver: str, options: dict, backward_solver: str,
              fused: bool = False):
    layer.solver, layer.solver_options = solver, dict(options, fused=True) if fused else options
    layer.backward_config.solver = backward_solver
    layer.backward_config.options = {"fused": True} if fused else {}
    layer.backward_config.tol, layer.backward_config.max_iter = TOL, MAX_ITER
    params = list(layer.parameters())

    def forward():
        return layer(x)

    def step():
        z = forward()
        grads = torch.autograd.grad((c * z).sum(), params)
        return z, grads

    return forward, step, lambda: layer.last_info


def _run_torchdeq(layer: OptEqConv2d, x: torch.Tensor, c: torch.Tensor, solver: str):
    from torchdeq import get_deq

    deq = get_deq(
        f_solver=solver, b_solver=solver, f_max_iter=MAX_ITER, b_max_iter=MAX_ITER, f_tol=TOL, b_tol=TOL,
        f_stop_mode="rel", b_stop_mode="rel", ift=True,
    )
    params = list(layer.parameters())
    holder = {}

    def forward():
        inj = layer.injection(x)
        T = layer.fixed_point_map(inj, layer.W.weight)
        z_out, info = deq(T, torch.zeros_like(inj))
        holder["info"] = info
        return z_out[-1]

    def step():
        z = forward()
        grads = torch.autograd.grad((c * z).sum(), params)
        return z, grads

    return forward, step, lambda: holder.get("info")


def _strict_residual(z: torch.Tensor, tz: torch.Tensor) -> float:
    """TorchDEQ's stopping quantity ``max_i |T(z)_i - z_i| / |T(z)_i|`` (at least ours, whose scale is larger)."""
    num = torch.linalg.vector_norm((tz - z).flatten(1), dim=1)
    return float((num / torch.linalg.vector_norm(tz.flatten(1), dim=1).clamp_min(1e-30)).max())


def _describe(name, forward, step, info_fn, layer, x):
    """Iterations, residual of the returned point (one more application of T) and peak memory."""
    with torch.no_grad():
        z = forward()
        T = layer.fixed_point_map(layer.injection(x), layer.W.weight)
        residual = _strict_residual(z, T(z))
    step()
    info = info_fn()
    if hasattr(info, "iterations"):
        f_it = info.iterations
        b_it = info.backward.iterations if info.backward is not None else None
    else:  # TorchDEQ's statistics dict
        f_it = int(info["nstep"].max()) if info is not None and "nstep" in info else None
        b_it = None
    return {"method": name, "forward_iters": f_it, "backward_iters": b_it, "residual": residual,
            "peak_mb": peak_memory_mb(step)}


def _torchdeq_backward_iters(layer, x, c, solver):
    """TorchDEQ reports backward statistics through a writer callback."""
    from torchdeq import get_deq

    deq = get_deq(f_solver=solver, b_solver=solver, f_max_iter=MAX_ITER, b_max_iter=MAX_ITER, f_tol=TOL, b_tol=TOL,
                  f_stop_mode="rel", b_stop_mode="rel", ift=True)
    seen = {}
    inj = layer.injection(x)
    z_out, _ = deq(layer.fixed_point_map(inj, layer.W.weight), torch.zeros_like(inj),
                   backward_writer=lambda stat: seen.update(nstep=int(stat["nstep"].max())))
    (c * z_out[-1]).sum().backward()
    layer.zero_grad()
    return seen.get("nstep")


def _cpu_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median CPU time (``time.process_time``: this process only, so waiting for a core on a loaded
    machine is not counted; one intra-op thread) per call, rounds interleaved like the wall times."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def bench_regime(title, layer, x, repeats, have_torchdeq):
    torch.manual_seed(1)
    with torch.no_grad():
        c = torch.randn_like(layer.injection(x))
    runs, configs = {}, {}
    for solver, backward_solver, fused in [
            ("safeguarded_anderson", "conjugate_gradient", False), ("accelerated", "conjugate_gradient", False),
            ("accelerated", "conjugate_gradient", True), ("anderson", "conjugate_gradient", False),
            ("accelerated", "accelerated", False), ("anderson", "anderson", False), ("fixed_point", "fixed_point", False)]:
        name = f"ours:{solver}/{backward_solver}" + (" fused" if fused else "")
        configs[name] = (solver, {}, backward_solver, fused)
        runs[name] = _run_ours(layer, x, c, *configs[name])
    if have_torchdeq:
        for solver in ("anderson", "fixed_point_iter"):
            runs[f"torchdeq:{solver}"] = _run_torchdeq(layer, x, c, solver)
    for name, config in configs.items():  # compile the fused kernels before anything is timed
        if config[3]:
            _run_ours(layer, x, c, *config)
            t0 = time.perf_counter()
            runs[name][1]()
            print(f"{title}: {name}: first step (torch.compile of the kernels at this shape, cold cache) "
                  f"{time.perf_counter() - t0:.1f} s wall; excluded from the timed rounds")
    rows = []
    for name, (forward, step, info_fn) in runs.items():
        if name in configs:  # the layer's solver settings are per run: set them again
            _run_ours(layer, x, c, *configs[name])
        row = _describe(name, forward, step, info_fn, layer, x)
        if name.startswith("torchdeq"):
            row["backward_iters"] = _torchdeq_backward_iters(layer, x, c, name.split(":")[1])
        rows.append(row)

    def bind(name, fn):
        def call():
            if name in configs:
                _run_ours(layer, x, c, *configs[name])
            return fn()
        return call

    totals = time_interleaved({n: bind(n, r[1]) for n, r in runs.items()}, repeats=repeats)
    forwards = time_interleaved({n: bind(n, lambda f=r[0]: f().detach()) for n, r in runs.items()}, repeats=repeats)
    cpu = _cpu_interleaved({n: bind(n, r[1]) for n, r in runs.items()}, repeats)
    for row in rows:
        total, fwd = totals[row["method"]], forwards[row["method"]]
        row.update(total_ms=total.median * 1e3, total_iqr_ms=(total.q1 * 1e3, total.q3 * 1e3),
                   cpu_ms=cpu[row["method"]] * 1e3,
                   forward_ms=fwd.median * 1e3, backward_ms=max(total.median - fwd.median, 0.0) * 1e3)
    print(f"\n== {title}: |W|_2 = {layer.operator_norm():.4f}, batch {x.shape[0]}, z {tuple(x.shape[1:])} ==")
    print(f"{'method':36s} {'fwd+bwd ms':>11s} {'IQR':>13s} {'cpu ms':>8s} {'bwd ms':>8s} {'f-it':>5s} {'b-it':>5s} {'residual':>9s} {'peak MB':>8s}")
    for r in rows:
        iqr = f"{r['total_iqr_ms'][0]:.0f}-{r['total_iqr_ms'][1]:.0f}"
        print(f"{r['method']:36s} {r['total_ms']:11.1f} {iqr:>13s} {r['cpu_ms']:8.1f} {r['backward_ms']:8.1f} {str(r['forward_iters']):>5s} "
              f"{str(r['backward_iters']):>5s} {r['residual']:9.2e} {r['peak_mb']:8.1f}")
    ours = min((r for r in rows if r["method"].startswith("ours")), key=lambda r: r["total_ms"])
    theirs = [r for r in rows if r["method"].startswith("torchdeq")]
    if theirs:
        best = min(theirs, key=lambda r: r["total_ms"])
        ratio = ours["total_ms"] / best["total_ms"]
        print(ratio_line(f"{title}, {ours['method']} vs {best['method']}", totals[ours["method"]],
                         totals[best["method"]], best["method"]) + f", time ratio {ratio:.2f}x (target <= 0.4x)")
        ours_cpu = min(r["cpu_ms"] for r in rows if r["method"].startswith("ours"))
        best_cpu = min(r["cpu_ms"] for r in theirs)
        print(f"{title}: CPU-time ratio ours' fastest / TorchDEQ's fastest {ours_cpu / best_cpu:.2f}x "
              f"({ours_cpu:.1f} vs {best_cpu:.1f} ms)")
        eager_cpu = min(r["cpu_ms"] for r in rows if r["method"].startswith("ours") and "fused" not in r["method"])
        fused_cpu = {r["method"]: r["cpu_ms"] for r in rows if "fused" in r["method"]}
        for name, ms in fused_cpu.items():
            twin = cpu[name.replace(" fused", "")] * 1e3
            print(f"{title}: CPU-time ratio {name} / TorchDEQ's fastest {ms / best_cpu:.2f}x; ours' fastest eager "
                  f"{eager_cpu / best_cpu:.2f}x; fused / its eager twin {ms / twin:.2f}x ({ms:.1f} vs {twin:.1f} ms)")
    return rows


def _per_layer_ratio(models: dict, x: torch.Tensor, cotangent, layers: int, title: str, refresh: bool,
                     repeats: int) -> float:
    """Interleaved fwd+bwd CPU time of ``models`` (one single layer, then the joint deep one), per layer; prints each and
    returns deep per layer / single. The bound 0.97 is made active on both (weights x 10)."""
    calls = {}
    for name, m in models.items():
        with torch.no_grad():
            m.W.parametrizations.weight.original.mul_(10.0)  # the bound 0.97 active
        if refresh:
            m.train()  # refresh the norm estimate after the rescaling
        m.eval()
        params = [p for p in m.parameters() if p.requires_grad]
        c = cotangent(m)

        def step(m=m, params=params, c=c):
            torch.autograd.grad((c * m(x)).sum(), params)

        calls[name] = step
    cpu = _cpu_interleaved(calls, repeats)
    print(f"\n== {title} ==")
    single, deep = list(models)
    for name, m in models.items():
        per = cpu[name] / (layers if name == deep else 1)
        it = m.last_info
        print(f"{name:22s} CPU {cpu[name] * 1e3:8.1f} ms, per layer {per * 1e3:7.1f} ms, "
              f"f-it {it.iterations}, b-it {it.backward.iterations if it.backward else None}")
    return cpu[deep] / layers / cpu[single]


def bench_deep(repeats: int, n: int = 256, layers: int = 3, batch: int = 128, in_features: int = 196,
               solver: str = "accelerated") -> float:
    """Per-layer CPU time of the joint deep OptEq / that of one OptEq layer (same width, tol, solvers)."""
    from proxnets.equilibrium import DeepOptEq, OptEq

    torch.manual_seed(0)
    x = torch.randn(batch, in_features)
    # the same forward solver on both sides (the layers' defaults differ: DeepOptEq keeps "accelerated")
    models = {"single OptEq": OptEq(in_features, n, solver=solver, tol=TOL, max_iter=MAX_ITER, policy="warn"),
              f"DeepOptEq x{layers}": DeepOptEq(in_features, [n] * layers, solver=solver, tol=TOL, max_iter=MAX_ITER,
                                                policy="warn")}
    title = f"joint deep OptEq vs one layer: dense, width {n}, batch {batch}, |W|_2 = 0.97, tol {TOL}, {solver}"
    ratio = _per_layer_ratio(models, x, lambda m: torch.randn(batch, n), layers, title, refresh=False, repeats=repeats)
    print(f"deep OptEq: CPU time per layer / single layer's {ratio:.2f}x (target <= 1)")
    return ratio


def bench_deep_conv(repeats: int, x: torch.Tensor, channels: int = 16, layers: int = 3,
                    solver: str = "safeguarded_anderson") -> float:
    """Per-layer CPU time of the convolutional joint deep OptEq / that of one conv OptEq layer (same channels per
    layer, input, tol, solvers; the bound 0.97 active on both)."""
    from proxnets.equilibrium import DeepOptEqConv2d

    torch.manual_seed(0)
    spatial, cin = tuple(x.shape[2:]), x.shape[1]
    models = {"single OptEqConv2d": OptEqConv2d(cin, channels, spatial, solver=solver, tol=TOL, max_iter=MAX_ITER,
                                                policy="warn"),
              f"DeepOptEqConv2d x{layers}": DeepOptEqConv2d(cin, [channels] * layers, spatial, solver=solver, tol=TOL,
                                                           max_iter=MAX_ITER, policy="warn")}
    title = (f"joint deep conv OptEq vs one conv layer: {channels} channels per layer, batch {x.shape[0]}, {spatial}, "
             f"|W|_2 = 0.97, tol {TOL}, {solver}")
    ratio = _per_layer_ratio(models, x, lambda m: torch.randn(x.shape[0], channels, *spatial), layers, title,
                             refresh=True, repeats=repeats)
    print(f"deep conv OptEq: CPU time per layer / single layer's {ratio:.2f}x (flop bound at equal iterations "
          f"{(2 * layers - 1) / layers:.2f}x)")
    return ratio


def _conv_counts(forward, params, c) -> tuple[int, int]:
    """Convolutions (forward and transposed, and their autograd backward) run in the forward and in the backward
    phase of one step, counted by the profiler (top-level convolution ops only)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("PHASE_fwd"):
            z = forward()
        with record_function("PHASE_bwd"):
            torch.autograd.grad((c * z).sum(), params)
    counts = {"fwd": 0, "bwd": 0}
    for e in prof.events():
        if "conv" in e.name and not (e.cpu_parent is not None and "conv" in e.cpu_parent.name):
            p = e
            while p is not None and not p.name.startswith("PHASE_"):
                p = p.cpu_parent
            if p is not None:
                counts[p.name[6:]] += 1
    return counts["fwd"], counts["bwd"]


def bench_breakdown(title, layer, x, repeats, have_torchdeq) -> None:
    """CPU time of one step split into forward phase and backward phase, each into its map applications (two
    convolutions each: ``n`` times the median cost of one ``T`` evaluation, measured in the same rounds) and the
    rest (solver bookkeeping, the elementwise work, the injection, weight gradients, autograd), for our two fastest
    methods and TorchDEQ's two. ``n`` is half the convolutions the profiler counts in that phase (an untimed
    step); a TorchDEQ backward iteration is one vector-Jacobian product through ``T`` (two convolution
    backwards), counted and priced as one map."""
    torch.manual_seed(1)
    with torch.no_grad():
        c = torch.randn_like(layer.injection(x))
    params = list(layer.parameters())
    configs = {f"ours:{s}/conjugate_gradient" + (" fused" if f else ""): (s, {}, "conjugate_gradient", f)
               for s, f in (("safeguarded_anderson", False), ("accelerated", False), ("accelerated", True))}
    methods = {name: _run_ours(layer, x, c, *config) for name, config in configs.items()}
    if have_torchdeq:
        methods.update({f"torchdeq:{s}": _run_torchdeq(layer, x, c, s) for s in ("fixed_point_iter", "anderson")})

    def configure(name):
        if name in configs:
            _run_ours(layer, x, c, *configs[name])

    counts, times = {}, {n: {"fwd": [], "bwd": []} for n in methods}
    for name, (forward, step, _) in methods.items():
        configure(name)
        step()  # the fused kernels compile here, untimed
        counts[name] = _conv_counts(forward, params, c)
    with torch.no_grad():
        T = layer.fixed_point_map(layer.injection(x), layer.W.weight)
        z_ref = T(T(torch.zeros_like(c)))
    t_map = []
    for _ in range(repeats):
        for name, (forward, _, _) in methods.items():
            configure(name)
            t0 = time.process_time()
            z = forward()
            t1 = time.process_time()
            torch.autograd.grad((c * z).sum(), params)
            t2 = time.process_time()
            times[name]["fwd"].append(t1 - t0)
            times[name]["bwd"].append(t2 - t1)
        with torch.no_grad():
            t0 = time.process_time()
            for _ in range(5):
                T(z_ref)
            t_map.append((time.process_time() - t0) / 5)
    med = lambda v: sorted(v)[len(v) // 2] * 1e3  # noqa: E731
    tm = med(t_map)
    print(f"\n== breakdown, {title}: CPU ms per step (median of {repeats} interleaved rounds); one T evaluation "
          f"{tm:.2f} ms ==")
    print(f"{'method':40s} {'fwd':>7s} {'maps':>5s} {'map ms':>7s} {'rest':>7s} | {'bwd':>7s} {'maps':>5s} "
          f"{'map ms':>7s} {'rest':>7s} | {'total':>7s} {'rest %':>6s}")
    for name in methods:
        f, b = med(times[name]["fwd"]), med(times[name]["bwd"])
        nf, nb = counts[name][0] / 2, counts[name][1] / 2
        print(f"{name:40s} {f:7.1f} {nf:5.1f} {nf * tm:7.1f} {f - nf * tm:7.1f} | {b:7.1f} {nb:5.1f} {nb * tm:7.1f} "
              f"{b - nb * tm:7.1f} | {f + b:7.1f} {100 * (f + b - (nf + nb) * tm) / (f + b):6.0f}")


PR_ALPHA_GRID = (0.5, 1.0, 2.0)  # MON's Peaceman-Rachford step, picked on validation accuracy (seed 0)


def bench_baselines(seeds: int = 3, rows: list[str] | None = None) -> dict:
    """OptEq vs MON vs DEQ (TorchDEQ Anderson) vs selection OptEq at the suite's quick size (module docstring).

    ``rows``: substrings of the row names to run (OptEq, the reference of every difference, always runs).
    Rows marked "alpha on val" train seed 0 at every step of :data:`PR_ALPHA_GRID`, keep the step with the
    best final validation accuracy (500 images held out of training; test accuracy never enters), and run
    the other seeds at that step."""
    import dataclasses

    from proxnets.data import stratified_split
    from proxnets.engine import seed_everything
    from proxnets.equilibrium import experiments as E
    from proxnets.equilibrium.models import DEQClassifier, DEQConfig, MONClassifier, MONConfig, count_parameters
    from proxnets.report.suite import SuiteContext
    from proxnets.utils.stats import difference_interval, mean_interval

    ds = load_dataset("mnist5k", seed=0).subset(2000, 1000, 0)
    val_idx, train_idx = stratified_split(ds.y_train, 500, 0)
    val = (ds.x_train[val_idx], ds.y_train[val_idx])
    ds = dataclasses.replace(ds, x_train=ds.x_train[train_idx], y_train=ds.y_train[train_idx])
    width = 16
    mon = dict(stem_channels=width, channels=13, tol=E.TRAIN_TOL, max_iter=E.TRAIN_MAX_ITER, policy="ignore",
               step_scale=E.MON_STEP_SCALE)
    pr = dict(mon, solver="peaceman_rachford")
    # name -> (builder taking the PR step or None, whether the step is picked on validation)
    make = {
        "OptEq": (lambda _: OptEqClassifier(ds.input_shape, 10, E._opteq_config(stem_channels=width, channels=width)),
                  False),
        "MON (FB, zero pad)": (lambda _: MONClassifier(ds.input_shape, 10, MONConfig(**mon)), False),
        "MON (PR, circular, suite)": (lambda _: MONClassifier(ds.input_shape, 10, MONConfig(
            **pr, padding=E.MON_PADDING, pr_alpha=E.MON_PR_ALPHA)), False),
        "MON (PR, circular, alpha on val)": (lambda a: MONClassifier(ds.input_shape, 10, MONConfig(
            **pr, padding="circular", pr_alpha=a)), True),
        "MON (PR, zero pad, CG, alpha on val)": (lambda a: MONClassifier(ds.input_shape, 10, MONConfig(
            **pr, padding="zeros", pr_resolvent="cg", pr_alpha=a)), True),
        "DEQ (TorchDEQ anderson)": (lambda _: DEQClassifier(ds.input_shape, 10, DEQConfig(
            stem_channels=width, channels=width, tol=E.TRAIN_TOL, max_iter=E.TRAIN_MAX_ITER, policy="ignore")), False),
        "OptEq selection |W|<=1": (lambda _: OptEqClassifier(ds.input_shape, 10, E._opteq_config(
            stem_channels=width, channels=width, target_norm=E.SELECT_NORM, eps=E.SELECT_EPS, anchor=E.SELECT_ANCHOR)),
            False),
        "OptEq selection, linear anchor": (lambda _: OptEqClassifier(ds.input_shape, 10, E._opteq_config(
            stem_channels=width, channels=width, target_norm=E.SELECT_NORM, eps=E.SELECT_EPS, anchor="linear")),
            False),
    }
    if rows:
        make = {k: v for k, v in make.items() if k == "OptEq" or any(r.lower() in k.lower() for r in rows)}
    ctx = SuiteContext(out_dir=__import__("pathlib").Path(__import__("tempfile").mkdtemp(prefix="bench_opteq_")), size="quick", log=print)
    acc: dict[str, list[float]] = {k: [] for k in make}
    cpu: dict[str, list[float]] = {k: [] for k in make}
    iters: dict[str, list[float]] = {k: [] for k in make}
    above: dict[str, list[int]] = {k: [0, 0] for k in make}
    picked: dict[str, dict] = {}
    params = {}

    def train(name: str, seed: int, alpha):
        seed_everything(seed)
        model = make[name][0](alpha)
        params[name] = count_parameters(model)
        t0 = time.process_time()
        r = E._train(model, ds, val, TrainConfig(epochs=3, batch_size=64, lr=2e-3, seed=seed, progress=False),
                     ctx, f"{name} seed {seed}" + (f" alpha {alpha}" if alpha is not None else ""))
        return r, time.process_time() - t0

    for seed in range(seeds):
        for name, (_, on_val) in make.items():
            alpha = None
            if on_val and seed == 0:  # the validation pick: every step of the grid on seed 0
                runs = {a: train(name, 0, a) for a in PR_ALPHA_GRID}
                val_acc = {a: r[0]["val_acc_per_epoch"][-1] for a, r in runs.items()}
                alpha = max(PR_ALPHA_GRID, key=lambda a: (val_acc[a], -a))  # ties: the smaller step
                picked[name] = {"alpha": alpha, "val_acc": val_acc,
                                "grid_cpu": {a: round(r[1], 1) for a, r in runs.items()}}
                print(f"{name}: validation accuracy per alpha {val_acc} -> alpha {alpha}")
                r, seconds = runs[alpha]
            else:
                alpha = picked[name]["alpha"] if on_val else None
                r, seconds = train(name, seed, alpha)
            cpu[name].append(seconds)
            acc[name].append(r["test_acc"])
            iters[name].append(r["train_mean_iterations"])
            above[name][0] += r["train_unconverged"]
            above[name][1] += r["train_solves"]
    print(f"\n== OptEq vs baselines: mnist5k, {len(ds.y_train)} train / 1000 test, 3 epochs, {seeds} seeds, tol "
          f"{E.TRAIN_TOL}, cap {E.TRAIN_MAX_ITER} ==")
    print(f"{'model':38s} {'params':>7s} {'accuracy':>9s} {'95% interval':>18s} {'OptEq - model (95%)':>26s} "
          f"{'train CPU s':>11s} {'mean it':>7s} {'above tol':>10s}")
    out = {}
    for name in make:
        m, lo, hi = mean_interval(acc[name])
        d = difference_interval(acc["OptEq"], acc[name]) if name != "OptEq" else None
        dtxt = f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "-"
        print(f"{name:38s} {params[name]:7d} {m:9.3f} {f'[{lo:.3f}, {hi:.3f}]':>18s} {dtxt:>26s} "
              f"{sum(cpu[name]) / seeds:11.1f} {sum(iters[name]) / seeds:7.1f} {f'{above[name][0]}/{above[name][1]}':>10s}")
        out[name] = {"acc": acc[name], "cpu": cpu[name], "params": params[name], "difference": d,
                     "picked": picked.get(name)}
    for name, p in picked.items():
        print(f"{name}: alpha {p['alpha']} picked on validation {p['val_acc']} (seed 0 CPU s per alpha {p['grid_cpu']})")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and training steps")
    parser.add_argument("--baselines", action="store_true", help="accuracy vs MON / TorchDEQ DEQ / selection, 3 seeds")
    parser.add_argument("--breakdown", action="store_true",
                        help="CPU time split into map applications and the rest, forward and backward, both regimes")
    parser.add_argument("--rows", nargs="*", default=None, help="with --baselines: substrings of the rows to run")
    args = parser.parse_args(argv)
    if args.baselines:
        with intra_op_threads(1):
            bench_baselines(rows=args.rows)
        return
    warnings.simplefilter("default")
    # the compile time of the fused rows is printed cold: a fresh compiler cache for this run
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_opteq_compile_"))
    try:
        import torchdeq  # noqa: F401

        have_torchdeq = True
    except ImportError:
        have_torchdeq = False
        print("torchdeq is not installed: only our solvers are timed (pip install torchdeq)")
    repeats = 5 if args.quick else 11
    steps = 60 if args.quick else 300
    with intra_op_threads(1):
        ds = load_dataset("mnist5k", seed=0)
        x_img = ds.x_test[:128]
        t0 = time.perf_counter()
        block, stem = _trained_layer(ds, steps, seed=0)
        print(f"trained the classifier for {steps} steps in {time.perf_counter() - t0:.1f} s")
        with torch.no_grad():
            x = stem(x_img)  # (128, 16, 14, 14)
        hard = _layer_at_bound(block.channels, block.spatial, block.in_channels, seed=0)
        if args.breakdown:
            bench_breakdown("|W|_2 = 0.97", hard, x, repeats, have_torchdeq)
            bench_breakdown(f"after {steps} training steps", block, x, repeats, have_torchdeq)
            return
        bench_regime("|W|_2 = 0.97", hard, x, repeats, have_torchdeq)
        bench_regime(f"after {steps} training steps", block, x, repeats, have_torchdeq)
        bench_deep(repeats)
        bench_deep_conv(repeats, x)


if __name__ == "__main__":
    main()
