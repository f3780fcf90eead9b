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

Usage: ``python benchmarks/bench_stable.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
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
    for label, opts, grow in (("adaptive, at init", {"schedule": "adaptive"}, 0),
                              ("adaptive, |A| grown x2", {"schedule": "adaptive"}, 2.0),
                              ("adaptive capped at 2 steps, |A| grown x2", {"schedule": "adaptive", "max_steps": 2}, 2.0),
                              # the cap that keeps the cost: past it h = 2 r / nu shrinks (condition kept, time span cut)
                              ("adaptive capped at 1 step, |A| grown x2", {"schedule": "adaptive", "max_steps": 1}, 2.0),
                              ("adaptive, |A| grown x4", {"schedule": "adaptive"}, 4.0),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes on 2 CPU cores)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 avoids contention on shared CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, quick={args.quick}")
    bench_classifier_step(args.quick)
    bench_torchlip(args.quick)


if __name__ == "__main__":
    main()
