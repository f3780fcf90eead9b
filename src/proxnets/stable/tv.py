"""Total-variation denoising (ROF), the classical baseline of the denoising comparison.

Problem, per image ``y`` of a batch ``(B, C, H, W)``:

    P(x) = 1/2 |x - y|^2 + lam TV(x),   TV(x) = sum_{c,i,j} |(grad x)_{c,i,j}|_2          (channel by channel)
                                        TV_v(x) = sum_{i,j} |(grad x)_{:,i,j}|_F          (vectorial=True)

with forward differences and Neumann boundary (the difference past the last row/column is 0), i.e. the
isotropic TV of Rudin, Osher & Fatemi (1992). The default treats channels independently (the sum of the
channels' TVs); ``vectorial=True`` is the colour TV of Blomgren & Chan (1998) / Bresson & Chan (2008): at each pixel
the Frobenius norm of the ``C x 2`` Jacobian, so one edge shared by the channels is paid for once
(``TV_v <= TV``, equal for one channel; ``TV_v(u, u, u) = sqrt(3) TV(u)``). Its dual, with ``div = -grad^T``, is

    D(p) = 1/2 (|y|^2 - |y + div p|^2),   |p_{c,i,j}|_2 <= lam   (vectorial: |p_{:,i,j}|_F <= lam),

and ``P(x) >= P(x*) >= D(p)`` for every ``x`` and every feasible ``p`` (weak duality). Since ``P`` is
1-strongly convex, ``1/2 |x - x*|^2 <= P(x) - P(x*) <= gap(x, p) = P(x) - D(p)``: the gap gives the proved
bound ``|x - x*| <= sqrt(2 gap)`` on the distance to the exact minimizer. That bound, relative to ``|x|``,
is the residual of the run and its convergence certificate. At each check it is evaluated for the primal
iterate ``x`` and for the dual's primal point ``y + div p`` (the minimizer of the Lagrangian at ``p``, exact
once ``p`` is optimal), and the image returned is the one whose gap is smaller. The gap is computed in float64
with a round-off slack ``4 n eps (sum of the magnitudes it is computed from)`` added, so the bound cannot be
below ~``sqrt(n) 1e-8`` relative: tolerances near that are unreachable (the run then ends at ``max_iter``).

Solver: Chambolle & Pock (2011), Algorithm 2 (accelerated for the 1-strongly convex data term), with
``K = grad``, ``|K|^2 <= 8``, ``tau_0 sigma_0 |K|^2 <= 1``:

    p    <- proj_{|p|<=lam}(p + sigma grad xbar)
    x'   <- (x + tau div p + tau y) / (1 + tau)
    theta = 1 / sqrt(1 + 2 tau),  tau <- theta tau,  sigma <- sigma / theta
    xbar <- x' + theta (x' - x)

It is run in float64 (the gap is a difference of two near-equal numbers) and the result is cast back to the
dtype of ``y``; the bound reported includes that rounding (``+ u``, the dtype's unit round-off).

The certificate does not depend on where the iteration starts, so a dual ``p0`` may warm-start it:
:class:`TVProx` (``prox_{lam TV}`` as a Plug-and-Play denoiser) starts each solve from the previous one's dual
and counts the solves that missed their tolerance (``inner_unconverged``, which :mod:`proxnets.stable.pnp` reports).
"""

from __future__ import annotations

import math

import torch

from proxnets.solvers import FLOOR, SolverInfo
from proxnets.utils.convergence import handle_nonconvergence
from proxnets.utils.validation import check_int, check_number, check_tensor

__all__ = ["tv_gradient", "tv_divergence", "total_variation", "tv_dual_gap", "tv_denoise", "TVProx"]

GRAD_NORM_SQ = 8.0  # |grad|^2 <= 8 for forward differences in 2-D (4 per axis)


def tv_gradient(x: torch.Tensor) -> torch.Tensor:
    """Forward differences with Neumann boundary: ``(B, C, H, W) -> (B, C, 2, H, W)`` (vertical, horizontal)."""
    g = x.new_zeros(*x.shape[:2], 2, *x.shape[2:])
    g[:, :, 0, :-1] = x[:, :, 1:] - x[:, :, :-1]
    g[:, :, 1, :, :-1] = x[:, :, :, 1:] - x[:, :, :, :-1]
    return g


def tv_divergence(p: torch.Tensor) -> torch.Tensor:
    """``div = -grad^T``: ``(B, C, 2, H, W) -> (B, C, H, W)`` (the exact negative adjoint of :func:`tv_gradient`)."""
    pv, ph = p[:, :, 0], p[:, :, 1]
    d = torch.zeros_like(pv)
    d[:, :, :-1] += pv[:, :, :-1]
    d[:, :, 1:] -= pv[:, :, :-1]
    d[:, :, :, :-1] += ph[:, :, :, :-1]
    d[:, :, :, 1:] -= ph[:, :, :, :-1]
    return d


def _dims(vectorial: bool) -> tuple[int, ...]:
    # the pointwise norm of (B, C, 2, H, W): over the 2 directions, or over channels and directions (vectorial)
    return (1, 2) if vectorial else (2,)


def total_variation(x: torch.Tensor, vectorial: bool = False) -> torch.Tensor:
    """Isotropic TV per image: ``sum |grad x|_2`` over channels and pixels, or (``vectorial``) ``sum_{i,j} |grad x_{:,i,j}|_F``:
    shape ``(B,)``."""
    check_tensor("x", x, ndim=4, finite=False)
    return torch.linalg.vector_norm(tv_gradient(x), dim=_dims(vectorial)).flatten(1).sum(1)


def _project(p: torch.Tensor, lam: float, vectorial: bool = False) -> torch.Tensor:
    if lam <= 0:  # the ball is {0} (and lam / |p| would be 0 / 0)
        return torch.zeros_like(p)
    n = torch.linalg.vector_norm(p, dim=_dims(vectorial), keepdim=True)
    return p * (lam / n.clamp_min(lam))


def _feasible(p: torch.Tensor, lam: float, vectorial: bool = False) -> torch.Tensor:
    # shrunk by a few ulps so that round-off in the projection cannot leave p outside the ball
    return _project(p, lam, vectorial) * (1.0 - 8 * torch.finfo(torch.float64).eps)


def _primal(x: torch.Tensor, y: torch.Tensor, lam: float, vectorial: bool = False) -> torch.Tensor:
    """``P(x)`` per image, ``(B,)``."""
    return 0.5 * (x - y).flatten(1).pow(2).sum(1) + lam * total_variation(x, vectorial)


def _dual(y: torch.Tensor, y_div: torch.Tensor) -> torch.Tensor:
    """``D(p)`` per image from ``y_div = y + div p`` (``p`` feasible), ``(B,)``."""
    return 0.5 * (y.flatten(1).pow(2).sum(1) - y_div.flatten(1).pow(2).sum(1))


def tv_dual_gap(x: torch.Tensor, p: torch.Tensor, y: torch.Tensor, lam: float, vectorial: bool = False) -> torch.Tensor:
    """``P(x) - D(p)`` per image, shape ``(B,)``, with ``p`` projected onto ``|p|_2 <= lam`` first (so the
    bound holds for any ``p``); float64 inside. Nonnegative up to round-off, 0 only at the solution pair."""
    check_tensor("y", y, ndim=4)
    check_tensor("x", x, shape=tuple(y.shape))
    check_tensor("p", p, shape=(*y.shape[:2], 2, *y.shape[2:]))
    lam = check_number("lam", lam, low=0.0)
    x, p, y = x.double(), p.double(), y.double()
    return _primal(x, y, lam, vectorial) - _dual(y, y + tv_divergence(_feasible(p, lam, vectorial)))


def tv_denoise(y: torch.Tensor, lam: float, *, tol: float = 1e-3, max_iter: int = 2000, check_every: int = 10,
               policy: str = "warn", vectorial: bool = False) -> tuple[torch.Tensor, SolverInfo]:
    """Minimize ``1/2 |x - y|^2 + lam TV(x)`` per image of ``y`` ``(B, C, H, W)`` (module docstring).

    Stops as converged when, for every image, the proved distance bound ``sqrt(2 gap) / max(|x|, FLOOR) <= tol``
    (``|x - x*| <= tol |x|``, checked every ``check_every`` iterations). ``info.residuals``: that bound (max over
    the batch) per check; ``info.abs_residuals``: ``max_i sqrt(2 gap_i)``; ``info.objectives``: mean of
    ``P(x)``; ``info.final_residual``: per image. A non-finite iterate ends the run (``"nonfinite"``,
    ``diverged``), returning the last finite iterate; ``"max_iter"`` ends it as not converged.
    ``vectorial``: the colour TV ``TV_v`` (module docstring).
    """
    x, _, info = _solve(y, lam, tol=tol, max_iter=max_iter, check_every=check_every, vectorial=vectorial)
    handle_nonconvergence(info, policy, "tv_denoise")
    return x, info


def _solve(y: torch.Tensor, lam: float, *, tol: float, max_iter: int, check_every: int, vectorial: bool,
           p0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, SolverInfo]:
    """:func:`tv_denoise` from the dual ``p0`` (default 0); returns ``(x, p, info)`` (``p``: the last dual, float64)."""
    check_tensor("y", y, ndim=4, nonempty=True)
    lam = check_number("lam", lam, low=0.0)
    tol = check_number("tol", tol, low=0.0)
    check_int("max_iter", max_iter, low=1)
    check_int("check_every", check_every, low=1)
    info = SolverInfo(solver="tv_chambolle_pock", tol=tol)
    y64 = y.detach().double()
    x = y64.clone()
    xbar = x.clone()
    p = torch.zeros(*y.shape[:2], 2, *y.shape[2:], dtype=torch.float64, device=y.device) if p0 is None else \
        _project(p0.to(torch.float64), lam, vectorial)
    tau = sigma = 1.0 / math.sqrt(GRAD_NORM_SQ)
    best = x.clone()
    k = 0
    while k < max_iter:
        k += 1
        p = _project(p + sigma * tv_gradient(xbar), lam, vectorial)
        x_new = (x + tau * tv_divergence(p) + tau * y64) / (1.0 + tau)
        theta = 1.0 / math.sqrt(1.0 + 2.0 * tau)
        tau, sigma = theta * tau, sigma / theta
        xbar = x_new + theta * (x_new - x)
        x = x_new
        if k % check_every and k < max_iter:
            continue
        if not (torch.isfinite(x).all() and torch.isfinite(p).all()):
            info.stop_reason, info.diverged = "nonfinite", True
            break
        # two certified candidates: the primal iterate and the dual's own primal point y + div p (exact once p is);
        # per image the one with the smaller gap is kept
        x_dual = y64 + tv_divergence(p)
        dual = _dual(y64, y64 + tv_divergence(_feasible(p, lam, vectorial)))
        primal_p, primal_d = _primal(x, y64, lam, vectorial), _primal(x_dual, y64, lam, vectorial)
        gap_p, gap_d = primal_p - dual, primal_d - dual
        use_dual = gap_d < gap_p
        cand = torch.where(use_dual.view(-1, 1, 1, 1), x_dual, x)
        primal = torch.where(use_dual, primal_d, primal_p)
        gap = torch.minimum(gap_p, gap_d)
        # the float64 gap is a difference of sums of n ~ numel terms: its round-off is below n eps (sum of magnitudes)
        # (recursive summation bound, with a factor 4 for the per-term operations); added so the bound stays a bound
        mags = primal + 0.5 * y64.flatten(1).pow(2).sum(1) + 0.5 * x_dual.flatten(1).pow(2).sum(1)
        slack = 4 * y64[0].numel() * torch.finfo(torch.float64).eps * mags
        dist = (gap + slack).clamp_min(0.0).mul(2.0).sqrt()
        # + the rounding of the returned image to y's dtype (|x_out - x| <= u |x| componentwise, u its unit round-off)
        rel = dist / torch.linalg.vector_norm(cand.flatten(1), dim=1).clamp_min(FLOOR) + torch.finfo(y.dtype).eps / 2
        if not (torch.isfinite(gap).all() and torch.isfinite(primal).all()):
            info.stop_reason, info.diverged = "nonfinite", True
            break
        best = cand
        info.iterations = k
        info.residuals.append(float(rel.max()))
        info.abs_residuals.append(float(dist.max()))
        info.objectives.append(float(primal.mean()))
        info.final_residual = rel.tolist()
        if info.residuals[-1] <= tol:
            info.stop_reason, info.converged = "tol", True
            break
    if not info.stop_reason:
        info.stop_reason = "max_iter"
    return best.to(y.dtype), p, info


class TVProx:
    """``v -> prox_{lam TV}(v) = argmin_x 1/2 |x - v|^2 + lam TV(x)``: a firmly non-expansive denoiser (a proximal map)
    for Plug-and-Play, each call solved by :func:`tv_denoise` to a certified relative distance ``tol`` from the exact
    prox (module docstring), warm-started from the previous call's dual when the shape repeats.

    Bookkeeping for the caller (PnP reports it): ``calls``, ``inner_unconverged`` (solves that ended without the
    certificate: ``max_iter`` or non-finite), ``worst_residual`` (the largest certified relative distance of any call),
    ``iterations`` (Chambolle-Pock iterations in all), ``last_info``.
    """

    def __init__(self, lam: float, *, tol: float = 1e-5, max_iter: int = 5000, check_every: int = 5, vectorial: bool = False,
                 warm_start: bool = True):
        self.lam = check_number("lam", lam, low=0.0)
        self.tol = check_number("tol", tol, low=0.0)
        self.max_iter = check_int("max_iter", max_iter, low=1)
        self.check_every = check_int("check_every", check_every, low=1)
        self.vectorial, self.warm_start = bool(vectorial), bool(warm_start)
        self.calls = self.inner_unconverged = self.iterations = 0
        self.worst_residual = 0.0
        self.last_info: SolverInfo | None = None
        self._p: torch.Tensor | None = None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        check_tensor("v", v, ndim=4, nonempty=True)  # named as the caller's argument, before _solve's own check of y
        p0 = self._p if self.warm_start and self._p is not None and self._p.shape[:2] == v.shape[:2] \
            and self._p.shape[3:] == v.shape[2:] else None
        x, p, info = _solve(v, self.lam, tol=self.tol, max_iter=self.max_iter, check_every=self.check_every,
                            vectorial=self.vectorial, p0=p0)
        self._p = p if bool(torch.isfinite(p).all()) else None
        self.calls += 1
        self.iterations += info.iterations
        self.last_info = info
        self.inner_unconverged += not info.converged
        self.worst_residual = max(self.worst_residual, info.residuals[-1] if info.residuals else math.inf)
        return x
