"""Restoration from and to PNG files: what ``proxnets denoise`` and ``proxnets deblur`` call.

Images are read and written by :mod:`proxnets.data.images` (atomic PNG writes).
- :func:`save_denoiser` / :func:`load_denoiser`: a denoiser with its config (weights only, no pickle).
- :func:`train_denoiser`: a small averaged (or firmly non-expansive) denoiser trained on patches of
  scikit-image's embedded photographs (none of the held-out test photographs), with progress.
- :func:`default_denoiser_path` / :func:`resolve_denoiser`: where a trained denoiser comes from.
- :func:`denoise_image`: apply a denoiser to a noisy PNG (or to a clean one with simulated noise).
- :func:`deblur_image`: PnP deblurring of a blurred PNG (or of a clean one with simulated blur).

Strength. Both apply ``D_theta = (1 - theta) I + theta D`` (``theta = strength``): ``theta alpha``-averaged when
``D`` is ``alpha``-averaged, so every strength keeps PnP's guarantee. Defaults: :data:`DENOISE_STRENGTH`,
:data:`DEBLUR_STRENGTH` (the deblurring default is small: inside PnP the denoiser is applied at every
iteration, and the full strength over-smooths; measured on the embedded test photographs, ``docs/stable.md``).

Colour. A denoiser trained on grey images is applied to each channel of an RGB image separately: the
channel-wise map is as averaged as ``D`` (``|T x - T y|^2`` and the averagedness inequality add over channels).
:func:`opponent_colour` applies it in an orthonormal opponent colour basis instead (luminance and two chroma axes),
equally averaged: an orthogonal change of basis and a per-channel affine rescaling of ``D`` leave the averagedness
inequality unchanged (both sides scale alike).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from proxnets.stable.blocks import TRAIN_NORMS
from proxnets.stable.models import AveragedDenoiser, DenoiserConfig, DnCNN
from proxnets.stable.physics import Blur, gaussian_kernel, motion_kernel
from proxnets.stable.pnp import SOLVERS, psnr, relax_denoiser, ssim
from proxnets.data.images import read_image, write_image
from proxnets.utils.io import load_state, save_state
from proxnets.utils.validation import check_choice, check_int, check_number, fail

__all__ = ["save_denoiser", "load_denoiser", "denoise_image", "deblur_image", "train_denoiser", "default_denoiser_path",
           "resolve_denoiser", "training_photos", "channelwise", "opponent_colour", "OPPONENT", "KERNELS", "DENOISE_STRENGTH", "DEBLUR_STRENGTH", "TEST_PHOTOS", "VAL_PHOTO"]

KERNELS = ("gaussian", "motion")
DENOISE_STRENGTH = 1.0
DEBLUR_STRENGTH = 0.05
# the embedded photographs held out for testing / validation (the reproduce suite's split); the rest trains
TEST_PHOTOS = ("camera", "astronaut", "chelsea", "coins", "moon", "clock")
VAL_PHOTO = "coffee"
DEFAULT_DENOISER = Path("runs") / "reproduce" / "stable" / "averaged_denoiser.pt"


def default_denoiser_path() -> Path:
    """Where ``proxnets reproduce stable`` (default ``--out``) leaves its trained averaged denoiser."""
    return DEFAULT_DENOISER


def training_photos(colour: bool = False, min_side: int = 32) -> dict[str, torch.Tensor]:
    """The embedded photographs a denoiser may train on: all but :data:`TEST_PHOTOS` and :data:`VAL_PHOTO`, those with
    both sides ``>= min_side``, as ``{name: (C, H, W)}``; ``colour=True`` gives them in RGB (``C = 3``; a grey photograph
    has its one channel repeated), the same photographs and pixels as the grey set. The RGB photographs the colour
    benchmark tests on (``astronaut``, ``chelsea``; ``retina`` is not among :data:`proxnets.data.images.PHOTOS`) are
    never among them."""
    from proxnets.data.images import PHOTOS, natural_images

    check_int("min_side", min_side, low=1)
    names = tuple(n for n in PHOTOS if n not in TEST_PHOTOS and n != VAL_PHOTO)
    photos = natural_images(gray=not colour, names=names)
    return {k: v for k, v in photos.items() if min(v.shape[-2:]) >= min_side}


def train_denoiser(
    *,
    firm: bool = False,
    channels: int = 1,
    width: int = 16,
    depth: int = 4,
    patch: int = 32,
    n_patches: int = 1024,
    epochs: int = 2,
    sigmas: tuple[float, float] = (0.05, 0.2),
    seed: int = 0,
    progress: bool = True,
    log: Any = print,
) -> AveragedDenoiser:
    """A small :class:`AveragedDenoiser` trained by Adam on ``n_patches`` noisy patches of :func:`training_photos`
    (the embedded photographs other than :data:`TEST_PHOTOS` and :data:`VAL_PHOTO`; noise std drawn in ``sigmas``):
    grey for ``channels=1``, RGB patches for ``channels=3`` (a colour denoiser, same photographs).

    ``firm=True`` builds :meth:`DenoiserConfig.firm` (Heun, firmly non-expansive at every image size), otherwise
    the default averaged Euler denoiser. About 10-30 s on two CPU cores at the defaults. Returns it in eval mode.
    """
    import torch.nn.functional as F

    from torch.utils.data import TensorDataset

    from proxnets.data.images import random_patches
    from proxnets.engine import TrainConfig, fit

    check_choice("channels", channels, [1, 3])
    x = random_patches(training_photos(channels == 3, patch), patch, n_patches, seed=seed)  # (N, C, p, p)
    data = TensorDataset(x, x)  # (input, target): the loss adds the noise to the input
    kw = {"channels": channels, "image_size": patch, "width": width, "depth": depth}
    torch.manual_seed(seed)
    model = AveragedDenoiser(DenoiserConfig.firm(**kw) if firm else DenoiserConfig(**kw))

    def loss_fn(m, xb, yb):
        s = torch.empty(len(xb), 1, 1, 1).uniform_(*sigmas)
        return F.mse_loss(m(xb + s * torch.randn_like(xb)), yb)

    fit(model, data, TrainConfig(epochs=epochs, batch_size=32, lr=2e-3, progress=progress, eval_every_epoch=False, seed=seed),
        loss_fn=loss_fn, log=log)
    return model.eval()


def channelwise(denoiser: nn.Module, channels: int):
    """``(B, C, H, W) -> (B, C, H, W)`` applying a 1-channel ``denoiser`` to each of ``channels`` channels."""
    if channels == 1:
        return denoiser

    def apply(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return denoiser(x.reshape(b * c, 1, h, w)).reshape(b, c, h, w)  # (B, C, H, W)

    return apply


# rows: an orthonormal basis of R^3: luminance (R + G + B) / sqrt 3, red-green (R - G) / sqrt 2, yellow-blue (R + G - 2B) / sqrt 6
OPPONENT = torch.tensor([[3**-0.5, 3**-0.5, 3**-0.5], [2**-0.5, -(2**-0.5), 0.0], [6**-0.5, 6**-0.5, -2 * 6**-0.5]], dtype=torch.float64)
# per opponent channel u_c = w_c / s_c + t_c, so that an RGB image in [0, 1]^3 maps near [0, 1] (the range D was trained on):
# luminance / sqrt 3 is the mean of R, G, B; the chroma axes, in [-0.82, 0.82], are centred on 1/2
_OPP_SCALE = (3**0.5, 1.0, 1.0)
_OPP_SHIFT = (0.0, 0.5, 0.5)


def opponent_colour(denoiser: nn.Module):
    """``x -> Q^T a^{-1}(D(a(Q x)))`` on ``(B, 3, H, W)``: the 1-channel ``denoiser`` ``D`` applied channel by channel in the
    opponent basis ``Q`` (:data:`OPPONENT`, orthogonal) after the per-channel affine map ``a_c(w) = w / s_c + t_c``.

    Why it keeps ``D``'s certificate: with ``T`` this map, ``|T x - T y| = |S (D u - D v)|`` and
    ``|(I - T) x - (I - T) y| = |S ((I - D) u - (I - D) v)|``, ``|x - y| = |S (u - v)|`` (``u = a(Q x)``, ``v = a(Q y)``, ``S``
    the diagonal of the ``s_c``): each channel's averagedness inequality is multiplied by ``s_c^2`` on both sides, so ``T`` is
    ``alpha``-averaged (or non-expansive) whenever ``D`` is. Why the basis: Gaussian noise stays white and of the same level
    in an orthonormal basis, while the chroma channels carry less detail than R, G, B (they are smoother), and the luminance
    channel's noise is divided by ``sqrt 3`` by the scaling.
    """
    if not callable(denoiser):
        fail("denoiser", "a callable 1-channel denoiser (an nn.Module)", type(denoiser).__name__)

    def apply(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            fail("x", "an RGB batch (B, 3, H, W)", f"shape {tuple(x.shape)}")
        q = OPPONENT.to(x)
        scale = torch.tensor(_OPP_SCALE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        shift = torch.tensor(_OPP_SHIFT, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        u = torch.einsum("dc,bchw->bdhw", q, x) / scale + shift  # (B, 3, H, W) opponent channels near [0, 1]
        d = channelwise(denoiser, 3)(u)
        return torch.einsum("dc,bdhw->bchw", q, (d - shift) * scale)  # back: Q^T S (D u - t)

    return apply


def resolve_denoiser(model: nn.Module | str | os.PathLike | None) -> nn.Module:
    """``model`` itself, the checkpoint at that path, or (``None``) the one at :func:`default_denoiser_path`;
    the error names the commands that make one when there is none."""
    if model is None:
        path = default_denoiser_path()
        if not path.is_file():
            fail("model", "a denoiser checkpoint (none given, and none at the default "
                 f"{str(path)!r}); make one with `proxnets reproduce stable --size quick` (trains it, ~2-5 min on CPU) or "
                 "pass --train to train a small one now (~30 s)", "nothing", FileNotFoundError)
        model = path
    return _resolve_model(model)


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
    "averaged_margin": (float, 0.0, 1.0, "or None"), "schedule": (str, None), "max_steps": (int, 1, 10_000),
    "stiffness_budget": (float, 0.0, 1e6, "or None"), "norm_size": (str, ("input", "any")),
    "train_norm": (str, TRAIN_NORMS),
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


def _check_channels(x: torch.Tensor, model: nn.Module, path: Any):
    """The denoiser to apply to ``x``: ``model``, or ``model`` channel by channel (a grey model on colour)."""
    want = getattr(model, "in_channels", None)
    if want is None or x.shape[1] == want:
        return model
    if want == 1:
        return channelwise(model, x.shape[1])
    fail("path_in", f"an image with {want} channel(s) for this model", f"{str(path)!r} with {x.shape[1]}")


def denoise_image(
    path_in: str | os.PathLike,
    model: nn.Module | str | os.PathLike,
    path_out: str | os.PathLike,
    *,
    add_noise: float | None = None,
    strength: float = DENOISE_STRENGTH,
    seed: int = 0,
) -> dict[str, float]:
    """Denoise the PNG ``path_in`` with ``model`` (a module or a checkpoint) into ``path_out``.

    ``add_noise = sigma`` first corrupts the (clean) input with Gaussian noise of that standard
    deviation and reports PSNR/SSIM of the noisy and denoised images against it. ``strength`` in (0, 1]:
    ``(1 - strength) y + strength D(y)`` (module docstring); ``model=None``: :func:`resolve_denoiser`.
    Returns ``{"height", "width", "channels", "strength"}`` plus those metrics when simulated.
    """
    model = resolve_denoiser(model)
    clean = read_image(path_in)[None]  # (1, C, H, W)
    den = relax_denoiser(_check_channels(clean, model, path_in), check_number("strength", strength, low=0.0, high=1.0,
                                                                               low_inclusive=False))
    out: dict[str, float] = {"height": clean.shape[2], "width": clean.shape[3], "channels": clean.shape[1], "strength": strength}
    y = clean
    if add_noise is not None:
        sigma = check_number("add_noise", add_noise, low=0.0)
        g = torch.Generator().manual_seed(seed)
        y = clean + sigma * torch.randn(clean.shape, generator=g)
    with torch.no_grad():
        x = den(y)
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
    strength: float = DEBLUR_STRENGTH,
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
    ``"fbs"`` (``gamma < 2/|A|^2``, default ``1/|A|^2``), ``"drs"`` or ``"admm"`` (default ``gamma = 1``; they need a
    firmly non-expansive ``D_theta``: ``theta alpha <= 1/2``, refused otherwise when the model reports ``alpha``).
    ``strength = theta`` (module docstring); ``model=None``: :func:`resolve_denoiser`.
    ``simulate=True`` treats the input as the clean image: it is blurred, ``noise`` added, restored,
    and PSNR/SSIM are reported against it. Returns the solver's summary (iterations, converged,
    diverged, stop_reason, inner_unconverged, final residual, psnr).
    """
    check_choice("kernel", kernel, KERNELS)
    check_choice("algorithm", algorithm, list(SOLVERS))
    model = resolve_denoiser(model)
    img = read_image(path_in)[None]  # (1, C, H, W)
    check_number("strength", strength, low=0.0, high=1.0, low_inclusive=False)
    den = relax_denoiser(_check_channels(img, model, path_in), strength)
    alpha = model.averagedness() if hasattr(model, "averagedness") else None
    if algorithm != "fbs" and alpha is not None and strength * alpha > 0.5 + 1e-12:
        fail("strength", f"a strength <= 1 / (2 alpha) = {0.5 / alpha:.4g} for {algorithm} (it needs a firmly non-expansive "
             f"denoiser; this one is {alpha:.4g}-averaged)", strength)
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
    x, info = SOLVERS[algorithm](y, physics, den, **options)
    write_image(path_out, x[0].clamp(0, 1))
    summary: dict[str, Any] = {"iterations": info.iterations, "converged": info.converged, "diverged": info.diverged,
                               "stop_reason": info.stop_reason, "inner_unconverged": info.inner_unconverged,
                               "gamma": info.gamma, "strength": strength, "averagedness": alpha,
                               "final_residual": info.residuals[-1] if info.residuals else None}
    if simulate:
        summary.update(psnr_blurred=psnr(y.clamp(0, 1), img) if boundary == "circular" else None,
                       psnr_restored=info.psnr[-1], ssim_restored=info.ssim[-1])
    return summary
