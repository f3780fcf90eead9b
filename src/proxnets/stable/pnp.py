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

Each algorithm is a fixed-point map ``s -> S(s)`` of its state (``x`` for FBS, ``z`` for DRS, ``(v, w)``
stacked for ADMM) handed to the shared :func:`proxnets.solvers.fixed_point`, so the residual and the
stopping rules are those of every solver of the project: per sample

    r_k = |S(s_k) - s_k| / max(|S(s_k)|, |s_k|, 1e-9)

(``info.residuals``; the absolute steps ``|s_{k+1} - s_k|``, non-increasing for averaged iterations, are
``info.abs_residuals``), a run stops as converged when ``r_k <= tol``, and as diverged (not converged)
when an iterate is not finite or the step grows 10^4-fold past its smallest (``info.diverged``,
``info.stop_reason``). The solver's callback records PSNR/SSIM of the current estimate against
``x_true`` when given. Non-convergence goes through ``policy`` (warn by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from skimage.metrics import structural_similarity

from proxnets.solvers import SolverInfo, fixed_point
from proxnets.utils.convergence import POLICIES, handle_nonconvergence
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor, fail

__all__ = ["PnPInfo", "pnp_fbs", "pnp_drs", "pnp_admm", "firmly_nonexpansive", "relax_denoiser", "psnr", "ssim", "SOLVERS"]

Denoiser = Callable[[torch.Tensor], torch.Tensor]


def _check_pair(x: torch.Tensor, ref: torch.Tensor, data_range: float) -> None:
    check_tensor("x", x, ndim=(2, 3, 4), nonempty=True)  # the mean over no pixels is NaN
    check_tensor("ref", ref, shape=tuple(x.shape), like=x)
    check_number("data_range", data_range, low=0.0, low_inclusive=False)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """``10 log10(data_range^2 / mean((x - ref)^2))`` over the whole batch (dB); ``inf`` when equal."""
    _check_pair(x, ref, data_range)
    mse = float(((x - ref) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * float(np.log10(data_range**2 / mse))


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean structural similarity (Wang et al. 2004, scikit-image) over the batch of ``(B, C, H, W)``."""
    _check_pair(x, ref, data_range)
    if x.ndim != 4:
        fail("x", "a batch (B, C, H, W)", f"shape {tuple(x.shape)}")
    a, b = x.detach().cpu().double().numpy(), ref.detach().cpu().double().numpy()
    vals = [structural_similarity(ai, bi, data_range=data_range, channel_axis=0) for ai, bi in zip(a, b)]
    return float(np.mean(vals))


@dataclasses.dataclass
class PnPInfo(SolverInfo):
    """What a PnP run reports: every field of :class:`proxnets.solvers.SolverInfo` (``iterations``,
    ``converged``, ``residuals``, ``abs_residuals``, ``diverged``, ``stop_reason``, ...; module docstring),
    plus ``psnr[k]``, ``ssim[k]``: of the k-th estimate against ``x_true`` (one per checked iteration with a
    finite estimate; empty without ``x_true``; SSIM only
    with ``with_ssim``); ``gamma``: the step used; ``step_bound``: the admissible bound on ``gamma``
    (FBS: ``2 / |A|^2``; inf otherwise); ``inner_unconverged``: inner solves that missed their tolerance during
    the run: the data prox's (the conjugate gradients of :class:`proxnets.stable.physics.Blur` with
    ``boundary="valid"``) plus the denoiser's when it counts its own in ``denoiser.inner_unconverged`` (the TV prox
    :class:`proxnets.stable.tv.TVProx`); 0 for exact maps. A result resting on them is not exact.
    """

    psnr: list[float] = dataclasses.field(default_factory=list)
    ssim: list[float] = dataclasses.field(default_factory=list)
    gamma: float = 0.0
    step_bound: float = float("inf")
    inner_unconverged: int = 0


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


def _check_common(y, x_true, max_iter, tol, policy):
    check_tensor("y", y, ndim=4)
    if x_true is not None:
        check_tensor("x_true", x_true, ndim=4)
    check_int("max_iter", max_iter, low=1)
    check_number("tol", tol, low=0.0)
    check_choice("policy", policy, POLICIES)


def _run(S, s0: torch.Tensor, physics, denoiser, estimate, x_true, with_ssim: bool, max_iter: int, tol: float, policy: str, what: str,
         **fields) -> tuple[torch.Tensor, PnPInfo]:
    """Iterate the map ``S`` from ``s0`` with the shared solver; ``estimate(s_new)`` is the image the
    algorithm reports for the state ``s_new = S(s)`` (read right after that evaluation)."""
    traces: dict[str, list[float]] = {"psnr": [], "ssim": []}

    def record(k: int, s_new: torch.Tensor, info) -> None:
        if x_true is not None:
            x = estimate(s_new)
            traces["psnr"].append(psnr(x, x_true))
            if with_ssim:
                traces["ssim"].append(ssim(x, x_true))

    def failures() -> int:  # inner solves that missed their tolerance so far: the data prox's and the denoiser's
        return getattr(physics, "cg_unconverged", 0) + getattr(denoiser, "inner_unconverged", 0)

    failed_before = failures()
    with torch.no_grad():
        s, base = fixed_point(S, s0, tol=tol, max_iter=max_iter, callback=record)
    info = PnPInfo(**{f.name: getattr(base, f.name) for f in dataclasses.fields(SolverInfo)}, **traces, **fields,
                   inner_unconverged=failures() - failed_before)
    handle_nonconvergence(info, policy, what)
    return estimate(s), info


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

    def S(x: torch.Tensor) -> torch.Tensor:  # x_{k+1} = D(x_k - gamma A^T (A x_k - y))
        return _apply(denoiser, x - gamma * physics.A_adjoint(physics.A(x) - y))

    return _run(S, x, physics, denoiser, lambda x: x, x_true, with_ssim, max_iter, tol, policy, "PnP forward-backward", gamma=gamma,
                step_bound=bound)


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

    last: dict[str, torch.Tensor] = {}  # the latest evaluation of S: its output and its estimate u

    def S(z: torch.Tensor) -> torch.Tensor:  # z_{k+1} = z_k + u_k - x_k
        x = physics.prox_data(z, y, gamma)
        u = last["u"] = _apply(denoiser, 2 * x - z)
        out = last["z"] = z + u - x
        return out

    def estimate(s: torch.Tensor) -> torch.Tensor:
        # u of the evaluation that produced s; x = prox(s) when the solver handed back an earlier
        # (finite) state after a non-finite evaluation
        return last["u"] if s is last.get("z") else physics.prox_data(s, y, gamma)

    return _run(S, z, physics, denoiser, estimate, x_true, with_ssim, max_iter, tol, policy, "PnP Douglas-Rachford", gamma=gamma)


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

    def S(state: torch.Tensor) -> torch.Tensor:  # state (B, 2, C, H, W) = (v, w) stacked
        v, w = state[:, 0], state[:, 1]
        x = physics.prox_data(v - w, y, gamma)
        v_new = _apply(denoiser, x + w)
        return torch.stack([v_new, w + x - v_new], dim=1)

    state = torch.stack([v, torch.zeros_like(v)], dim=1)
    return _run(S, state, physics, denoiser, lambda s: s[:, 0], x_true, with_ssim, max_iter, tol, policy, "PnP ADMM", gamma=gamma)


SOLVERS = {"fbs": pnp_fbs, "drs": pnp_drs, "admm": pnp_admm}
