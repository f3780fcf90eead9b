"""Restoration from and to PNG files: what ``proxnets denoise`` and ``proxnets deblur`` call.

Images are read and written by :mod:`proxnets.data.images` (atomic PNG writes).
- :func:`save_denoiser` / :func:`load_denoiser`: a denoiser with its config (weights only, no pickle).
- :func:`denoise_image`: apply a denoiser to a noisy PNG (or to a clean one with simulated noise).
- :func:`deblur_image`: PnP deblurring of a blurred PNG (or of a clean one with simulated blur).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from proxnets.stable.models import AveragedDenoiser, DenoiserConfig, DnCNN
from proxnets.stable.physics import Blur, gaussian_kernel, motion_kernel
from proxnets.stable.pnp import SOLVERS, psnr, ssim
from proxnets.data.images import read_image, write_image
from proxnets.utils.io import load_state, save_state
from proxnets.utils.validation import check_choice, check_number, fail

__all__ = ["save_denoiser", "load_denoiser", "denoise_image", "deblur_image", "KERNELS"]

KERNELS = ("gaussian", "motion")


def save_denoiser(path: str | os.PathLike, model: nn.Module) -> Path:
    """Save an :class:`AveragedDenoiser` or :class:`DnCNN` with what rebuilds it."""
    if isinstance(model, AveragedDenoiser):
        meta = {"kind": "averaged", "config": dataclasses.asdict(model.config)}
    elif isinstance(model, DnCNN):
        meta = {"kind": "dncnn", "config": dict(model.hyper)}
    else:
        fail("model", "an AveragedDenoiser or DnCNN", type(model).__name__, TypeError)
    return save_state(path, {**meta, "state": model.state_dict()})


# What a denoiser file may declare (proxnets.utils.io.validate_metadata); caps far above any real model.
_AVERAGED_META = {
    "channels": (int, 1, 4), "image_size": (int, 1, 4096), "width": (int, 1, 1024), "depth": (int, 1, 1000),
    "kernel_size": (int, 1, 15), "activation": (str, None), "method": (str, None), "time": (float, 1e-6, 1e3),
    "averaged_margin": (float, 0.0, 1.0), "schedule": (str, None), "max_steps": (int, 1, 10_000),
}
_DNCNN_META = {"channels": (int, 1, 4), "width": (int, 1, 1024), "depth": (int, 2, 1000), "batch_norm": (bool,)}
MAX_DENOISER_PARAMETERS = 100_000_000


def _check_denoiser_meta(blob: dict) -> None:
    from proxnets.utils.io import validate_metadata

    cfg = validate_metadata("config", blob.get("config"), _AVERAGED_META if blob["kind"] == "averaged" else _DNCNN_META)
    width, depth, k = cfg.get("width", 64), cfg.get("depth", 10), cfg.get("kernel_size", 3)
    if width * width * k * k * depth > MAX_DENOISER_PARAMETERS:
        fail("config", f"a denoiser of at most {MAX_DENOISER_PARAMETERS} weights", f"width {width}, depth {depth}")


def load_denoiser(path: str | os.PathLike) -> nn.Module:
    """The denoiser saved by :func:`save_denoiser`, in evaluation mode."""
    blob = load_state(path)
    if not isinstance(blob, dict) or blob.get("kind") not in ("averaged", "dncnn"):
        fail("path", "a denoiser checkpoint written by save_denoiser", str(path))
    _check_denoiser_meta(blob)  # caps before any layer is built (a file could declare depth 3,000,000)
    model = AveragedDenoiser(DenoiserConfig(**blob["config"])) if blob["kind"] == "averaged" else DnCNN(**blob["config"])
    model.load_state_dict(blob["state"])
    return model.eval()


def _resolve_model(model: nn.Module | str | os.PathLike) -> nn.Module:
    if isinstance(model, (str, os.PathLike)):
        return load_denoiser(model)
    if not isinstance(model, nn.Module):
        fail("model", "a denoiser nn.Module or a checkpoint path", type(model).__name__, TypeError)
    return model.eval()


def _check_channels(x: torch.Tensor, model: nn.Module, path: Any) -> None:
    want = getattr(model, "in_channels", None)
    if want is not None and x.shape[1] != want:
        fail("path_in", f"an image with {want} channel(s) for this model", f"{str(path)!r} with {x.shape[1]}")


def denoise_image(
    path_in: str | os.PathLike,
    model: nn.Module | str | os.PathLike,
    path_out: str | os.PathLike,
    *,
    add_noise: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Denoise the PNG ``path_in`` with ``model`` (a module or a checkpoint) into ``path_out``.

    ``add_noise = sigma`` first corrupts the (clean) input with Gaussian noise of that standard
    deviation and reports PSNR/SSIM of the noisy and denoised images against it.
    Returns ``{"height", "width", "channels"}`` plus those metrics when simulated.
    """
    model = _resolve_model(model)
    clean = read_image(path_in)[None]  # (1, C, H, W)
    _check_channels(clean, model, path_in)
    out: dict[str, float] = {"height": clean.shape[2], "width": clean.shape[3], "channels": clean.shape[1]}
    y = clean
    if add_noise is not None:
        sigma = check_number("add_noise", add_noise, low=0.0)
        g = torch.Generator().manual_seed(seed)
        y = clean + sigma * torch.randn(clean.shape, generator=g)
    with torch.no_grad():
        x = model(y)
    if add_noise is not None:
        out.update(psnr_noisy=psnr(y.clamp(0, 1), clean), psnr_denoised=psnr(x.clamp(0, 1), clean), ssim_denoised=ssim(x.clamp(0, 1), clean))
    write_image(path_out, x[0].clamp(0, 1))
    return out


def deblur_image(
    path_in: str | os.PathLike,
    model: nn.Module | str | os.PathLike,
    path_out: str | os.PathLike,
    *,
    kernel: str = "gaussian",
    kernel_size: int = 9,
    kernel_sigma: float = 1.6,
    angle: float = 0.0,
    boundary: str = "circular",
    algorithm: str = "fbs",
    gamma: float | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    simulate: bool = False,
    noise: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """PnP deblurring of the PNG ``path_in`` into ``path_out`` with ``model`` as the denoiser.

    The blur is ``kernel`` (``"gaussian"``: std ``kernel_sigma``; ``"motion"``: a segment at
    ``angle`` degrees) of ``kernel_size`` with the ``boundary`` model (``"circular"`` or
    ``"valid"``: the output is then larger than the input by ``kernel_size - 1``). ``algorithm``:
    ``"fbs"`` (``gamma < 2/|A|^2``, default ``1/|A|^2``), ``"drs"`` or ``"admm"`` (default ``gamma = 1``).
    ``simulate=True`` treats the input as the clean image: it is blurred, ``noise`` added, restored,
    and PSNR/SSIM are reported against it. Returns the solver's summary (iterations, converged,
    diverged, stop_reason, inner_unconverged, final residual, psnr).
    """
    check_choice("kernel", kernel, KERNELS)
    check_choice("algorithm", algorithm, list(SOLVERS))
    model = _resolve_model(model)
    img = read_image(path_in)[None]  # (1, C, H, W)
    _check_channels(img, model, path_in)
    k = gaussian_kernel(kernel_size, kernel_sigma) if kernel == "gaussian" else motion_kernel(kernel_size, angle)
    physics = Blur(k, boundary)
    x_true = None
    if simulate:
        x_true = img
        g = torch.Generator().manual_seed(seed)
        y = physics.A(img)
        y = y + check_number("noise", noise, low=0.0) * torch.randn(y.shape, generator=g)
    else:
        y = img
        if kernel_size > min(img.shape[-2:]):
            fail("kernel", f"a kernel no larger than the image {tuple(img.shape[-2:])}", f"size {kernel_size}")
    options: dict[str, Any] = {"max_iter": max_iter, "tol": tol, "x_true": x_true}
    if gamma is not None or algorithm != "fbs":
        options["gamma"] = 1.0 if gamma is None else gamma
    x, info = SOLVERS[algorithm](y, physics, model, **options)
    write_image(path_out, x[0].clamp(0, 1))
    summary: dict[str, Any] = {"iterations": info.iterations, "converged": info.converged, "diverged": info.diverged,
                               "stop_reason": info.stop_reason, "inner_unconverged": info.inner_unconverged,
                               "gamma": info.gamma, "final_residual": info.residuals[-1] if info.residuals else None}
    if simulate:
        summary.update(psnr_blurred=psnr(y.clamp(0, 1), img) if boundary == "circular" else None,
                       psnr_restored=info.psnr[-1], ssim_restored=info.ssim[-1])
    return summary
