"""Stable networks from convex analysis and ODEs (seed 004): non-expansive and averaged residual
networks, certified robustness, Plug-and-Play restoration.

The block ``x -> x - h A^T sigma(A x + b)`` is an explicit step of the gradient flow of a convex
potential; it is non-expansive when ``h L |A|^2 <= 2 r`` and averaged under a strict inequality
(:mod:`proxnets.stable.blocks`). ``|A|`` is the operator norm of the convolution at its input size
(:mod:`proxnets.stable.norms`, built on :mod:`proxnets.operators`).

Certificates: :func:`certificate` (``lipschitz_bound(model) <= 1`` with rigorous operator-norm bounds,
the block norm conditions, the constrained layers' norms, averagedness), certified l2 radii
``m / (sqrt(2) L)`` with a rigorous ``L`` only, fixed-point residuals of PnP iterations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from proxnets.stable.blocks import MONOTONE_ACTIVATIONS, NonExpansiveBlock, ResNetBlock, diagonal_step_scale
from proxnets.stable.certify import certificate, lipschitz_margin_loss, certified_accuracy, certified_radii, margins, pgd_l2, rigorous_lipschitz, robust_accuracy
from proxnets.stable.glue import (
    ChannelSelect, MaxMin, PairReflection, ScaledAvgPool2d, ScaledGlobalAvgPool, SpaceToDepth, ZeroChannelPad, lipschitz_conv2d, lipschitz_linear, orthogonal_conv1x1,
    orthogonal_linear,
)
from proxnets.stable.integrators import RK_METHODS, compose_averaged
from proxnets.stable.lipschitz import LipschitzBound, empirical_lipschitz, lipschitz_bound
from proxnets.stable.models import (
    AveragedDenoiser, ClassifierConfig, DenoiserConfig, DnCNN, NonExpansiveClassifier, ResNetClassifier, num_parameters,
)
from proxnets.stable.tv import TVProx, tv_denoise, total_variation, tv_dual_gap
from proxnets.stable.norms import NormConstraintWarning, OperatorNorm, OperatorNormConstraint, constrain_operator_norm
from proxnets.stable.physics import Blur, Denoising, gaussian_kernel, motion_kernel
from proxnets.stable.pnp import PnPInfo, firmly_nonexpansive, pnp_admm, pnp_drs, pnp_fbs, psnr, relax_denoiser, ssim
from proxnets.stable.restore import deblur_image, denoise_image, load_denoiser, opponent_colour, save_denoiser

__all__ = [
    "MONOTONE_ACTIVATIONS", "RK_METHODS", "NonExpansiveBlock", "ResNetBlock", "compose_averaged", "diagonal_step_scale",
    "OperatorNorm", "OperatorNormConstraint", "constrain_operator_norm", "NormConstraintWarning",
    "lipschitz_conv2d", "lipschitz_linear", "orthogonal_conv1x1", "orthogonal_linear", "lipschitz_margin_loss", "ScaledAvgPool2d", "ScaledGlobalAvgPool", "SpaceToDepth", "MaxMin", "PairReflection", "ZeroChannelPad", "ChannelSelect",
    "lipschitz_bound", "empirical_lipschitz", "LipschitzBound", "certificate", "rigorous_lipschitz",
    "ClassifierConfig", "NonExpansiveClassifier", "ResNetClassifier", "DenoiserConfig", "AveragedDenoiser", "DnCNN",
    "num_parameters", "margins", "certified_radii", "certified_accuracy", "pgd_l2", "robust_accuracy", "tv_denoise", "total_variation", "tv_dual_gap", "TVProx",
    "Denoising", "Blur", "gaussian_kernel", "motion_kernel",
    "PnPInfo", "pnp_fbs", "pnp_drs", "pnp_admm", "firmly_nonexpansive", "relax_denoiser", "psnr", "ssim",
    "denoise_image", "deblur_image", "save_denoiser", "load_denoiser", "opponent_colour",
    "MODELS", "DENOISERS", "denoising_loss",
]


def _classifier(cls, input_shape, num_classes, **opts):
    from proxnets.engine import Trainable, TrainConfig

    c, h, w = input_shape
    if h != w:
        raise ValueError(f"input_shape: expected square images (C, S, S), got {tuple(input_shape)}")
    train_keys = {"epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule"}
    train = {k: opts.pop(k) for k in list(opts) if k in train_keys}
    model = cls(ClassifierConfig(in_channels=c, image_size=h, num_classes=num_classes, **opts))
    # seed: SGD momentum 0.9, wd 1e-4, one-cycle; Adam is the faster choice on CPU budgets
    cfg = TrainConfig(**{"epochs": 5, "batch_size": 128, "lr": 1e-3, "optimizer": "adam", **train})
    return Trainable(model=model, config=cfg, certificate=certificate)


def denoising_loss(sigma: float):
    """``loss_fn(model, x, y) = mean |model(x + sigma n) - x|^2`` (labels ignored)."""

    def loss_fn(model, x, y):
        return F.mse_loss(model(x + sigma * torch.randn_like(x)), x)

    return loss_fn


MODELS = {
    "nonexpansive-classifier": lambda input_shape, num_classes, **o: _classifier(NonExpansiveClassifier, input_shape, num_classes, **o),
    "resnet-classifier": lambda input_shape, num_classes, **o: _classifier(ResNetClassifier, input_shape, num_classes, **o),
}

DENOISERS = {
    "averaged-denoiser": lambda channels=1, **o: AveragedDenoiser(DenoiserConfig(channels=channels, **o)),
    "dncnn": lambda channels=1, **o: DnCNN(channels=channels, **o),
}
