"""Benchmark of proxnets.stable (seed 004).

1. Training-step time (forward + backward + Adam step, batch 128) of the non-expansive classifier
   vs the unconstrained ResNet of the same layout, for the three step rules: adaptive (at
   initialization and after |A| has grown by training x2 and x4: the cost-vs-|A| curve), adaptive capped
   at 2 and at 1 step, fixed (CPL).
   Target: at most 1.5x.
2. Our operator-norm constraint on a conv layer vs deel-torchlip's ``SpectralConv2d`` for the same
   layer: time of a training step of the layer, and the certified accuracy at 36/255 that a small
   1-Lipschitz CNN built from each reaches on mnist5k in a fixed number of epochs (equal
   parameter budget; the certificate uses the exact operator norms of the trained layers for both).

3. Certified accuracy of the non-expansive classifier vs a deel-torchlip network at equal parameters and training
   budget (the suite's quick classifier layout on mnist5k: lift, 2 stages x 2 blocks, transitions, flatten head;
   torchlip: the same layout with ``SpectralConv2d`` + ``GroupSort2`` for each block), with the levers measured one
   at a time: Bjorck-orthonormal lift/transition/head (``glue="orthogonal"``), the Lipschitz-margin loss
   (temperature, margin: picked on a validation split of the training set for each family, never on test), Heun
   blocks. Several seeds, mean and 95% interval; certified accuracy against the l2 radius on 41 radii in [0, 1]
   and its area (the seed's protocol), the table at 36/72/108/255, every certificate from rigorous norms.

4. ``--screen NAMES``: variants of ours (keys of ``SCREEN``: glue, block kernel parametrization, step rule, MaxMin glue,
   wider blocks, Heun / RK4, layouts at equal parameters) and deel-torchlip (``TORCHLIP_SCREEN``: its layout or ours), trained on the training set but its last 500 images and scored on those 500
   (validation) for each loss of ``--grid`` at ``--lr``: where part 3's ``--variants``, ``--pick`` and
   ``--torchlip-lrs`` come from.

5. Denoising (``--only denoise``): the suite's held-out photos and noise draws, PSNR and SSIM (mean, 95% interval over
   the photos, paired differences) of the noisy input, the Gaussian smoother, total-variation (ROF) denoising solved
   to a certified duality gap (:func:`proxnets.stable.tv_denoise`), and the averaged denoiser and DnCNN trained as the
   suite trains them at quick; Gaussian width and TV weight each picked per noise level on the validation photo.

6. Restoration (``--only restore``, ``benchmarks/stable_restoration.py``): Euler / Heun / RK4 at equal parameters and budget,
   ``--restore-seeds`` training seeds, TV inside PnP, colour (a colour-trained firm Heun too), DnCNN at the epoch count its
   validation curve (``--budget`` x the suite's epochs long) picks.
7. Step rules (``--only steprule``): the suite's quick classifier under each rule of ``STEP_RULES`` (adaptive uncapped,
   capped at 2 and 1 steps, fixed CPL) and the ResNet, ``--seeds`` seeds on validation (where the default cap is picked)
   and on test (``--splits``), CPU time per optimizer step vs the ResNet, and the fixed rule trained for the CPU time of
   the uncapped adaptive run (equal compute).

Usage: ``python benchmarks/bench_stable.py [--quick] [--threads N] [--only step,torchlip,certified,denoise,restore,steprule] [--seeds N]
[--jobs N] [--screen NAMES --grid "tau,m;..." --lr LR]``.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, fit
from proxnets.norm_bounds import norm_bound
from proxnets.stable import LipschitzBound
from proxnets.stable import (
    ClassifierConfig, NonExpansiveBlock, NonExpansiveClassifier, ResNetClassifier, ScaledAvgPool2d, certified_accuracy,
    lipschitz_bound, lipschitz_conv2d, lipschitz_linear, num_parameters,
)
from proxnets.utils.benchmark import time_interleaved


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    # lr 0: the whole Adam update is computed, but the weights (hence the adaptive step counts)
    # stay in the state being measured
    opt = torch.optim.Adam(model.parameters(), lr=0.0)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _steps_per_block(model: nn.Module) -> list[int]:
    return [b.schedule_steps(b.norm.exact(b.weight))[0] for b in model.modules() if isinstance(b, NonExpansiveBlock)]


def bench_classifier_step(quick: bool) -> None:
    print("== 1. training step: non-expansive classifier vs ResNet of the same layout (batch 128, 1x28x28)")
    data = load_dataset("mnist5k", seed=0)
    x, y = data.x_train[:128], data.y_train[:128]
    base = dict(in_channels=1, image_size=28, num_classes=10, width=8 if quick else 16, stages=2 if quick else 3,
                blocks_per_stage=2 if quick else 5, head="flatten" if quick else "global")
    rounds = 9 if quick else 21
    torch.manual_seed(0)
    resnet = ResNetClassifier(ClassifierConfig(**base))
    variants = {"ResNet": (resnet, "")}
    cap = ClassifierConfig().max_steps
    for label, opts, grow in (("adaptive (seed, uncapped), at init", {"schedule": "adaptive", "max_steps": 64}, 0),
                              ("adaptive (seed, uncapped), |A| grown x2", {"schedule": "adaptive", "max_steps": 64}, 2.0),
                              ("adaptive capped at 2 steps, |A| grown x2", {"schedule": "adaptive", "max_steps": 2}, 2.0),
                              # the cap that keeps the cost: past it h = 2 r / nu shrinks (condition kept, time span cut)
                              ("adaptive capped at 1 step, |A| grown x2", {"schedule": "adaptive", "max_steps": 1}, 2.0),
                              (f"default (ClassifierConfig(): adaptive, cap {cap}), |A| grown x2", {}, 2.0),
                              (f"default (ClassifierConfig(): adaptive, cap {cap}), |A| grown x4", {}, 4.0),
                              ("adaptive (seed, uncapped), |A| grown x4", {"schedule": "adaptive", "max_steps": 64}, 4.0),
                              ("fixed (CPL), |A| grown x2", {"schedule": "fixed"}, 2.0)):
        torch.manual_seed(0)
        model = NonExpansiveClassifier(ClassifierConfig(**base, **opts))
        if grow:
            with torch.no_grad():  # what training does to |A| (the adaptive rule then takes ceil(T |A|^2 / 2) steps)
                for b in model.modules():
                    if isinstance(b, NonExpansiveBlock):
                        b.weight.mul_(grow)
        variants[label] = (model, f"steps/block {sorted(set(_steps_per_block(model)))}")
    # interleaved (A B A B ...): on a shared machine the load drifts; every variant sees the same drift
    timings = time_interleaved({k: _train_step(m, x, y) for k, (m, _) in variants.items()}, warmup=1, repeats=rounds)
    t_res = timings["ResNet"]
    print(f"ResNet ({num_parameters(resnet)} params): {t_res}")
    for k, (m, note) in variants.items():
        if k == "ResNet":
            continue
        ratio = timings[k].median / t_res.median
        print(f"non-expansive [{k}] ({num_parameters(m)} params, {note}): {timings[k]} -> {ratio:.2f}x the ResNet "
              f"(target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")


def _ours(c: int) -> nn.Sequential:
    return nn.Sequential(
        lipschitz_conv2d(1, c, 3, (28, 28), padding=1), nn.ReLU(), ScaledAvgPool2d(2),
        lipschitz_conv2d(c, 2 * c, 3, (14, 14), padding=1), nn.ReLU(), ScaledAvgPool2d(2),
        nn.Flatten(), lipschitz_linear(2 * c * 49, 10),
    )


def _torchlip(c: int) -> nn.Sequential:
    import deel.torchlip as tl

    return nn.Sequential(
        tl.SpectralConv2d(1, c, 3, padding=1), nn.ReLU(), ScaledAvgPool2d(2),
        tl.SpectralConv2d(c, 2 * c, 3, padding=1), nn.ReLU(), ScaledAvgPool2d(2),
        nn.Flatten(), tl.SpectralLinear(2 * c * 49, 10),
    )


def _rigorous_bound(model: nn.Sequential) -> LipschitzBound:
    """Product of rigorous bounds (``norm_bound``: dense SVD / certified Cholesky / Fourier) of the trained
    layers' operator norms at their true input sizes: the same certificate for both models."""
    shapes = {0: (1, 28, 28), 3: (model[0].out_channels, 14, 14)}
    out, rigorous, whys = 1.0, True, []
    with torch.no_grad():
        for i, m in enumerate(model):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                b = norm_bound(m, shapes.get(i))
                out *= b.value
                rigorous &= b.rigorous
                whys += [b.why] if b.why else []
    return LipschitzBound(out, rigorous, "product of rigorous layer norms", "; ".join(whys))


def bench_torchlip(quick: bool) -> None:
    print("== 2. conv norm constraint: ours (operator norm at the input size) vs deel-torchlip SpectralConv2d")
    try:
        import deel.torchlip  # noqa: F401
    except ImportError as exc:
        print(f"deel-torchlip not installed ({exc}): comparison skipped (pip install deel-torchlip)")
        return
    import deel.torchlip as tl

    x = torch.randn(128, 16, 28, 28)
    ours = lipschitz_conv2d(16, 16, 3, (28, 28), padding=1)
    theirs = tl.SpectralConv2d(16, 16, 3, padding=1)

    def step(layer):
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3)

        def f() -> None:
            loss = layer(x).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return f

    t = time_interleaved({"ours": step(ours), "torchlip": step(theirs)}, warmup=2, repeats=9 if quick else 25)
    print(f"layer 16->16 3x3 on (128, 16, 28, 28): ours {t['ours']}, torchlip {t['torchlip']}, "
          f"ratio ours/torchlip {t['ours'].median / t['torchlip'].median:.2f}")

    data = load_dataset("mnist5k", seed=0)
    epochs = 2 if quick else 10
    c = 16
    for name, build in (("ours", _ours), ("deel-torchlip", _torchlip)):
        torch.manual_seed(0)
        model = build(c)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit(model, data, TrainConfig(epochs=epochs, batch_size=128, lr=3e-3, progress=False, eval_every_epoch=False, seed=0), log=lambda s: None)
        train_time = time.perf_counter() - t0
        model.eval()
        L = _rigorous_bound(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cert = certified_accuracy(model, data.x_test, data.y_test, (0.0, 36 / 255, 72 / 255), lipschitz=L)
        extra = f", lipschitz_bound {lipschitz_bound(model):.4f}" if name == "ours" else ""
        print(f"{name}: {num_parameters(model)} params, {epochs} epochs in {train_time:.1f} s, rigorous L = {L:.4f}{extra}; "
              f"clean {cert[0.0]:.3f}, certified@36/255 {cert[36 / 255]:.3f}, certified@72/255 {cert[72 / 255]:.3f}")


# -- 3. certified accuracy vs deel-torchlip ------------------------------------------------------------
CURVE = [i / 40 for i in range(41)]  # radii in [0, 1]
TABLE_RADII = (36 / 255, 72 / 255, 108 / 255, 1.0)


def _ours_classifier(glue: str = "norm", method: str = "euler", **opts) -> nn.Module:
    """The suite's quick classifier layout; ``opts``: other :class:`ClassifierConfig` fields (``time``: the block's time
    span T, its norm budget: T = 2 is one CPL step h nu = 2; ``glue_activation``; ``max_steps``)."""
    cfg = {"width": 8, "stages": 2, "blocks_per_stage": 2, "max_steps": 2, "train_norm": "bound", **opts}
    return NonExpansiveClassifier(ClassifierConfig(in_channels=1, image_size=28, num_classes=10, head="flatten", glue=glue,
                                                   method=method, **cfg))


# the current pick (issue 19, Cayley round): exactly orthogonal block convolutions, one step at h nu = 2, b = -1/2, orthogonal glue
_CAYLEY = {"glue": "orthogonal", "block_weight": "cayley", "schedule": "fixed", "steps": 1, "block_bias_init": -0.5}
# the diagonal step scale (issue 19, s10): NonExpansiveBlock(step_scale="diagonal"), one step at h nu = 2 (nu = L), orthogonal glue
_DIAG = {"glue": "orthogonal", "block_step_scale": "diagonal", "schedule": "fixed", "steps": 1}

# variants of ours screened on validation (``--screen``): name -> ClassifierConfig overrides
SCREEN = {
    "ortho": {"glue": "orthogonal"},
    "ortho T2": {"glue": "orthogonal", "time": 2.0},
    "ortho maxmin": {"glue": "orthogonal", "glue_activation": "maxmin"},
    "ortho T2 maxmin": {"glue": "orthogonal", "time": 2.0, "glue_activation": "maxmin"},
    "ortho heun1": {"glue": "orthogonal", "method": "heun", "max_steps": 1},  # 2 field evaluations, as 2 Euler steps
    "ortho T2 heun": {"glue": "orthogonal", "time": 2.0, "method": "heun", "max_steps": 1},  # 2 field evaluations
    "ortho T4 euler2": {"glue": "orthogonal", "time": 4.0, "max_steps": 2},  # 2 field evaluations
    "norm T2 maxmin": {"glue": "norm", "time": 2.0, "glue_activation": "maxmin"},
    "ortho bjorck": {"glue": "orthogonal", "block_weight": "bjorck"},
    "ortho bjorck maxmin": {"glue": "orthogonal", "block_weight": "bjorck", "glue_activation": "maxmin"},
    "ortho bjorck fixed": {"glue": "orthogonal", "block_weight": "bjorck", "schedule": "fixed", "steps": 1},
    "ortho bjorck fixed2": {"glue": "orthogonal", "block_weight": "bjorck", "schedule": "fixed", "steps": 2},  # 2x the steps
    "ortho bjorck fixed2 relu": {"glue": "orthogonal", "block_weight": "bjorck", "schedule": "fixed", "steps": 2, "activation": "relu"},
    "ortho bjorck fixed3": {"glue": "orthogonal", "block_weight": "bjorck", "schedule": "fixed", "steps": 3},  # 3x the steps
    "ortho bjorck fixed maxmin-all": {"glue": "orthogonal", "block_weight": "bjorck", "schedule": "fixed", "steps": 1,
                                      "glue_activation": "maxmin-all"},
    # exactly orthogonal circular block convolutions (Cayley transform of the symbol): one step at h nu = 2 has the
    # Jacobian A^T (I - 2 D) A, orthogonal with ReLU; a second step with the same A would nearly repeat the first
    "ortho cayley": {"glue": "orthogonal", "block_weight": "cayley", "schedule": "fixed", "steps": 1},
    "ortho cayley relu": {"glue": "orthogonal", "block_weight": "cayley", "schedule": "fixed", "steps": 1, "activation": "relu"},
    # b = -1/2 at initialization: the step starts near the identity (picked among -1/4, -1/2, -1, -2 by the training loss of
    # 150 steps and the accuracy on the validation images; b = 0 trains badly: every coordinate starts at z -> -|z|)
    "ortho cayley b-.5": {"glue": "orthogonal", "block_weight": "cayley", "schedule": "fixed", "steps": 1, "block_bias_init": -0.5},
    "ortho cayley b-.5 relu": {"glue": "orthogonal", "block_weight": "cayley", "schedule": "fixed", "steps": 1, "block_bias_init": -0.5,
                               "activation": "relu"},
    "ortho cayley maxmin": {"glue": "orthogonal", "block_weight": "cayley", "schedule": "fixed", "steps": 1,
                            "glue_activation": "maxmin"},
    # the two levers together: b = -1/2 (the step starts near the identity) and MaxMin in the glue (keeps the sign the block's
    # -|z| regime loses)
    "ortho cayley b-.5 maxmin": {"glue": "orthogonal", "block_weight": "cayley", "schedule": "fixed", "steps": 1,
                                 "block_bias_init": -0.5, "glue_activation": "maxmin"},
    # the norm budget per block below the full h nu = 2 (adaptive rule, T < 2, one step of h = T: |A| = 1 for Cayley): in
    # z = A x + b the ReLU step is z -> z - T relu(z), slope 1 - T on the active side: T = 2 is -|z| (norm preserving, the
    # sign lost), T < 2 keeps the sign (injective) at the price of shrinking the active coordinates by |1 - T|
    "ortho cayley b-.5 T1.5": {"glue": "orthogonal", "block_weight": "cayley", "schedule": "adaptive", "time": 1.5, "max_steps": 1,
                               "block_bias_init": -0.5},
    "ortho cayley b-.5 T1.8": {"glue": "orthogonal", "block_weight": "cayley", "schedule": "adaptive", "time": 1.8, "max_steps": 1,
                               "block_bias_init": -0.5},
    # more field evaluations per block at the same parameters: one Heun (2 evaluations) / RK4 (4) step at h nu = 2 (r = 1 for both)
    "ortho cayley b-.5 heun": {"glue": "orthogonal", "block_weight": "cayley", "schedule": "fixed", "steps": 1, "block_bias_init": -0.5,
                               "method": "heun"},
    "ortho cayley b-.5 rk4": {"glue": "orthogonal", "block_weight": "cayley", "schedule": "fixed", "steps": 1, "block_bias_init": -0.5,
                              "method": "rk4"},
    # a learned pair-reflection glue (issue 19, s12): PairReflection after the lift and each transition, MaxMin at initialization,
    # the 1x1 conv before it bias-free (per pair an angle and an offset replace the two biases: 22,202 parameters kept)
    "ortho cayley b-.5 reflect": {**_CAYLEY, "glue_activation": "reflect"},
    "ortho reflect": {"glue": "orthogonal", "glue_activation": "reflect"},
    "ortho cayley reflect": {"glue": "orthogonal", "block_weight": "cayley", "schedule": "fixed", "steps": 1, "glue_activation": "reflect"},
    # the layout at 22,202 parameters (issue 19): the trunk paid for by a smaller head (today's head: 15,690 parameters, 71%).
    # deep16: no block at 28x28, six at 16 x 14 x 14, the last transition 16 -> 16 (head 784 -> 10: 7,850; trunk 13,920);
    # s2d16: lift 1 -> 16, space-to-depth transitions (16 -> 64 -> 1x1 -> 16, then -> 32), 2 blocks at 16 x 28 x 28 and 4 at
    # 16 x 14 x 14, a norm-1 2x2 pooling to 32 x 4 x 4 before the head (512 -> 10: 5,130; trunk 13,920);
    # wide24: three blocks at 24 x 14 x 14, the last transition 24 -> 12 (head 588 -> 10: 5,890; trunk 15,624)
    "cayley deep16": {**_CAYLEY, "stage_widths": (8, 16, 16), "stage_blocks": (0, 6)},
    "cayley s2d16": {**_CAYLEY, "stage_widths": (16, 16, 32), "stage_blocks": (2, 4), "downsample": "s2d", "head_pool": 2},
    "cayley s2d16 3-3": {**_CAYLEY, "stage_widths": (16, 16, 32), "stage_blocks": (3, 3), "downsample": "s2d", "head_pool": 2},
    "cayley wide24": {**_CAYLEY, "stage_widths": (14, 24, 12), "stage_blocks": (0, 3)},
    # mid24: between today's and deep16: 1 block at 8 x 28 x 28, 4 at 16 x 14 x 14, the last transition 16 -> 24 (head 1,176 -> 10:
    # 11,770; trunk 9,864)
    "cayley mid24": {**_CAYLEY, "stage_widths": (8, 16, 24), "stage_blocks": (1, 4)},
    # the other way: a larger head paid for by the trunk. head40: 3 blocks at 8 x 28 x 28, none at 14 x 14, the last transition
    # 16 -> 40 (head 1,960 -> 10: 19,610; trunk 1,752); narrow: today's head size with more, narrower blocks (5 at 5 x 28 x 28,
    # 4 at 11 x 14 x 14, the last transition 11 -> 33: head 1,617 -> 10; trunk 5,550)
    "cayley head40": {**_CAYLEY, "stage_widths": (8, 16, 40), "stage_blocks": (3, 0)},
    "cayley narrow": {**_CAYLEY, "stage_widths": (5, 11, 33), "stage_blocks": (5, 4)},
    # the diagonal step scale (issue 19, s10): one Euler step x - 2 A^T T^{-1} sigma(A x + b) per block, T >= A A^T per channel
    # (the SDP-based Lipschitz layer form, q = 1: no parameter added); free kernels (Cayley has no kernel to bound)
    "ortho diag": _DIAG,
    "ortho diag b-.5": {**_DIAG, "block_bias_init": -0.5},
    "ortho diag b-.5 fixed2": {**_DIAG, "block_bias_init": -0.5, "steps": 2},
    "ortho diag b-.5 wide": {**_DIAG, "block_bias_init": -0.5, "blocks_per_stage": 1, "block_features_ratio": 2},  # A: c -> 2c
    "ortho diag b-.5 relu": {**_DIAG, "block_bias_init": -0.5, "activation": "relu"},
    "ortho diag b-.5 bjorck": {**_DIAG, "block_bias_init": -0.5, "block_weight": "bjorck"},
    # fewer, wider blocks at equal parameters: 1 block per stage with A: c -> 2c
    "ortho wide": {"glue": "orthogonal", "blocks_per_stage": 1, "block_features_ratio": 2},
    "ortho wide T2": {"glue": "orthogonal", "blocks_per_stage": 1, "block_features_ratio": 2, "time": 2.0},
    # MaxMin also between blocks (every glue slot)
    "ortho maxmin-all": {"glue": "orthogonal", "glue_activation": "maxmin-all"},
    "ortho maxmin-all T2": {"glue": "orthogonal", "glue_activation": "maxmin-all", "time": 2.0},
    "ortho maxmin-all fixed": {"glue": "orthogonal", "glue_activation": "maxmin-all", "schedule": "fixed", "steps": 1},
    # the seed's training norm: one power iteration per step, differentiable (the gradient sees the normalization);
    # evaluation and certificates still from the converged estimate and the rigorous bound
    "ortho power": {"glue": "orthogonal", "train_norm": "power"},
    "ortho power fixed": {"glue": "orthogonal", "train_norm": "power", "schedule": "fixed", "steps": 1},
    # CPL's rule: one step at h nu = 2 whatever |A| (the full norm budget in every block, however training moves |A|)
    "ortho fixed": {"glue": "orthogonal", "schedule": "fixed", "steps": 1},
    "ortho fixed maxmin": {"glue": "orthogonal", "schedule": "fixed", "steps": 1, "glue_activation": "maxmin"},
}


def bench_screen(names: list[str], grid: list[tuple[float, float]], epochs: int, seed: int = 0, jobs: int = 1) -> None:
    """Train each variant of ours (and deel-torchlip) on the training images but the last 500 and report certified accuracy at
    36/255 on the last 500 (validation, never test) for each (temperature, margin) of ``grid``: what the final
    comparison's choices are picked on."""
    from multiprocessing import get_context

    e0 = 36 / 255
    print(f"== screen on validation (500 images), seed {seed}, {epochs} epochs", flush=True)
    todo = [(name, loss) for name in names for loss in grid]
    args = [(("torchlip", TORCHLIP_SCREEN[n]) if n.startswith("torchlip") else ("ours", SCREEN[n]), seed, loss, epochs, "val", LR)
            for n, loss in todo]
    if jobs > 1:
        with get_context("spawn").Pool(jobs) as pool:
            rs = pool.imap(_certified_job, args)
            _print_screen(todo, rs, e0)
    else:
        _print_screen(todo, map(_certified_job, args), e0)


def _print_screen(todo, rs, e0: float) -> None:
    for (name, loss), r in zip(todo, rs):
        print(f"  val {name} | loss {loss} | params {r['params']} | cert@36 {r['curve'][e0]:.3f} | clean {r['curve'][0.0]:.3f} "
              f"| @72 {r['curve'][72 / 255]:.3f} | area {r['area']:.4f} | L {r['L']:.4f} | {r['time_s']:.0f} s", flush=True)


def _torchlip_classifier(stage_widths: tuple[int, ...] = (8, 16, 32), stage_blocks: tuple[int, ...] = (2, 2)) -> nn.Module:
    """The quick classifier's layout in deel-torchlip layers: every conv a ``SpectralConv2d`` (spectral normalization +
    Bjorck on the reshaped kernel), the blocks ``SpectralConv2d 3x3 -> GroupSort2``; the same parameter count as ours in
    the same layout (``stage_widths``, ``stage_blocks`` as in :class:`ClassifierConfig`, pooling transitions)."""
    import deel.torchlip as tl

    layers: list[nn.Module] = [tl.SpectralConv2d(1, stage_widths[0], 1)]
    c, s = stage_widths[0], 28
    for stage, n in enumerate(stage_blocks):
        for _ in range(n):
            layers += [tl.SpectralConv2d(c, c, 3, padding=1), tl.GroupSort2()]
        layers += [tl.SpectralConv2d(c, stage_widths[stage + 1], 1), ScaledAvgPool2d(2)]
        c, s = stage_widths[stage + 1], s // 2
    layers += [nn.Flatten(), tl.SpectralLinear(c * s * s, 10)]
    return nn.Sequential(*layers)


# torchlip in the layouts of ours screened on validation (``--screen "torchlip NAME"``): the same parameter count
TORCHLIP_SCREEN = {"torchlip": {}, "torchlip deep16": {"stage_widths": (8, 16, 16), "stage_blocks": (0, 6)},
                   "torchlip wide24": {"stage_widths": (14, 24, 12), "stage_blocks": (0, 3)},
                   "torchlip mid24": {"stage_widths": (8, 16, 24), "stage_blocks": (1, 4)}}


def _torchlip_bound(model: nn.Sequential, x: torch.Tensor) -> LipschitzBound:
    """Product of rigorous bounds (``norm_bound``) of each conv / linear at the input size it sees; GroupSort2 (a
    sort of coordinate pairs), Flatten and the scaled pooling are 1-Lipschitz."""
    import deel.torchlip as tl

    out, rigorous, whys, h = 1.0, True, [], x[:1]
    with torch.no_grad():
        for m in model:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                b = norm_bound(m, tuple(h.shape[1:]) if isinstance(m, nn.Conv2d) else None)
                out *= b.value
                rigorous &= b.rigorous
                whys += [b.why] if b.why else []
            elif not isinstance(m, (tl.GroupSort2, nn.Flatten, ScaledAvgPool2d)):
                raise TypeError(f"no Lipschitz rule for {type(m).__name__}")
            h = m(h)
    return LipschitzBound(out, rigorous, "product of rigorous layer norms", "; ".join(whys))


def _certified_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, L: LipschitzBound) -> dict[float, float]:
    from proxnets.stable import certified_radii

    r = certified_radii(model, x, y, lipschitz=L)
    return {e: float((r > e).float().mean()) for e in sorted({0.0, *CURVE, *TABLE_RADII})}


def _area(curve: dict[float, float]) -> float:
    xs = CURVE
    return sum((xs[i + 1] - xs[i]) * (curve[xs[i]] + curve[xs[i + 1]]) / 2 for i in range(len(xs) - 1))


LR = 3e-3  # Adam's learning rate for both families (``--lr``)


def _run_certified(build, data, seed: int, loss: tuple[float, float], epochs: int, lr: float | None = None) -> dict:
    from proxnets.stable import lipschitz_margin_loss

    torch.manual_seed(seed)
    model = build()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(model, data, TrainConfig(epochs=epochs, batch_size=64, lr=lr or LR, progress=False, eval_every_epoch=False, seed=seed),
            loss_fn=lipschitz_margin_loss(margin=loss[1], temperature=loss[0]), log=lambda s: None)
        model.eval()
        L = lipschitz_bound(model) if hasattr(model, "config") else _torchlip_bound(model, data.x_test)
        curve = _certified_curve(model, data.x_test, data.y_test, L)
    return {"curve": curve, "area": _area(curve), "L": float(L), "rigorous": L.rigorous, "time_s": time.perf_counter() - t0,
            "params": num_parameters(model)}


def _loss_pair(text: str) -> tuple[float, float]:
    tau, margin = (float(v) for v in text.split(","))
    return tau, margin


def _build(spec: tuple[str, dict]) -> nn.Module:
    family, opts = spec
    return _torchlip_classifier(**opts) if family == "torchlip" else _ours_classifier(**opts)


def _certified_job(args: tuple) -> dict:
    """One (model, seed) run in a worker process (1 thread): picklable specs, not closures."""
    spec, seed, loss, epochs, split, lr = args
    import dataclasses

    torch.set_num_threads(1)
    data = load_dataset("mnist5k", seed=0)
    if split == "val":
        data = dataclasses.replace(data, x_train=data.x_train[:-500], y_train=data.y_train[:-500], x_test=data.x_train[-500:],
                                   y_test=data.y_train[-500:])
    return _run_certified(lambda: _build(spec), data, seed, loss, epochs, lr)


def bench_certified(quick: bool, n_seeds: int, grid: list[tuple[float, float]], given: dict[str, tuple[float, float]],
                    heun: bool = False, variants: dict[str, tuple[float, float]] | None = None, jobs: int = 1,
                    torchlip_lrs: list[float] | None = None) -> None:
    """``grid``: the (temperature, margin) pairs tried on validation; ``given``: families whose pair was already
    picked on validation (in an earlier run whose log says so) and is not searched again; ``variants``: rows of ours
    (names of :data:`SCREEN`, each with the loss picked for it on validation by ``--screen``); ``jobs``: worker processes
    (each run is independent and single-threaded, results do not depend on it); ``torchlip_lrs``: one torchlip row per
    learning rate (default: ``--lr`` only; a rate picked for torchlip on validation goes here)."""
    from multiprocessing import get_context

    from proxnets.utils.stats import difference_interval, mean_interval

    print("== 3. certified accuracy: non-expansive classifier vs deel-torchlip, equal parameters and budget (mnist5k)")
    try:
        import deel.torchlip  # noqa: F401
    except ImportError as exc:
        print(f"deel-torchlip not installed ({exc}): comparison skipped")
        return
    data = load_dataset("mnist5k", seed=0)
    epochs = 4 if quick else 10
    e0 = 36 / 255
    pool = get_context("spawn").Pool(jobs) if jobs > 1 else None
    run_all = (lambda a: pool.map(_certified_job, a)) if pool else (lambda a: [_certified_job(x) for x in a])
    picked = dict(given)
    for family, spec in (("ours", ("ours", {"glue": "orthogonal"})), ("torchlip", ("torchlip", {}))):
        if family in picked or (family == "ours" and variants):
            print(f"  {family}: loss (tau, margin) given (picked on validation earlier)")
            continue
        rs = run_all([(spec, 0, loss, epochs, "val", LR) for loss in grid])
        scores = {}
        for loss, r in zip(grid, rs):
            scores[loss] = r["curve"][e0]
            print(f"  validation {family} loss (tau {loss[0]}, margin {loss[1]}): certified@36 {r['curve'][e0]:.3f}, "
                  f"clean {r['curve'][0.0]:.3f}, area {r['area']:.4f} ({r['time_s']:.0f} s)", flush=True)
        picked[family] = max(scores, key=scores.get)
        print(f"  picked for {family} on validation: tau {picked[family][0]}, margin {picked[family][1]}", flush=True)
    configs: dict[str, tuple[tuple[str, dict], tuple[float, float], float]] = {}
    if variants:
        for v, loss in variants.items():
            configs[f"ours [{v}], loss {loss}, lr {LR:g}"] = (("ours", SCREEN[v]), loss, LR)
    else:
        configs["ours (norm glue, CE)"] = (("ours", {"glue": "norm"}), (1.0, 0.0), LR)
        configs[f"ours + orthogonal glue, loss {picked['ours']}"] = (("ours", {"glue": "orthogonal"}), picked["ours"], LR)
        if heun:
            configs[f"ours + orthogonal glue, Heun, loss {picked['ours']}"] = (("ours", {"glue": "orthogonal", "method": "heun"}),
                                                                              picked["ours"], LR)
    for lr in torchlip_lrs or [LR]:
        configs[f"deel-torchlip, loss {picked['torchlip']}, lr {lr:g}"] = (("torchlip", {}), picked["torchlip"], lr)
    seeds = list(range(n_seeds))
    flat = run_all([(spec, s, loss, epochs, "test", lr) for spec, loss, lr in configs.values() for s in seeds])
    results = {name: flat[i * len(seeds):(i + 1) * len(seeds)] for i, name in enumerate(configs)}
    for name, rs in results.items():
        print(f"  {name}: params {rs[0]['params']}, L {max(r['L'] for r in rs):.6f} (rigorous {all(r['rigorous'] for r in rs)}), "
              f"{sum(r['time_s'] for r in rs) / len(rs):.0f} s per run", flush=True)

    def cell(vals):
        m, lo, hi = mean_interval(vals)
        return f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"

    print(f"\ncertified accuracy (%), mnist5k test ({len(data.x_test)} images), {len(seeds)} seeds, mean [95% interval]; "
          f"{epochs} epochs, batch 64, Adam {LR:g}")
    print("| model | params | clean | @36/255 | @72/255 | @108/255 | @255/255 | area (radius 0..1) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in results.items():
        cells = [cell([r["curve"][e] for r in rs]) for e in (0.0, *TABLE_RADII)]
        m, lo, hi = mean_interval([r["area"] for r in rs])
        print(f"| {name} | {rs[0]['params']} | " + " | ".join(cells) + f" | {m:.4f} [{lo:.4f}, {hi:.4f}] |")
    for tl in (k for k in results if k.startswith("deel")):
        for name in (k for k in results if k.startswith("ours")):
            for label, key in [(f"{round(e * 255)}/255", e) for e in (e0, *TABLE_RADII[1:])] + [("area", "area")]:
                def value(r):
                    return r["area"] if key == "area" else r["curve"][key]

                a, b = [value(r) for r in results[name]], [value(r) for r in results[tl]]
                d, unit = difference_interval(a, b), (1 if key == "area" else 100)
                ratio = f"{sum(a) / sum(b):.3f}" if sum(b) else "n/a"
                print(f"'{name}' vs '{tl}' at {label}: ratio {ratio}, difference {unit * d[0]:+.{3 if key == 'area' else 1}f} "
                      f"[{unit * d[1]:+.{3 if key == 'area' else 1}f}, {unit * d[2]:+.{3 if key == 'area' else 1}f}] "
                      "(95%, paired by seed)")
    print("curve (mean over seeds), radius: " + ", ".join(f"{e:.3f}" for e in CURVE[::4]))
    for name, rs in results.items():
        print(f"  {name}: " + ", ".join(f"{sum(r['curve'][e] for r in rs) / len(rs):.3f}" for e in CURVE[::4]))


# -- 6. step rules: accuracy cost of the step cap, and adaptive vs fixed at equal compute -------------------------------
# the suite's quick classifier (norm glue, rigorous training norm, plain cross-entropy, 4 epochs, batch 64, Adam 3e-3)
# under each step rule; "cap k": the adaptive rule never takes more than k steps, past it h = 2 r / nu shrinks (the
# condition h L |A|^2 <= 2 r is kept, the block's time span is cut)
STEP_RULES = {
    "adaptive (seed, uncapped)": {"schedule": "adaptive", "max_steps": 64},
    "adaptive, cap 2": {"schedule": "adaptive", "max_steps": 2},
    "adaptive, cap 1": {"schedule": "adaptive", "max_steps": 1},
    "fixed (CPL)": {"schedule": "fixed", "steps": 1},
}


class _Budget(Exception):
    """Raised by the budget callback: the run has used its CPU time."""


def _steprule_job(args: tuple) -> dict:
    """One (rule, seed, split) training in a worker (1 thread): accuracy, certified accuracy (rigorous L), wall and CPU
    time, optimizer steps and the steps per block the rule took. ``budget_s``: stop at that much process CPU time (an
    equal-compute comparison; CPU time, unlike wall time, does not depend on what else the shared machine runs)."""
    import dataclasses

    from proxnets.stable.experiments import StepLog

    rule, seed, split, budget_s = args
    torch.set_num_threads(1)
    data = load_dataset("mnist5k", seed=0)
    if split == "val":
        data = dataclasses.replace(data, x_train=data.x_train[:-500], y_train=data.y_train[:-500], x_test=data.x_train[-500:],
                                   y_test=data.y_train[-500:])
    torch.manual_seed(seed)
    if rule == "ResNet":  # the same layout unconstrained: the per-step cost reference, trained the same way
        model = ResNetClassifier(ClassifierConfig(in_channels=1, image_size=28, num_classes=10, head="flatten", width=8, stages=2,
                                                  blocks_per_stage=2))
    else:
        model = _ours_classifier(glue="norm", **STEP_RULES[rule])
    blocks = [m for m in model.modules() if isinstance(m, NonExpansiveBlock)]
    log = StepLog(blocks) if blocks else None
    steps = [0]
    t0, c0 = time.perf_counter(), time.process_time()

    def budget(event: str, info: dict) -> None:
        if event == "step_end":
            steps[0] += 1
            if budget_s and time.process_time() - c0 >= budget_s:
                raise _Budget

    cfg = TrainConfig(epochs=40 if budget_s else 4, batch_size=64, lr=3e-3, progress=False, eval_every_epoch=False, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fit(model, data, cfg, callbacks=[budget], log=lambda s: None)
        except _Budget:
            pass
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        model.eval()
        L = lipschitz_bound(model)
        curve = _certified_curve(model, data.x_test, data.y_test, L)
    out = {"curve": curve, "area": _area(curve), "L": float(L), "rigorous": L.rigorous, "wall_s": wall, "cpu_s": cpu,
           "steps": steps[0], "mean_n": math.nan, "max_n": 0, "max_ratio": math.nan, "sigma_max": math.nan, "capped": 0}
    if log is not None:
        log.close()
        n = [sum(r) / len(r) for r in log.n]
        out.update(mean_n=sum(n) / len(n), max_n=max(max(r) for r in log.n), max_ratio=log.max_ratio,
                   sigma_max=max(max(r) for r in log.sigma), capped=log.capped)
    return out


def bench_step_rules(n_seeds: int, jobs: int = 1, splits: tuple[str, ...] = ("val", "test"), budget: bool = True) -> None:
    """Each rule of :data:`STEP_RULES` trained ``n_seeds`` times on mnist5k (``val``: the training images but the last
    500, scored on those 500, where a default is picked; ``test``: the full training set, scored on the 1,000 test
    images); paired differences against the uncapped adaptive rule. ``budget``: the fixed rule also trained for the CPU
    time the uncapped adaptive run of the same seed took (equal compute, more optimizer steps)."""
    from multiprocessing import get_context

    from proxnets.utils.stats import difference_interval, mean_interval

    seeds = list(range(n_seeds))
    pool = get_context("spawn").Pool(jobs) if jobs > 1 else None
    run_all = (lambda a: pool.map(_steprule_job, a)) if pool else (lambda a: [_steprule_job(x) for x in a])
    e0 = 36 / 255
    ref = next(iter(STEP_RULES))
    for split in splits:
        print(f"== 6. step rules, suite's quick classifier (norm glue, CE, 4 epochs), split {split}, {n_seeds} seeds, 1 thread each",
              flush=True)
        names = [*STEP_RULES, "ResNet"]
        flat = run_all([(rule, s, split, 0.0) for rule in names for s in seeds])
        res = {rule: flat[i * n_seeds:(i + 1) * n_seeds] for i, rule in enumerate(names)}
        if budget and split == "test":
            rows = run_all([("fixed (CPL)", s, split, res[ref][s]["cpu_s"]) for s in seeds])
            res["fixed (CPL), CPU time of the adaptive run"] = rows
        per_step = {k: sum(r["cpu_s"] / r["steps"] for r in rs) / len(rs) for k, rs in res.items()}
        print("| rule | clean | @36/255 | @72/255 | area | wall s | CPU s | optimizer steps | CPU per step vs ResNet | mean steps/block "
              "| max steps/block | max |A| | max h L S^2/(2r) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for rule, rs in res.items():
            cells = []
            for e in (0.0, e0, 72 / 255):
                m, lo, hi = mean_interval([r["curve"][e] for r in rs])
                cells.append(f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
            m, lo, hi = mean_interval([r["area"] for r in rs])
            avg = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
            print(f"| {rule} | " + " | ".join(cells) + f" | {m:.3f} [{lo:.3f}, {hi:.3f}] | {avg('wall_s'):.0f} | {avg('cpu_s'):.0f} | "
                  f"{avg('steps'):.0f} | {per_step[rule] / per_step['ResNet']:.2f}x | {avg('mean_n'):.2f} | {max(r['max_n'] for r in rs)} | {max(r['sigma_max'] for r in rs):.3f} | "
                  f"{max(r['max_ratio'] for r in rs):.6f} |", flush=True)
        for rule in (k for k in res if k not in (ref, "ResNet")):
            for e, label in ((0.0, "clean"), (e0, "@36/255")):
                d = difference_interval([r["curve"][e] for r in res[rule]], [r["curve"][e] for r in res[ref]])
                print(f"  '{rule}' - '{ref}' {label}: {100 * d[0]:+.1f} points [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] (95%, paired by seed)")
        print("  per seed (clean, @36/255, CPU s): " + "; ".join(
            f"{rule}: " + ", ".join(f"({r['curve'][0.0]:.3f}, {r['curve'][e0]:.3f}, {r['cpu_s']:.0f})" for r in rs) for rule, rs in res.items()),
            flush=True)
    if pool:
        pool.close()


TV_LAMS = (0.02, 0.03, 0.045, 0.065, 0.09, 0.13, 0.18)  # lam grid of TV (searched on the validation photo only)
TV_TOL = 1e-3  # certified |x - x*| <= TV_TOL |x| per image


def _train_suite_denoisers(seed: int = 0) -> dict[str, nn.Module]:
    """The averaged denoiser and the DnCNN exactly as the stable suite trains them at quick (same patches, configs,
    construction order, loss, seeds)."""
    from torch.utils.data import TensorDataset

    from proxnets.data.images import natural_images, random_patches
    from proxnets.stable import AveragedDenoiser, DenoiserConfig, DnCNN
    from proxnets.stable.experiments import STEP_CAP, TEST_PHOTOS, TRAIN_NORM, VAL_PHOTO, _denoising_loss

    photos = natural_images(gray=True)
    train_imgs = {k: v for k, v in photos.items() if k not in TEST_PHOTOS and k != VAL_PHOTO and min(v.shape[-2:]) >= 64}
    patches = random_patches(train_imgs, 32, 2048, seed=seed)
    torch.manual_seed(seed)
    models = {"averaged": AveragedDenoiser(DenoiserConfig(channels=1, image_size=32, width=16, depth=4, averaged_margin=0.1,
                                                          max_steps=STEP_CAP, train_norm=TRAIN_NORM)),
              "DnCNN": DnCNN(channels=1, width=16, depth=5, batch_norm=False)}
    for model in models.values():
        torch.manual_seed(seed)
        fit(model, TensorDataset(patches, patches), TrainConfig(epochs=4, batch_size=32, lr=2e-3, progress=False,
                                                                eval_every_epoch=False, seed=seed),
            loss_fn=_denoising_loss((0.05, 0.2)), log=lambda *_: None)
        model.eval()
    return models


# training recipes of the suite's quick averaged denoiser screened on the validation photo (``--only denoise-recipes``):
# name -> (TrainConfig overrides, DenoiserConfig overrides, n_patches, patch); "suite" is what the suite ran before
DENOISE_RECIPES = {
    "suite": ({}, {}, 2048, 32),
    "lr5e-3 cosine": ({"lr": 5e-3, "schedule": "cosine"}, {}, 2048, 32),
    "lr1e-2 cosine": ({"lr": 1e-2, "schedule": "cosine"}, {}, 2048, 32),
    "lr5e-3 cosine T1.8": ({"lr": 5e-3, "schedule": "cosine"}, {"time": 1.8}, 2048, 32),
    "lr5e-3 cosine 24px x2": ({"lr": 5e-3, "schedule": "cosine"}, {}, 4096, 24),  # ~the same pixels, twice the steps
    # 4x the suite's training budget: is the gap to the Gaussian smoother the budget?
    "suite x4 epochs": ({"epochs": 16}, {}, 2048, 32),
    "lr5e-3 cosine x4 epochs": ({"epochs": 16, "lr": 5e-3, "schedule": "cosine"}, {}, 2048, 32),
}


def bench_denoise_recipes(names: list[str], seed: int = 0, jobs: int = 1) -> None:
    """Train the suite's quick averaged denoiser with each recipe and score it on the validation photo only (PSNR at the
    suite's two noise levels and validation noise draws): where a suite recipe is picked; test photos are not used."""
    from multiprocessing import get_context

    print(f"== denoiser training recipes, validation photo only, seed {seed}", flush=True)
    args = [(n, seed) for n in names]
    rs = get_context("spawn").Pool(jobs).imap(_recipe_job, args) if jobs > 1 else map(_recipe_job, args)
    for n, r in zip(names, rs):
        print(f"  {n}: validation PSNR " + ", ".join(f"sigma {k}: {v:.2f}" for k, v in r["psnr"].items())
              + f", mean {r['mean']:.2f} dB (Gaussian on it: {r['gauss']:.2f}); {r['steps']} steps, train {r['time_s']:.0f} s", flush=True)


def _recipe_job(args: tuple) -> dict:
    from torch.utils.data import TensorDataset

    from proxnets.data.images import natural_images, random_patches
    from proxnets.stable import AveragedDenoiser, DenoiserConfig, psnr
    from proxnets.stable.experiments import STEP_CAP, TEST_PHOTOS, TRAIN_NORM, VAL_PHOTO, _denoising_loss, _gaussian_smoother, _noisy, _square

    name, seed = args
    torch.set_num_threads(1)
    train_over, den_over, n_patches, patch = DENOISE_RECIPES[name]
    photos = natural_images(gray=True)
    train_imgs = {k: v for k, v in photos.items() if k not in TEST_PHOTOS and k != VAL_PHOTO and min(v.shape[-2:]) >= 64}
    patches = random_patches(train_imgs, patch, n_patches, seed=seed)
    torch.manual_seed(seed)
    model = AveragedDenoiser(DenoiserConfig(**{"channels": 1, "image_size": patch, "width": 16, "depth": 4, "averaged_margin": 0.1,
                                               "max_steps": STEP_CAP, "train_norm": TRAIN_NORM, **den_over}))
    torch.manual_seed(seed)
    cfg = TrainConfig(**{"epochs": 4, "batch_size": 32, "lr": 2e-3, "progress": False, "eval_every_epoch": False, "seed": seed, **train_over})
    t0 = time.perf_counter()
    fit(model, TensorDataset(patches, patches), cfg, loss_fn=_denoising_loss((0.05, 0.2)), log=lambda *_: None)
    dt = time.perf_counter() - t0
    model.eval()
    val = _square(photos[VAL_PHOTO], 64)
    out, gauss = {}, []
    for sigma in (0.1, 0.15):
        noisy = _noisy(val, sigma, seed + 99)  # the suite's validation draw
        with torch.no_grad():
            out[sigma] = psnr(model(noisy).clamp(0, 1), val)
        gauss.append(max(psnr(_gaussian_smoother(s)(noisy).clamp(0, 1), val) for s in (0.5, 0.75, 1.0, 1.5, 2.0)))
    return {"psnr": out, "mean": sum(out.values()) / len(out), "gauss": sum(gauss) / len(gauss), "time_s": dt,
            "steps": cfg.epochs * (n_patches // cfg.batch_size)}


def bench_denoise(quick: bool, denoiser: str = "", seed: int = 0) -> None:
    """Denoising of the suite's held-out photos: noisy, Gaussian smoother, TV (ROF), the averaged denoiser.

    Same images, same noise draws as the suite's denoising part (seed 0); the Gaussian width and the TV weight lam
    are each picked per noise level on the validation photo. TV is solved to a certified relative distance
    ``TV_TOL`` from its exact minimizer (duality gap), every solve's flag checked.
    """
    from proxnets.data.images import natural_images
    from proxnets.stable import load_denoiser, psnr, ssim, tv_denoise
    from proxnets.stable.experiments import TEST_PHOTOS, VAL_PHOTO, _gaussian_smoother, _noisy, _square
    from proxnets.utils.stats import difference_interval, mean_interval

    side = 64 if quick else 256
    sigmas = (0.1, 0.15)
    stds = (0.5, 0.75, 1.0, 1.5, 2.0)  # the suite's quick grid
    print(f"== 5. denoising of {len(TEST_PHOTOS)} held-out photos ({side}x{side}), validation photo '{VAL_PHOTO}'")
    t0 = time.perf_counter()
    nets = {"averaged": load_denoiser(denoiser)} if denoiser else _train_suite_denoisers(seed)
    print(f"   {', '.join(nets)}: {'loaded ' + denoiser if denoiser else 'trained (suite quick recipe)'} in {time.perf_counter() - t0:.0f} s, "
          + ", ".join(f"{k} {num_parameters(m)} params" for k, m in nets.items()))
    photos = natural_images(gray=True)
    val = _square(photos[VAL_PHOTO], side)
    tests = {k: _square(photos[k], side) for k in TEST_PHOTOS}
    worst = 0.0

    def tv(noisy, lam):
        nonlocal worst
        x, info = tv_denoise(noisy, lam, tol=TV_TOL, max_iter=20000, policy="raise")
        worst = max(worst, info.residuals[-1])
        return x

    methods = ("noisy", "Gaussian", "TV", *nets)
    for sigma in sigmas:
        noisy_val = _noisy(val, sigma, seed + 99)
        std = max(stds, key=lambda s: psnr(_gaussian_smoother(s)(noisy_val).clamp(0, 1), val))
        val_tv = {lam: psnr(tv(noisy_val, lam).clamp(0, 1), val) for lam in TV_LAMS}
        lam = max(val_tv, key=val_tv.get)
        edge = " (grid edge)" if lam in (TV_LAMS[0], TV_LAMS[-1]) else ""
        print(f"   sigma {sigma}: Gaussian std {std}, TV lam {lam}{edge} (validation PSNR by lam: "
              + ", ".join(f"{k}: {v:.2f}" for k, v in val_tv.items()) + ")")
        j = sigmas.index(sigma)
        scores = {m: {"psnr": [], "ssim": []} for m in methods}
        for i, clean in enumerate(tests.values()):
            noisy = _noisy(clean, sigma, seed + 1000 * i + j)  # the suite's noise draw
            with torch.no_grad():
                outs = {"noisy": noisy, "Gaussian": _gaussian_smoother(std)(noisy), "TV": tv(noisy, lam), **{k: m(noisy) for k, m in nets.items()}}
            for m, out in outs.items():
                scores[m]["psnr"].append(psnr(out.clamp(0, 1), clean))
                scores[m]["ssim"].append(ssim(out.clamp(0, 1), clean))
        pairs = [("averaged", "TV"), ("TV", "Gaussian"), ("averaged", "Gaussian")] + ([("DnCNN", "TV")] if "DnCNN" in nets else [])
        print(f"   | sigma {sigma} | " + " | ".join(methods) + " | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |")
        for metric in ("psnr", "ssim"):
            f = 2 if metric == "psnr" else 3
            cells = ["{:.{f}f} [{:.{f}f}, {:.{f}f}]".format(*mean_interval(scores[m][metric]), f=f) for m in methods]
            for a, b in pairs:
                cells.append("{:+.{f}f} [{:+.{f}f}, {:+.{f}f}]".format(*difference_interval(scores[a][metric], scores[b][metric]), f=f))
            print(f"   | {metric.upper()} | " + " | ".join(cells) + " |")
    print(f"   TV: every solve converged (policy raise), largest certified relative distance to the exact ROF minimizer {worst:.2e}; "
          f"{time.perf_counter() - t0:.0f} s in all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes on 2 CPU cores)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 avoids contention on shared CPUs)")
    parser.add_argument("--only", default="step,torchlip,certified", help="comma-separated parts: step, torchlip, certified, denoise")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the certified comparison (>= 2 for intervals)")
    parser.add_argument("--grid", default="1,0;8,0.3", help="(temperature,margin) pairs of the margin loss tried on validation")
    parser.add_argument("--pick", default="", help="family=tau,margin already picked on validation (e.g. ours=1,0): not searched")
    parser.add_argument("--heun", action="store_true", help="also the Heun-block variant of ours")
    parser.add_argument("--variants", default="", help="rows of ours: 'SCREEN name=tau,margin;...' (loss picked on validation)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate of the certified comparison (both families)")
    parser.add_argument("--torchlip-lrs", default="", help="comma-separated learning rates, one torchlip row each")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes for the certified comparison")
    parser.add_argument("--denoiser", default="", help="part denoise: a saved averaged denoiser (default: train the suite's)")
    parser.add_argument("--recipes", default="", help="part denoise-recipes: comma-separated names of DENOISE_RECIPES (default all)")
    parser.add_argument("--restore-seeds", default="0", help="part restore (benchmarks/stable_restoration.py): training seeds")
    parser.add_argument("--budget", type=int, default=8, help="part restore: DnCNN's validation curve length, x the suite's epochs")
    parser.add_argument("--splits", default="val,test", help="part steprule: 'val' (where a default is picked), 'test', or both")
    parser.add_argument("--screen", default="", help="comma-separated variants of SCREEN (or 'torchlip') to screen on validation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global LR
    LR = args.lr
    parts = set(args.only.split(","))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, quick={args.quick}")
    if args.screen:
        bench_screen(args.screen.split(","), [_loss_pair(t) for t in args.grid.split(";") if t], 4 if args.quick else 10,
                     jobs=args.jobs)
        return
    if "step" in parts:
        bench_classifier_step(args.quick)
    if "torchlip" in parts:
        bench_torchlip(args.quick)
    if "certified" in parts:
        grid = [_loss_pair(t) for t in args.grid.split(";") if t]
        given = {k: _loss_pair(v) for k, v in (p.split("=") for p in args.pick.split(";") if p)}
        variants = {k: _loss_pair(v) for k, v in (p.split("=") for p in args.variants.split(";") if p)}
        lrs = [float(v) for v in args.torchlip_lrs.split(",") if v]
        bench_certified(args.quick, args.seeds, grid, given, args.heun, variants, args.jobs, lrs)
    if "denoise" in parts:
        bench_denoise(args.quick, args.denoiser)
    if "restore" in parts:  # Euler/Heun/RK4, TV inside PnP, colour, budget: benchmarks/stable_restoration.py
        import stable_restoration

        stable_restoration.run(tuple(int(v) for v in args.restore_seeds.split(",")), args.budget, args.jobs)
    if "steprule" in parts:
        bench_step_rules(args.seeds, args.jobs, tuple(args.splits.split(",")))
    if "denoise-recipes" in parts:
        bench_denoise_recipes(args.recipes.split(",") if args.recipes else list(DENOISE_RECIPES), jobs=args.jobs)


if __name__ == "__main__":
    main()
