"""Restoration benchmark of proxnets.stable (``python benchmarks/bench_stable.py --only restore``): bench only, not the suite.

1. Euler / Heun / RK4: one denoiser architecture (the suite's quick denoiser: zero-channel lift to 16, 4 blocks of 3x3
   convolutions, LeakyReLU, at most 2 steps per block, total stiffness budget sum_i n_i h_i nu_i <= 2, size-independent
   rigorous norms, the rigorous bound in every training step), only the integrator changes; equal parameters and equal
   training budget (the suite's 2,048 patches of 32x32, 4 epochs, batch 32, Adam 2e-3, noise std drawn in [0.05, 0.2]).
   Certified constants (size-independent): Euler alpha from its steps' h nu / 2 composed, Heun alpha <= 1/2, RK4
   non-expansive only (no averagedness constant is derived for it: :func:`proxnets.stable.integrators.step_averagedness`).
2. DnCNN trained to its validation plateau: one run of ``4 budget`` epochs per seed (constant lr, so the model after E
   epochs is that of an E-epoch run), validation PSNR on the validation photo after every epoch; the epoch count is the
   maximum of the seed-mean validation curve ("DnCNN (val. epochs)"); "DnCNN" is the suite's 4 epochs (the same run's
   epoch-4 model). TV needs no training: every solve is certified by its duality gap.
3. TV inside PnP: Douglas-Rachford with the TV prox (:class:`proxnets.stable.tv.TVProx`, each inner solve certified by
   its duality gap, the count of inner solves that missed it reported) beside DRS with the networks
   (``D_theta = (1 - theta) I + theta D`` with ``theta alpha <= 1/2``, so DRS's condition holds for each), deblurring the
   suite's held-out photos (Gaussian blur 9x9 std 1.6, circular, noise 0.01, the suite's draws); theta and the TV weight
   picked on the validation photo only. Denoising (A = I) is reported directly (D(y), ROF).
4. Colour: RGB photos never seen in training in any form (astronaut, chelsea, retina; validation coffee); a colour
   (3-channel) firm Heun denoiser trained on RGB patches of the same training photographs
   (:func:`proxnets.stable.restore.training_photos`), beside the grey Heun channel by channel or in an opponent colour
   basis (:func:`proxnets.stable.restore.opponent_colour`), channel-wise and vectorial (colour) TV.

Seeds: the training seeds vary; the noise draws do not (the suite's, data seed 0, for every training seed), so TV is
computed once and a network's rows differ by training randomness only. Every table: mean over seeds x photos with the
95% interval of :func:`proxnets.utils.stats.crossed_interval` (two-way random effects: training seeds and test photos
both random), the per-seed means, and the seeds-only interval (t over the per-seed means over photos: training
randomness on these photos). Differences are paired (same seed, same photo; TV, seed-free, is paired with every seed).
Trained models are cached under ``runs/bench/restore`` (the same recipe and seed gives the same model).
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from proxnets.engine import TrainConfig, fit
from proxnets.stable import AveragedDenoiser, DenoiserConfig, DnCNN, Blur, gaussian_kernel, num_parameters, psnr, ssim
from proxnets.stable.pnp import PnPInfo, pnp_drs, relax_denoiser
from proxnets.stable.restore import channelwise, load_denoiser, opponent_colour, save_denoiser, training_photos
from proxnets.stable.tv import TVProx, tv_denoise
from proxnets.utils.stats import crossed_difference_interval, crossed_interval, mean_interval

CACHE = Path("runs") / "bench" / "restore"
COLOUR_TESTS = ("astronaut", "chelsea", "retina")  # RGB photos outside every training set of the project (grey or colour)
DEN_LAMS = (0.02, 0.03, 0.045, 0.065, 0.09, 0.13, 0.18)  # ROF weight for denoising, searched on validation
PNP_LAMS = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)  # TV weight inside DRS (gamma 5: the problem's weight is lam / gamma)
COLOUR_PNP_LAMS = (0.005, 0.01, 0.02, 0.04)  # colour TV solves cost 3x: a shorter grid around the grey picks
# network strength inside DRS, capped at 1 / (2 alpha); the single-seed run's validation picks were all 0.05 or 0.1 on
# (0.02, ..., 1.0), so the multi-seed run searches around them (the cap is added to the grid only when below 0.25)
THETAS = (0.02, 0.05, 0.1, 0.25)
ITERS, TOL, NOISE = 250, 1e-4, 0.01  # the suite's quick PnP settings
TV_TOL = 1e-3  # every TV solve: certified |x - x*| <= TV_TOL |x|
DATA_SEED = 0  # noise draws (the suite's): the same for every training seed
SIGMAS = (0.1, 0.15)
EPOCHS = 4  # the suite's quick budget
HEUN_CURVE_EPOCHS = 16  # the Heun validation curve (first seed only: 4x the suite's epochs)


def _firm(method: str, channels: int = 1) -> DenoiserConfig:
    from proxnets.stable.experiments import STEP_CAP, TRAIN_NORM

    return DenoiserConfig.firm(channels=channels, image_size=32, width=16, depth=4, method=method, max_steps=STEP_CAP,
                               train_norm=TRAIN_NORM)


def _dncnn() -> DnCNN:
    return DnCNN(channels=1, width=16, depth=5, batch_norm=False)


# name -> (builder, epochs, colour patches, validation curve); the suite's quick recipe otherwise (patches, batch, lr, loss)
def recipes(budget: int) -> dict[str, tuple]:
    return {
        "Euler": (lambda: AveragedDenoiser(_firm("euler")), EPOCHS, False, False),
        "Heun": (lambda: AveragedDenoiser(_firm("heun")), EPOCHS, False, False),
        "RK4": (lambda: AveragedDenoiser(_firm("rk4")), EPOCHS, False, False),
        "Heun colour": (lambda: AveragedDenoiser(_firm("heun", 3)), EPOCHS, True, False),
        "DnCNN curve": (_dncnn, EPOCHS * budget, False, True),
        "Heun curve": (lambda: AveragedDenoiser(_firm("heun")), HEUN_CURVE_EPOCHS, False, True),
    }


def _path(name: str, seed: int, suffix: str = ".pt") -> Path:
    return CACHE / f"{name.replace(' ', '_')}-seed{seed}{suffix}"


def _validation_psnr(model: nn.Module) -> float:
    """Mean over SIGMAS of the PSNR of ``model`` on the grey validation photo (the denoising part's validation draws)."""
    from proxnets.stable.experiments import _noisy

    val, _ = _images(True)
    with torch.no_grad():
        return sum(psnr(model(_noisy(val, s, DATA_SEED + 99)).clamp(0, 1), val) for s in SIGMAS) / len(SIGMAS)


def _train_job(args: tuple) -> tuple[str, int, float]:
    """Train one recipe (cached): the suite's quick patches and loss, ``seed``. A curve recipe also records the
    validation PSNR after every epoch (and, for DnCNN, keeps every epoch's model)."""
    from torch.utils.data import TensorDataset

    from proxnets.data.images import random_patches
    from proxnets.stable.experiments import _denoising_loss

    name, seed, budget = args
    build, epochs, colour, curve = recipes(budget)[name]
    done = _path(name, seed, ".json" if curve else ".pt")
    if done.is_file():
        return name, seed, 0.0
    torch.set_num_threads(1)
    patches = random_patches(training_photos(colour, 64), 32, 2048, seed=seed)  # (2048, C, 32, 32)
    torch.manual_seed(seed)
    model = build()
    torch.manual_seed(seed)
    trace: list[float] = []

    def record(event: str, info: dict) -> None:
        if event != "epoch_end":
            return
        m = info["model"]
        m.eval()
        trace.append(_validation_psnr(m))
        if name.startswith("DnCNN"):
            save_denoiser(_path(f"DnCNN-e{len(trace)}", seed), m)
        m.train()

    t0 = time.perf_counter()
    fit(model, TensorDataset(patches, patches), TrainConfig(epochs=epochs, batch_size=32, lr=2e-3, progress=False,
                                                            eval_every_epoch=False, seed=seed),
        loss_fn=_denoising_loss((0.05, 0.2)), callbacks=[record] if curve else (), log=lambda *_: None)
    dt = time.perf_counter() - t0
    if curve:
        done.write_text(json.dumps({"validation_psnr": trace, "seconds": dt}))
    else:
        save_denoiser(done, model.eval())
    return name, seed, dt


def pick_epochs(curves: list[list[float]], plateau_db: float = 0.05) -> dict:
    """The epoch count from validation curves (one per seed, PSNR after each epoch): the argmax of the seed-mean curve
    (``best``), the first epoch within ``plateau_db`` of that maximum (``plateau``), and whether the maximum is the last
    epoch (``rising``: not converged within the curve)."""
    n = min(len(c) for c in curves)
    mean = [sum(c[e] for c in curves) / len(curves) for e in range(n)]
    best = max(range(n), key=lambda e: mean[e])
    plateau = next(e for e in range(n) if mean[e] >= mean[best] - plateau_db)
    return {"best": best + 1, "plateau": plateau + 1, "rising": best == n - 1, "mean": mean}


def _certificate(model: nn.Module) -> str:
    if not isinstance(model, AveragedDenoiser):
        return "none (no Lipschitz control)"
    alpha = model.averagedness("rigorous")
    lip = model.lipschitz_constant("rigorous")
    kind = "non-expansive only" if not math.isfinite(alpha) or alpha >= 1 else ("firmly non-expansive" if alpha <= 0.5 + 1e-12
                                                                                 else "averaged")
    a = "n/a" if math.isnan(alpha) else f"{alpha:.4f}"
    return f"alpha {a} ({kind}), Lipschitz <= {float(lip):.6f} (rigorous {lip.rigorous}), any image size"


def _alpha(model) -> float:
    if not isinstance(model, AveragedDenoiser):
        return math.nan
    a = model.averagedness("rigorous")
    return 1.0 if math.isnan(a) else a  # RK4: non-expansive, i.e. 1-averaged at most


def _seed_means(rows: list[list[float]]) -> list[float]:
    return [sum(r) / len(r) for r in rows]


def _cells(rows: list[list[float]], f: int) -> tuple[str, str]:
    """(mean [crossed interval], per-seed means and their seeds-only interval) of a seeds x photos table."""
    m, lo, hi = crossed_interval(rows)
    if len(rows) < 2:
        return f"{m:.{f}f} [{lo:.{f}f}, {hi:.{f}f}]", "-"
    sm = _seed_means(rows)
    _, slo, shi = mean_interval(sm)
    return f"{m:.{f}f} [{lo:.{f}f}, {hi:.{f}f}]", " / ".join(f"{v:.{f}f}" for v in sm) + f" [{slo:.{f}f}, {shi:.{f}f}]"


def _paired(a: dict, b: dict) -> tuple[list[list[float]], list[list[float]]]:
    """Rows of ``a`` and ``b`` (``{seed: per-photo scores}``) on their common training seeds; a seed-free ``b`` (key
    None, TV) is paired with every seed of ``a``."""
    if None in b:
        return [a[k] for k in a], [b[None]] * len(a)
    common = [k for k in a if k in b]
    return [a[k] for k in common], [b[k] for k in common]


def _dcells(a: dict, b: dict, f: int) -> tuple[str, str]:
    ra, rb = _paired(a, b)
    if not ra:
        return "no common seed", "-"
    m, lo, hi = crossed_difference_interval(ra, rb)
    d = [[u - v for u, v in zip(x, y)] for x, y in zip(ra, rb)]
    if len(d) < 2:
        return f"{m:+.{f}f} [{lo:+.{f}f}, {hi:+.{f}f}]", "-"
    _, slo, shi = mean_interval(_seed_means(d))
    return f"{m:+.{f}f} [{lo:+.{f}f}, {hi:+.{f}f}]", f"[{slo:+.{f}f}, {shi:+.{f}f}]"


def _table(title: str, scores: dict[str, dict[str, dict]], pairs: list[tuple[str, str]]) -> None:
    """Print a markdown table: rows = methods, PSNR / SSIM (mean [crossed interval]; per-seed means [seeds-only
    interval]); then the paired differences."""
    print(f"\n   {title}")
    print("   | method | PSNR (dB) | per seed [seeds only] | SSIM | per seed [seeds only] |\n   |---|---|---|---|---|")
    for m, s in scores.items():
        seeds = "" if None in s["psnr"] else f" (seeds {list(s['psnr'])})"
        print(f"   | {m}{seeds} | " + " | ".join(_cells(list(s['psnr'].values()), 2) + _cells(list(s['ssim'].values()), 3)) + " |")
    for a, b in pairs:
        if a in scores and b in scores:
            print(f"   | {a} - {b} | " + " | ".join(_dcells(scores[a]['psnr'], scores[b]['psnr'], 2)
                                                     + _dcells(scores[a]['ssim'], scores[b]['ssim'], 3)) + " |")


def _score(out: torch.Tensor, clean: torch.Tensor) -> tuple[float, float]:
    return psnr(out.clamp(0, 1), clean), ssim(out.clamp(0, 1), clean)


@functools.lru_cache(maxsize=2)  # decoding every embedded photo costs ~1 s: once per process and mode
def _images(gray: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from proxnets.data.images import natural_images
    from proxnets.stable.experiments import TEST_PHOTOS, VAL_PHOTO, _square

    if gray:
        photos = natural_images(gray=True)
        return _square(photos[VAL_PHOTO], 64), {k: _square(photos[k], 64) for k in TEST_PHOTOS}
    import skimage.data

    from proxnets.data.images import _to_tensor

    val = _square(natural_images(gray=False, names=(VAL_PHOTO,))[VAL_PHOTO], 64)
    return val, {k: _square(_to_tensor(getattr(skimage.data, k)(), False), 64) for k in COLOUR_TESTS}


def _tally_row(what: str, photo: str, info) -> list:
    return [what, photo, info.iterations, info.converged, info.stop_reason, f"{info.residuals[-1]:.2e}", info.inner_unconverged]


def _tally(title: str, rows: list[list]) -> None:
    bad = [r for r in rows if not r[3] or r[6]]
    print(f"\n   {title}: {len(rows)} PnP runs, {sum(r[3] for r in rows)} converged (tol {TOL:g} within {ITERS}), "
          f"{sum(r[6] > 0 for r in rows)} with an inner TV solve that missed its certificate")
    if bad:
        print(f"   NOT converged or inexact: {[(r[0], r[1], r[4], r[5]) for r in bad]}")


# -- methods: name -> (factory(param) -> map, grid of params picked on validation, label) ---------------------------
def _lams(grid: tuple[float, ...], vectorial: bool) -> tuple[float, ...]:
    # vectorial TV of an image whose channels share their edges is sqrt 3 x the channel-wise TV (TV_v(u, u, u) = sqrt 3 TV(u)):
    # the same grid scaled by sqrt 3, so both variants search the same range of effective weights
    return tuple(round(l * math.sqrt(3), 4) for l in grid) if vectorial else grid


_WORST = [0.0]  # largest certified relative distance of a ROF solve in this process


def _rof(vectorial: bool):
    def make(lam: float):
        def apply(y):
            x, info = tv_denoise(y, lam, tol=TV_TOL, max_iter=20000, policy="raise", vectorial=vectorial)
            _WORST[0] = max(_WORST[0], info.residuals[-1])
            return x
        return apply
    return make, _lams(DEN_LAMS, vectorial), "lam"


def _tv_factory(vectorial: bool = False, grid: tuple[float, ...] = PNP_LAMS):
    # inner tol 1e-3 (certified relative distance to the exact prox): 1e-4 costs 6x the time for the same PSNR (+-0.02 dB, measured)
    return (lambda lam: TVProx(lam, tol=TV_TOL, max_iter=5000, vectorial=vectorial)), _lams(grid, vectorial), "lam"


def _direct(den) -> tuple:
    return (lambda _: den), (1.0,), "theta"


def _net_factory(model: nn.Module, wrap=None):
    """theta -> D_theta, with theta capped at 1 / (2 alpha) (DRS's condition for an alpha-averaged D)."""
    alpha = _alpha(model)
    base = model if wrap is None else wrap(model)
    cap = 1.0 if math.isnan(alpha) else min(1.0, 0.5 / alpha)  # DnCNN (nan): no condition to keep, none certified
    grid = tuple(sorted({t for t in THETAS if t <= cap} | ({round(cap, 4)} if cap < max(THETAS) else set())))
    return (lambda theta: relax_denoiser(base, theta)), grid, "theta"


def _nets(seed: int, dncnn_epochs: int) -> dict[str, nn.Module]:
    """The trained networks of ``seed`` (those in the cache: a recipe not trained for this seed is left out)."""
    files = {n: _path(n, seed) for n in ("Euler", "Heun", "RK4", "Heun colour")}
    files.update({"DnCNN": _path(f"DnCNN-e{EPOCHS}", seed), "DnCNN (val. epochs)": _path(f"DnCNN-e{dncnn_epochs}", seed)})
    return {n: load_denoiser(f) for n, f in files.items() if f.is_file()}


def _methods(part: str, seed: int | None, dncnn_epochs: int) -> dict[str, tuple]:
    """The methods of ``part`` for one training seed, or (``seed=None``) the seed-free ones (TV)."""
    if seed is None:
        return {"grey": {"TV (ROF)": _rof(False)},
                "colour": {"TV channel-wise": _rof(False), "TV vectorial": _rof(True)},
                "pnp": {"TV prox": _tv_factory()},
                "colour-pnp": {"TV vectorial prox": _tv_factory(True, COLOUR_PNP_LAMS)}}[part]
    n = _nets(seed, dncnn_epochs)
    dn = "DnCNN (val. epochs)"
    if part == "grey":
        out = {k: (lambda k=k: _direct(n[k]), k) for k in ("Euler", "Heun", "RK4", "DnCNN", dn)}
    elif part == "colour":
        out = {"Heun channel-wise": (lambda: _direct(channelwise(n["Heun"], 3)), "Heun"),
               "Heun opponent": (lambda: _direct(opponent_colour(n["Heun"])), "Heun"),
               "Heun colour": (lambda: _direct(n["Heun colour"]), "Heun colour"),
               f"{dn} channel-wise": (lambda: _direct(channelwise(n[dn], 3)), dn)}
    elif part == "pnp":
        out = {k: (lambda k=k: _net_factory(n[k]), k) for k in ("Euler", "Heun", "RK4", dn)}
    else:
        out = {"Heun channel-wise": (lambda: _net_factory(n["Heun"], lambda m: channelwise(m, 3)), "Heun"),
               "Heun colour": (lambda: _net_factory(n["Heun colour"]), "Heun colour"),
               f"{dn} channel-wise": (lambda: _net_factory(n[dn], lambda m: channelwise(m, 3)), dn)}
    return {k: make() for k, (make, need) in out.items() if need in n}


def _drs(y, physics, den, clean):
    from proxnets.stable.experiments import DRS_GAMMA

    try:
        return pnp_drs(y, physics, den, gamma=DRS_GAMMA, max_iter=ITERS, tol=TOL, x_true=clean, with_ssim=False, policy="ignore")
    except ValueError as exc:  # iterates overflowed: a run that did not converge (kept in the tally as such)
        if "finite" not in str(exc):
            raise
        info = PnPInfo(psnr=[-math.inf], stop_reason="nonfinite", diverged=True)
        info.residuals, info.iterations, info.converged = [math.inf], ITERS, False
        return physics.A_adjoint(y), info


def _problems(part: str) -> dict:
    """key -> (validation (y, clean), tests {photo: (y, clean)}, solve(y, den, clean) -> (x, info or None))."""
    from proxnets.stable.experiments import _noisy

    gray = part in ("grey", "pnp")
    val, tests = _images(gray)
    if part in ("grey", "colour"):  # denoising: the suite's draws (grey)
        return {f"sigma {s}": ((_noisy(val, s, DATA_SEED + 99), val),
                               {k: (_noisy(c, s, DATA_SEED + 1000 * i + j), c) for i, (k, c) in enumerate(tests.items())},
                               lambda y, den, clean: (den(y), None)) for j, s in enumerate(SIGMAS)}
    physics = Blur(gaussian_kernel(9, 1.6), "circular")

    def observe(clean, s):
        return physics.A(clean) + NOISE * torch.randn(clean.shape, generator=torch.Generator().manual_seed(s))

    return {"deblur": ((observe(val, DATA_SEED + 1), val),
                       {k: (observe(c, DATA_SEED + 2 + i), c) for i, (k, c) in enumerate(tests.items())},
                       lambda y, den, clean: _drs(y, physics, den, clean))}


def _eval_job(args: tuple) -> tuple[str, int | None, dict]:
    """Evaluate the methods of ``part`` (one training seed, or the seed-free TV): parameter on validation, then the tests."""
    part, seed, dncnn_epochs = args
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    methods = _methods(part, seed, dncnn_epochs)
    out: dict = {}
    for key, ((yv, cv), tests, solve) in _problems(part).items():
        res = {}
        for name, (factory, grid, label) in methods.items():
            sweep = {}
            with torch.no_grad():
                for v in grid:
                    x, _ = solve(yv, factory(v), cv)
                    sweep[v] = psnr(x.clamp(0, 1), cv)
                pick = max(sweep, key=sweep.get)
                r = {"pick": pick, "label": label, "sweep": sweep, "edge": len(grid) > 1 and pick in (grid[0], grid[-1]),
                     "psnr": [], "ssim": [], "tally": []}
                for photo, (y, clean) in tests.items():
                    x, info = solve(y, factory(pick), clean)
                    p, s = _score(x, clean)
                    r["psnr"].append(p)
                    r["ssim"].append(s)
                    if info is not None:
                        r["tally"].append(_tally_row(name, photo, info))
            res[name] = r
        out[key] = res
    out["_meta"] = {"seconds": time.perf_counter() - t0, "worst_rof": _WORST[0]}
    return part, seed, out


def _baseline(part: str) -> dict:
    """Noisy / blurred inputs' scores (seed-free)."""
    out = {}
    for key, (_, tests, _) in _problems(part).items():
        sc = [_score(y, c) for y, c in tests.values()]
        out[key] = {"psnr": [p for p, _ in sc], "ssim": [s for _, s in sc]}
    return out


PAIRS = {
    "grey": [("Heun", "Euler"), ("Heun", "RK4"), ("DnCNN", "Heun"), ("DnCNN (val. epochs)", "DnCNN")],
    "colour": [("Heun colour", "Heun channel-wise"), ("Heun opponent", "Heun channel-wise")],
    "pnp": [("Heun", "Euler"), ("Heun", "RK4")],
    "colour-pnp": [("Heun colour", "Heun channel-wise")],
}
REFERENCE = {"grey": "TV (ROF)", "colour": "TV vectorial", "pnp": "TV prox", "colour-pnp": "TV vectorial prox"}


def _report(part: str, results: dict, seeds: tuple[int, ...]) -> dict:
    """Print the tables of one part from the jobs' results; return them (for the JSON record)."""
    base = _baseline(part)
    record = {}
    for key in results[None]:
        if key == "_meta":
            continue
        scores = {("noisy" if part in ("grey", "colour") else "blurred"): {m: {None: base[key][m]} for m in ("psnr", "ssim")}}
        picks, edges, tally = {}, [], []
        for seed in (None, *seeds):
            for name, r in results[seed][key].items():
                scores.setdefault(name, {"psnr": {}, "ssim": {}})
                scores[name]["psnr"][seed] = r["psnr"]
                scores[name]["ssim"][seed] = r["ssim"]
                if len(r["sweep"]) > 1:
                    picks.setdefault(name, []).append(r["pick"])
                if r["edge"]:
                    edges.append((name, seed, r["pick"]))
                tally += r["tally"]
        ref = REFERENCE[part]
        pairs = [(m, ref) for m in scores if m not in (ref, "noisy", "blurred")] + PAIRS[part]
        what = {"grey": "grey denoising, 6 photos", "colour": "RGB denoising, " + ", ".join(COLOUR_TESTS),
                "pnp": f"grey PnP-DRS deblurring (blur 9x9 std 1.6, noise {NOISE}), 6 photos",
                "colour-pnp": "RGB PnP-DRS deblurring, " + ", ".join(COLOUR_TESTS)}[part]
        print(f"\n   {what}, {key}: picked on validation (per seed) {picks}" + (f"; GRID EDGE {edges}" if edges else ""))
        _table(f"{what}, {key}; seeds {list(seeds)}", scores, pairs)
        if tally:
            _tally(f"PnP convergence ({part})", tally)
        record[key] = {"scores": scores, "picks": picks, "edges": edges, "tally": tally}
    worst = max(results[s]["_meta"]["worst_rof"] for s in results)
    if part in ("grey", "colour"):
        print(f"\n   every ROF solve converged (policy raise); largest certified relative distance to its exact minimizer {worst:.2e}")
    return record


def train(todo: list[tuple[str, int]], budget: int = 8, jobs: int = 1) -> None:
    """Train the ``(recipe, seed)`` pairs of ``todo`` (cached), ``jobs`` processes."""
    from multiprocessing import get_context

    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"== restoration benchmark: training {len(todo)} denoisers (cached in {CACHE}), jobs {jobs}", flush=True)
    with get_context("spawn").Pool(jobs) as pool:
        for n, s, dt in pool.imap_unordered(_train_job, [(n, s, budget) for n, s in todo]):
            print(f"   trained {n} seed {s}: {dt:.0f} s" if dt else f"   {n} seed {s}: cached", flush=True)


def run(seeds: tuple[int, ...] = (0,), budget: int = 8, jobs: int = 1, parts: str = "grey,pnp,colour,colour-pnp",
        heun_curve: bool = False, fit_missing: bool = True, pick_seeds: tuple[int, ...] | None = None) -> None:
    """Train (cached) and evaluate. ``budget``: DnCNN's validation curve runs to ``budget`` x the suite's epochs;
    ``heun_curve``: also the Heun denoiser's validation curve to HEUN_CURVE_EPOCHS (first seed); ``fit_missing=False``:
    evaluate only what is in the cache (a recipe missing for a seed is left out of that seed's rows); ``pick_seeds``:
    the seeds whose DnCNN validation curves pick its epochs (default ``seeds``)."""
    from multiprocessing import get_context

    t0 = time.perf_counter()
    part_list = [p for p in ("pnp", "colour-pnp", "grey", "colour") if p in set(parts.split(","))]  # the long ones first
    CACHE.mkdir(parents=True, exist_ok=True)
    names = ["RK4", "Heun colour", "Heun", "Euler", "DnCNN curve"]  # per seed, the long ones first
    todo = [(n, s) for s in seeds for n in names] + ([("Heun curve", seeds[0])] if heun_curve else [])
    if fit_missing:
        train(todo, budget, jobs)
    pool = get_context("spawn").Pool(jobs) if jobs > 1 else None
    curves = [json.loads(_path("DnCNN curve", s, ".json").read_text())["validation_psnr"] for s in (pick_seeds or seeds)]
    pick = pick_epochs(curves)
    hc = _path("Heun curve", seeds[0], ".json")
    heun = json.loads(hc.read_text())["validation_psnr"] if hc.is_file() else []
    print("\n   DnCNN validation curve (grey coffee, mean PSNR of sigma 0.1 / 0.15, per epoch; seed mean): "
          + ", ".join(f"{e + 1}: {v:.2f}" for e, v in enumerate(pick["mean"])))
    print(f"   seeds {list(pick_seeds or seeds)}, per seed, best epoch: {[1 + max(range(len(c)), key=c.__getitem__) for c in curves]}; seed-mean best epoch "
          f"{pick['best']} (used), first within 0.05 dB of it {pick['plateau']}" + (" -- STILL RISING at the last epoch" if pick["rising"] else ""))
    if heun:
        print(f"   Heun validation curve (seed {seeds[0]}, per epoch): " + ", ".join(f"{e + 1}: {v:.2f}" for e, v in enumerate(heun)))
    e_star = pick["best"]
    nets = _nets(seeds[0], e_star)
    print(f"\n== parameters " + ", ".join(f"{k} {num_parameters(m)}" for k, m in nets.items()))
    for s in seeds:
        for k, m in _nets(s, e_star).items():
            if isinstance(m, AveragedDenoiser):
                print(f"   certificate {k} seed {s}: {_certificate(m)}")
    jobs_list = [(p, s, e_star) for p in part_list for s in (None, *seeds)]
    results: dict = {p: {} for p in part_list}
    for p, s, out in (pool.imap_unordered(_eval_job, jobs_list) if pool else map(_eval_job, jobs_list)):
        results[p][s] = out
        print(f"   evaluated {p} {'TV' if s is None else f'seed {s}'}: {out['_meta']['seconds']:.0f} s", flush=True)
    if pool:
        pool.close()
    record = {"seeds": list(seeds), "dncnn_epochs": pick, "heun_curve": heun}
    for p in ("grey", "colour", "pnp", "colour-pnp"):
        if p in results:
            record[p] = _report(p, results[p], seeds)
    tag = "_".join(map(str, seeds)) + "-" + "_".join(sorted(results))
    (CACHE / f"results-seeds{tag}.json").write_text(json.dumps(record, default=str))
    print(f"\n   restoration benchmark: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":  # some parts alone: python stable_restoration.py PARTS SEEDS [JOBS]
    import sys

    torch.set_num_threads(1)
    run(tuple(int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "0").split(",")), 8,
        int(sys.argv[3]) if len(sys.argv) > 3 else 1, sys.argv[1] if len(sys.argv) > 1 else "grey,pnp,colour,colour-pnp")
