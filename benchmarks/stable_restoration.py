"""Restoration benchmark of proxnets.stable (``python benchmarks/bench_stable.py --only restore``): bench only, not the suite.

1. Euler / Heun / RK4: one denoiser architecture (the suite's quick denoiser: zero-channel lift to 16, 4 blocks of 3x3
   convolutions, LeakyReLU, at most 2 steps per block, total stiffness budget sum_i n_i h_i nu_i <= 2, size-independent
   rigorous norms, the rigorous bound in every training step), only the integrator changes; equal parameters and equal
   training budget (the suite's 2,048 patches of 32x32, 4 epochs, batch 32, Adam 2e-3, noise std drawn in [0.05, 0.2]).
   Certified constants (size-independent): Euler alpha from its steps' h nu / 2 composed, Heun alpha <= 1/2, RK4
   non-expansive only (no averagedness constant is derived for it: :func:`proxnets.stable.integrators.step_averagedness`).
2. TV inside PnP: Douglas-Rachford (and ADMM) with the TV prox (:class:`proxnets.stable.tv.TVProx`, each inner solve
   certified by its duality gap, the count of inner solves that missed it reported) beside DRS with the networks
   (``D_theta = (1 - theta) I + theta D`` with ``theta alpha <= 1/2``, so DRS's condition holds for each), deblurring the
   suite's held-out photos (Gaussian blur 9x9 std 1.6, circular, noise 0.01, the suite's draws); theta and the TV weight
   picked on the validation photo only. Denoising (A = I) is reported directly (D(y), ROF).
3. Colour: RGB photos never seen in training in any form (astronaut, chelsea, retina; validation coffee); grey
   denoisers channel by channel or in an opponent colour basis (:func:`proxnets.stable.restore.opponent_colour`),
   channel-wise TV or vectorial (colour) TV; which is used picked on the validation photo.
4. Budget: DnCNN and the Heun denoiser also at ``budget`` x the epochs (same patches): whether a gap is budget or
   constraint. TV needs no training (each solve to a certified tolerance).

Every table: mean and 95% Student-t interval over the test photos, paired differences; training seeds as given.
Trained models are cached under ``runs/bench/restore`` (the same recipe and seed gives the same model).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from proxnets.engine import TrainConfig, fit
from proxnets.stable import AveragedDenoiser, DenoiserConfig, DnCNN, Blur, gaussian_kernel, num_parameters, psnr, ssim
from proxnets.stable.pnp import PnPInfo, pnp_admm, pnp_drs, relax_denoiser
from proxnets.stable.restore import channelwise, load_denoiser, opponent_colour, save_denoiser
from proxnets.stable.tv import TVProx, tv_denoise
from proxnets.utils.stats import difference_interval, mean_interval

CACHE = Path("runs") / "bench" / "restore"
COLOUR_TESTS = ("astronaut", "chelsea", "retina")  # RGB photos outside every training set of the project (grey or colour)
DEN_LAMS = (0.02, 0.03, 0.045, 0.065, 0.09, 0.13, 0.18)  # ROF weight for denoising, searched on validation
PNP_LAMS = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)  # TV weight inside DRS (gamma 5: the problem's weight is lam / gamma)
COLOUR_PNP_LAMS = (0.005, 0.01, 0.02, 0.04)  # colour TV solves cost 3x: a shorter grid around the grey picks
THETAS = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0)  # network strength inside DRS, capped at 1 / (2 alpha)
ITERS, TOL, NOISE = 250, 1e-4, 0.01  # the suite's quick PnP settings
TV_TOL = 1e-3  # every TV solve: certified |x - x*| <= TV_TOL |x|


def _firm(method: str) -> DenoiserConfig:
    from proxnets.stable.experiments import STEP_CAP, TRAIN_NORM

    return DenoiserConfig.firm(channels=1, image_size=32, width=16, depth=4, method=method, max_steps=STEP_CAP, train_norm=TRAIN_NORM)


# name -> (builder, epochs); the suite's quick recipe otherwise (patches, batch, lr, loss)
def recipes(budget: int) -> dict[str, tuple]:
    return {
        "Euler": (lambda: AveragedDenoiser(_firm("euler")), 4),
        "Heun": (lambda: AveragedDenoiser(_firm("heun")), 4),
        "RK4": (lambda: AveragedDenoiser(_firm("rk4")), 4),
        "DnCNN": (lambda: DnCNN(channels=1, width=16, depth=5, batch_norm=False), 4),
        f"Heun x{budget}": (lambda: AveragedDenoiser(_firm("heun")), 4 * budget),
        f"DnCNN x{budget}": (lambda: DnCNN(channels=1, width=16, depth=5, batch_norm=False), 4 * budget),
    }


def _train_job(args: tuple) -> tuple[str, int, float]:
    """Train one recipe (cached): the suite's quick patches and loss, ``seed``."""
    from torch.utils.data import TensorDataset

    from proxnets.data.images import natural_images, random_patches
    from proxnets.stable.experiments import TEST_PHOTOS, VAL_PHOTO, _denoising_loss

    name, seed, budget = args
    path = CACHE / f"{name.replace(' ', '_')}-seed{seed}.pt"
    if path.is_file():
        return name, seed, 0.0
    torch.set_num_threads(1)
    build, epochs = recipes(budget)[name]
    photos = natural_images(gray=True)
    train_imgs = {k: v for k, v in photos.items() if k not in TEST_PHOTOS and k != VAL_PHOTO and min(v.shape[-2:]) >= 64}
    patches = random_patches(train_imgs, 32, 2048, seed=seed)
    torch.manual_seed(seed)
    model = build()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    fit(model, TensorDataset(patches, patches), TrainConfig(epochs=epochs, batch_size=32, lr=2e-3, progress=False,
                                                            eval_every_epoch=False, seed=seed),
        loss_fn=_denoising_loss((0.05, 0.2)), log=lambda *_: None)
    dt = time.perf_counter() - t0
    save_denoiser(path, model.eval())
    return name, seed, dt


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


def _cell(vals: list[float], f: int) -> str:
    m, lo, hi = mean_interval(vals)
    return f"{m:.{f}f} [{lo:.{f}f}, {hi:.{f}f}]"


def _dcell(a: list[float], b: list[float], f: int) -> str:
    m, lo, hi = difference_interval(a, b)
    return f"{m:+.{f}f} [{lo:+.{f}f}, {hi:+.{f}f}]"


def _table(title: str, scores: dict[str, dict[str, list[float]]], pairs: list[tuple[str, str]]) -> None:
    """Print a markdown table: rows = methods, PSNR / SSIM with intervals; then the paired differences."""
    print(f"\n   {title}")
    print("   | method | PSNR (dB) | SSIM |\n   |---|---|---|")
    for m, s in scores.items():
        print(f"   | {m} | {_cell(s['psnr'], 2)} | {_cell(s['ssim'], 3)} |")
    for a, b in pairs:
        if a in scores and b in scores:
            print(f"   | {a} - {b} | {_dcell(scores[a]['psnr'], scores[b]['psnr'], 2)} | "
                  f"{_dcell(scores[a]['ssim'], scores[b]['ssim'], 3)} |")


def _score(out: torch.Tensor, clean: torch.Tensor) -> tuple[float, float]:
    return psnr(out.clamp(0, 1), clean), ssim(out.clamp(0, 1), clean)


def _images(gray: bool, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from proxnets.data.images import natural_images
    from proxnets.stable.experiments import TEST_PHOTOS, VAL_PHOTO, _square

    if gray:
        photos = natural_images(gray=True)
        return _square(photos[VAL_PHOTO], 64), {k: _square(photos[k], 64) for k in TEST_PHOTOS}
    import skimage.data

    from proxnets.data.images import _to_tensor

    val = _square(natural_images(gray=False, names=(VAL_PHOTO,))[VAL_PHOTO], 64)
    return val, {k: _square(_to_tensor(getattr(skimage.data, k)(), False), 64) for k in COLOUR_TESTS}


class Tally:
    """Every TV solve and every PnP run: what converged, the worst certified residual."""

    def __init__(self) -> None:
        self.rows: list[list] = []

    def pnp(self, what: str, photo: str, info) -> None:
        self.rows.append([what, photo, info.iterations, info.converged, info.stop_reason, f"{info.residuals[-1]:.2e}",
                          info.inner_unconverged])

    def summary(self, title: str) -> None:
        bad = [r for r in self.rows if not r[3] or r[6]]
        print(f"\n   {title}: {len(self.rows)} PnP runs, {sum(r[3] for r in self.rows)} converged (tol {TOL:g} within {ITERS}), "
              f"{sum(r[6] > 0 for r in self.rows)} with an inner TV solve that missed its certificate")
        print("   | run | photo | iterations | converged | stop | final residual | inner unconverged |\n   |---|---|---|---|---|---|---|")
        for r in self.rows:
            print("   | " + " | ".join(str(v) for v in r) + " |")
        if bad:
            print(f"   NOT converged or inexact: {[(r[0], r[1]) for r in bad]}")


def _denoise_part(nets: dict[str, nn.Module], gray: bool, seed: int, colour_maps: dict | None = None) -> dict:
    """Direct denoising (D(y) and ROF), sigma 0.1 and 0.15, the suite's noise draws (grey)."""
    from proxnets.stable.experiments import _noisy

    val, tests = _images(gray, seed)
    sigmas = (0.1, 0.15)
    worst = [0.0]

    def rof(y, lam, vectorial=False):
        x, info = tv_denoise(y, lam, tol=TV_TOL, max_iter=20000, policy="raise", vectorial=vectorial)
        worst[0] = max(worst[0], info.residuals[-1])
        return x

    maps: dict[str, object] = {}
    if gray:
        maps.update({f"TV (ROF)": None})
        maps.update(nets)
    else:
        maps.update({"TV channel-wise": None, "TV vectorial": None})
        maps.update(colour_maps or {})
    out = {}
    for j, sigma in enumerate(sigmas):
        noisy_val = _noisy(val, sigma, seed + 99)
        lam_of = {}
        for m in maps:
            if m.startswith("TV"):
                vec = m == "TV vectorial"
                v = {lam: psnr(rof(noisy_val, lam, vec).clamp(0, 1), val) for lam in _lams(DEN_LAMS, vec)}
                lam_of[m] = max(v, key=v.get)
        val_psnr = {}
        with torch.no_grad():
            for m, d in maps.items():
                if not m.startswith("TV"):
                    val_psnr[m] = psnr(d(noisy_val).clamp(0, 1), val)
        scores = {m: {"psnr": [], "ssim": []} for m in ["noisy", *maps]}
        for i, clean in enumerate(tests.values()):
            noisy = _noisy(clean, sigma, seed + 1000 * i + j)  # grey: the suite's draws
            for m, d in [("noisy", None), *maps.items()]:
                if m == "noisy":
                    x = noisy
                elif m.startswith("TV"):
                    x = rof(noisy, lam_of[m], m == "TV vectorial")
                else:
                    with torch.no_grad():
                        x = d(noisy)
                p, s = _score(x, clean)
                scores[m]["psnr"].append(p)
                scores[m]["ssim"].append(s)
        edge = {m: l for m, l in lam_of.items() if l in (_lams(DEN_LAMS, m == "TV vectorial")[0], _lams(DEN_LAMS, m == "TV vectorial")[-1])}
        what = "grey, the suite's 6 test photos" if gray else f"RGB, {', '.join(tests)}"
        print(f"\n   denoising sigma {sigma} ({what}, 64x64): TV weight picked on validation {lam_of}"
              + (f" GRID EDGE {edge}" if edge else "") + "; validation PSNR of the networks: "
              + ", ".join(f"{k} {v:.2f}" for k, v in val_psnr.items()))
        ref = "TV (ROF)" if gray else "TV vectorial"
        pairs = [(m, ref) for m in maps if m != ref] + ([("Heun", "Euler"), ("Heun", "RK4"), ("DnCNN", "Heun")] if gray else [])
        _table(f"denoising, sigma {sigma}", scores, pairs)
        out[sigma] = {"scores": scores, "lam": lam_of, "val": val_psnr}
    print(f"\n   every ROF solve converged (policy raise); largest certified relative distance to its exact minimizer {worst[0]:.2e}")
    return out


def _drs(y, physics, den, clean, algo=pnp_drs):
    from proxnets.stable.experiments import DRS_GAMMA

    try:
        return algo(y, physics, den, gamma=DRS_GAMMA, max_iter=ITERS, tol=TOL, x_true=clean, with_ssim=False, policy="ignore")
    except ValueError as exc:  # iterates overflowed: a run that did not converge (kept in the tally as such)
        if "finite" not in str(exc):
            raise
        info = PnPInfo(psnr=[-math.inf], stop_reason="nonfinite", diverged=True)
        info.residuals, info.iterations, info.converged = [math.inf], ITERS, False
        return physics.A_adjoint(y), info


def _deblur_part(maps: dict[str, tuple], gray: bool, seed: int, admm: tuple[str, ...] = ()) -> dict:
    """PnP-DRS deblurring. ``maps``: name -> (factory(param) -> denoiser, grid of params, label of the param)."""
    physics = Blur(gaussian_kernel(9, 1.6), "circular")
    val, tests = _images(gray, seed)

    def observe(clean, s):
        return physics.A(clean) + NOISE * torch.randn(clean.shape, generator=torch.Generator().manual_seed(s))

    tally = Tally()
    y_val = observe(val, seed + 1)  # grey: the suite's validation draw
    picked, sweep = {}, []
    for name, (factory, grid, label) in maps.items():
        best = None
        for v in grid:
            _, info = _drs(y_val, physics, factory(v), val)
            p = info.psnr[-1] if info.psnr else -math.inf
            sweep.append(f"{name} {label} {v}: {p:.2f} dB ({'converged' if info.converged else info.stop_reason}, "
                         f"{info.iterations} it., inner unconverged {info.inner_unconverged})")
            if best is None or p > best[1]:
                best = (v, p)
        picked[name] = best[0]
        if best[0] in (grid[0], grid[-1]) and len(grid) > 1:
            sweep.append(f"{name}: the pick {best[0]} is at the grid's edge")
    what = "grey" if gray else "RGB"
    print(f"\n   PnP-DRS deblurring ({what}), validation sweep: " + "; ".join(sweep))
    scores = {"blurred": {"psnr": [], "ssim": []}}
    scores.update({m: {"psnr": [], "ssim": []} for m in maps})
    scores.update({f"{m} (ADMM)": {"psnr": [], "ssim": []} for m in admm})
    for i, (photo, clean) in enumerate(tests.items()):
        y = observe(clean, seed + 2 + i)  # grey: the suite's draws
        p, s = _score(y, clean)
        scores["blurred"]["psnr"].append(p)
        scores["blurred"]["ssim"].append(s)
        for name, (factory, _, _) in maps.items():
            runs = [(name, pnp_drs)] + ([(f"{name} (ADMM)", pnp_admm)] if name in admm else [])
            for label, algo in runs:
                x, info = _drs(y, physics, factory(picked[name]), clean, algo)
                tally.pnp(label, photo, info)
                p, s = _score(x, clean)
                scores[label]["psnr"].append(p)
                scores[label]["ssim"].append(s)
    ref = next(m for m in maps if m.startswith("TV"))
    _table(f"PnP-DRS deblurring ({what}; blur 9x9 std 1.6, noise {NOISE}; picked on validation: {picked})", scores,
           [(m, ref) for m in scores if m not in ("blurred", ref)] + [(m, "blurred") for m in maps])
    tally.summary(f"PnP convergence ({what})")
    return {"scores": scores, "picked": picked, "tally": tally.rows}


def _net_factory(model: nn.Module, wrap=None):
    """theta -> D_theta, with theta capped at 1 / (2 alpha) (DRS's condition for an alpha-averaged D)."""
    alpha = _alpha(model)
    base = model if wrap is None else wrap(model)

    def make(theta: float):
        return relax_denoiser(base, theta)

    cap = 1.0 if math.isnan(alpha) else min(1.0, 0.5 / alpha)  # DnCNN (nan): no condition to keep, none certified
    grid = tuple(sorted({t for t in THETAS if t <= cap} | {round(cap, 4)}))
    return make, grid, "theta"


def _lams(grid: tuple[float, ...], vectorial: bool) -> tuple[float, ...]:
    # vectorial TV of an image whose channels share their edges is sqrt 3 x the channel-wise TV (TV_v(u, u, u) = sqrt 3 TV(u)):
    # the same grid scaled by sqrt 3, so both variants search the same range of effective weights
    return tuple(round(l * math.sqrt(3), 4) for l in grid) if vectorial else grid


def _tv_factory(vectorial: bool = False, grid: tuple[float, ...] = PNP_LAMS):
    # inner tol 1e-3 (certified relative distance to the exact prox): 1e-4 costs 6x the time for the same PSNR (+-0.02 dB, measured)
    return (lambda lam: TVProx(lam, tol=TV_TOL, max_iter=5000, vectorial=vectorial)), _lams(grid, vectorial), "lam"


def run(seeds: tuple[int, ...] = (0,), budget: int = 4, jobs: int = 1, parts: str = "grey,pnp,colour,colour-pnp") -> None:
    from multiprocessing import get_context

    t0 = time.perf_counter()
    parts = set(parts.split(","))
    CACHE.mkdir(parents=True, exist_ok=True)
    names = list(recipes(budget))
    todo = [(n, s, budget) for s in seeds for n in sorted(names, key=lambda n: "x" not in n)]  # the long ones first
    if parts <= {"colour", "colour-pnp"}:  # the colour parts use the 1x Heun and the DnCNNs only
        todo = [t for t in todo if t[0] != f"Heun x{budget}"]
        names = [n for n in names if n != f"Heun x{budget}"]
    print(f"== restoration benchmark: training {len(todo)} denoisers (cached in {CACHE}), jobs {jobs}", flush=True)
    rs = get_context("spawn").Pool(jobs).imap_unordered(_train_job, todo) if jobs > 1 else map(_train_job, todo)
    for n, s, dt in rs:
        print(f"   trained {n} seed {s}: {dt:.0f} s" if dt else f"   {n} seed {s}: cached", flush=True)
    for seed in seeds:
        nets = {n: load_denoiser(CACHE / f"{n.replace(' ', '_')}-seed{seed}.pt") for n in names}
        print(f"\n== seed {seed}: parameters " + ", ".join(f"{k} {num_parameters(m)}" for k, m in nets.items()))
        for k, m in nets.items():
            print(f"   certificate {k}: {_certificate(m)}")
        if "grey" in parts:
            _denoise_part(nets, True, seed)
        if "pnp" in parts:
            maps = {"TV prox": _tv_factory()}
            # DnCNN and Heun at 1x / x4 differ little in denoising (above): PnP runs the x4 DnCNN and the 1x networks
            maps.update({k: _net_factory(nets[k]) for k in ("Euler", "Heun", "RK4", f"DnCNN x{budget}")})
            _deblur_part(maps, True, seed, admm=("TV prox",))
        heun = nets["Heun"]
        if "colour" in parts:
            cmaps = {"Heun channel-wise": channelwise(heun, 3), "Heun opponent": opponent_colour(heun),
                     "DnCNN channel-wise": channelwise(nets["DnCNN"], 3), f"DnCNN x{budget} channel-wise": channelwise(nets[f"DnCNN x{budget}"], 3)}
            _denoise_part(nets, False, seed, cmaps)
        if "colour-pnp" in parts:
            maps = {"TV vectorial prox": _tv_factory(True, COLOUR_PNP_LAMS), "TV channel-wise prox": _tv_factory(False, COLOUR_PNP_LAMS),
                    # channel-wise, not opponent: picked on validation (denoising 24.18 vs 24.07 dB, PnP 25.22 vs 25.15 at theta 0.1)
                    "Heun channel-wise": _net_factory(heun, lambda m: channelwise(m, 3)),
                    f"DnCNN x{budget} channel-wise": _net_factory(nets[f"DnCNN x{budget}"], lambda m: channelwise(m, 3))}
            _deblur_part(maps, False, seed)
    print(f"\n   restoration benchmark: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":  # one part alone (bench_stable.py --only restore runs them all): python stable_restoration.py PARTS SEEDS
    import sys

    torch.set_num_threads(1)
    run(tuple(int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "0").split(",")), 4, 1, sys.argv[1] if len(sys.argv) > 1 else "grey,pnp,colour,colour-pnp")
