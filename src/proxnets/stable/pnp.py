"""Plug-and-Play algorithms: any denoiser ``D`` in place of a proximal operator.

Data term ``f(x) = |A x - y|^2 / 2`` from a physics object (:mod:`proxnets.stable.physics`);
prior = the denoiser, a callable ``(B, C, H, W) -> (B, C, H, W)``; the algorithms know neither
the denoiser's internals nor the physics' (DeepInverse's split).

- Forward-backward (:func:`pnp_fbs`): ``x_{k+1} = D(x_k - gamma A^T (A x_k - y))``. ``grad f`` is
  ``|A|^2``-Lipschitz, so the gradient step is averaged for ``0 < gamma < 2 / |A|^2``; with ``D``
  averaged the composition is averaged and the iterates converge to a fixed point when one exists
  (Krasnosel'skii-Mann). Larger ``gamma`` is refused.
- Douglas-Rachford (:func:`pnp_drs`): ``x_k = prox_{gamma f}(z_k)``, ``u_k = D(2 x_k - z_k)``,
  ``z_{k+1} = z_k + u_k - x_k``. Converges when ``2 D - I`` is non-expansive, i.e. ``D`` firmly
  non-expansive (``alpha <= 1/2``); an ``alpha``-averaged ``D`` is made so by
  :func:`firmly_nonexpansive` (``(1 - theta) I + theta D`` is ``theta alpha``-averaged).
- ADMM (:func:`pnp_admm`): ``x = prox_{gamma f}(v - w)``, ``v = D(x + w)``, ``w = w + x - v``
  (DRS applied to the splitting in the other order).

Every solver returns ``(x, info)``; :class:`PnPInfo` traces the fixed-point residual

    r_k = |s_{k+1} - s_k| / |s_0|        (s: x for FBS, z for DRS, (v, w) for ADMM)

which is nonincreasing for averaged iterations, plus PSNR/SSIM against ``x_true`` when given.
Iterations stop when ``r_k <= tol``; otherwise ``policy`` decides (warn by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from skimage.metrics import structural_similarity

from proxnets.utils.convergence import IterInfo, handle_nonconvergence
from proxnets.utils.validation import check_int, check_number, check_tensor, fail

__all__ = ["PnPInfo", "pnp_fbs", "pnp_drs", "pnp_admm", "firmly_nonexpansive", "relax_denoiser", "psnr", "ssim", "SOLVERS"]

Denoiser = Callable[[torch.Tensor], torch.Tensor]


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """``10 log10(data_range^2 / mean((x - ref)^2))`` over the whole batch (dB)."""
    mse = float(((x - ref) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * float(np.log10(data_range**2 / mse))


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean structural similarity (Wang et al. 2004, scikit-image) over the batch of ``(B, C, H, W)``."""
    a, b = x.detach().cpu().double().numpy(), ref.detach().cpu().double().numpy()
    vals = [structural_similarity(ai, bi, data_range=data_range, channel_axis=0) for ai, bi in zip(a, b)]
    return float(np.mean(vals))


@dataclasses.dataclass
class PnPInfo(IterInfo):
    """Per-iteration traces of a PnP solver.

    ``residuals[k]``: ``|s_{k+1} - s_k| / |s_0|`` (module docstring); ``psnr[k]``, ``ssim[k]``: of the
    current estimate against ``x_true`` (empty without it); ``gamma``: the step used;
    ``step_bound``: the admissible bound on ``gamma`` (FBS: ``2 / |A|^2``; inf otherwise).
    """

    psnr: list[float] = dataclasses.field(default_factory=list)
    ssim: list[float] = dataclasses.field(default_factory=list)
    gamma: float = 0.0
    step_bound: float = float("inf")


def relax_denoiser(denoiser: Denoiser, theta: float) -> Denoiser:
    """``D_theta = (1 - theta) I + theta D``: a weaker denoiser, ``theta alpha``-averaged when ``D`` is ``alpha``-averaged."""
    check_number("theta", theta, low=0.0, high=1.0, low_inclusive=False)
    return lambda x: (1.0 - theta) * x + theta * denoiser(x)


def firmly_nonexpansive(denoiser: Denoiser, alpha: float) -> Denoiser:
    """``D_theta`` with ``theta = min(1, 1 / (2 alpha))``: 1/2-averaged when ``D`` is ``alpha``-averaged."""
    check_number("alpha", alpha, low=0.0, high=1.0, low_inclusive=False)
    return relax_denoiser(denoiser, min(1.0, 1.0 / (2.0 * alpha)))


def _apply(denoiser: Denoiser, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = denoiser(x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        fail("denoiser", f"a map returning a tensor of the input shape {tuple(x.shape)}", getattr(out, "shape", type(out).__name__))
    return out


def _record(info: PnPInfo, x: torch.Tensor, x_true: torch.Tensor | None, with_ssim: bool) -> None:
    if x_true is not None:
        info.psnr.append(psnr(x, x_true))
        if with_ssim:
            info.ssim.append(ssim(x, x_true))


def _check_common(y, x_true, max_iter, tol, policy):
    check_tensor("y", y, ndim=4)
    if x_true is not None:
        check_tensor("x_true", x_true, ndim=4)
    check_int("max_iter", max_iter, low=1)
    check_number("tol", tol, low=0.0)
    if policy not in ("ignore", "warn", "raise"):
        fail("policy", "one of ['ignore', 'warn', 'raise']", policy)


def _fixed_point_loop(step, state, scale: float, info: PnPInfo, x_true, with_ssim: bool, max_iter: int, tol: float,
                      policy: str, what: str) -> tuple[torch.Tensor, PnPInfo]:
    """Iterate ``state, estimate, |s_{k+1} - s_k| = step(state)`` until the scaled residual is ``<= tol``."""
    estimate = None
    for k in range(max_iter):
        state, estimate, diff = step(state)
        info.residuals.append(diff / scale)
        info.iterations = k + 1
        _record(info, estimate, x_true, with_ssim)
        if info.residuals[-1] <= tol:
            info.converged = True
            break
    handle_nonconvergence(info, policy, what)
    return estimate, info


def _start(y: torch.Tensor, physics, x0: torch.Tensor | None) -> torch.Tensor:
    return physics.A_adjoint(y) if x0 is None else check_tensor("x0", x0, ndim=4).clone()


def pnp_fbs(
    y: torch.Tensor,
    physics,
    denoiser: Denoiser,
    *,
    gamma: float | None = None,
    x0: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    x_true: torch.Tensor | None = None,
    with_ssim: bool = True,
    policy: str = "warn",
) -> tuple[torch.Tensor, PnPInfo]:
    """Forward-backward PnP; ``gamma`` in ``(0, 2 / |A|^2)`` (default ``1 / |A|^2``); ``x0`` default ``A^T y``."""
    _check_common(y, x_true, max_iter, tol, policy)
    x = _start(y, physics, x0)
    norm2 = physics.norm(tuple(x.shape[1:])) ** 2
    bound = 2.0 / norm2
    gamma = check_number("gamma", 1.0 / norm2 if gamma is None else gamma)
    if not 0.0 < gamma < bound:
        fail("gamma", f"a step in (0, 2/|A|^2 = {bound:.6g})", gamma)

    def step(x):
        x_new = _apply(denoiser, x - gamma * physics.A_adjoint(physics.A(x) - y))
        return x_new, x_new, float((x_new - x).norm())

    info = PnPInfo(gamma=gamma, step_bound=bound)
    return _fixed_point_loop(step, x, float(x.norm()) or 1.0, info, x_true, with_ssim, max_iter, tol, policy, "PnP forward-backward")


def pnp_drs(
    y: torch.Tensor,
    physics,
    denoiser: Denoiser,
    *,
    gamma: float = 1.0,
    x0: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    x_true: torch.Tensor | None = None,
    with_ssim: bool = True,
    policy: str = "warn",
) -> tuple[torch.Tensor, PnPInfo]:
    """Douglas-Rachford PnP (module docstring); returns the denoised iterate ``u``."""
    _check_common(y, x_true, max_iter, tol, policy)
    gamma = check_number("gamma", gamma, low=0.0, low_inclusive=False)
    z = _start(y, physics, x0)

    def step(z):
        x = physics.prox_data(z, y, gamma)
        u = _apply(denoiser, 2 * x - z)
        return z + u - x, u, float((u - x).norm())  # z_{k+1} - z_k = u - x

    return _fixed_point_loop(step, z, float(z.norm()) or 1.0, PnPInfo(gamma=gamma), x_true, with_ssim, max_iter, tol, policy,
                             "PnP Douglas-Rachford")


def pnp_admm(
    y: torch.Tensor,
    physics,
    denoiser: Denoiser,
    *,
    gamma: float = 1.0,
    x0: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    x_true: torch.Tensor | None = None,
    with_ssim: bool = True,
    policy: str = "warn",
) -> tuple[torch.Tensor, PnPInfo]:
    """ADMM PnP (module docstring); returns ``v`` (the denoiser's output)."""
    _check_common(y, x_true, max_iter, tol, policy)
    gamma = check_number("gamma", gamma, low=0.0, low_inclusive=False)
    v = _start(y, physics, x0)

    def step(state):
        v, w = state
        x = physics.prox_data(v - w, y, gamma)
        v_new = _apply(denoiser, x + w)
        w_new = w + x - v_new
        return (v_new, w_new), v_new, float(torch.sqrt((v_new - v).norm() ** 2 + (w_new - w).norm() ** 2))

    return _fixed_point_loop(step, (v, torch.zeros_like(v)), float(v.norm()) or 1.0, PnPInfo(gamma=gamma), x_true, with_ssim,
                             max_iter, tol, policy, "PnP ADMM")


SOLVERS = {"fbs": pnp_fbs, "drs": pnp_drs, "admm": pnp_admm}
