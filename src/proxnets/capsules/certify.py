"""The routing certificate of a capsule model, in the protocol of :mod:`proxnets.certificates`.

The model's own votes ``u_hat_ij = u_i W_ji`` (primary capsules of the images ``x``) are routed
again **in float64** with a trace, and the seed's theorem is checked on them (Ye, Li & Shen 2025:
routing is mirror descent with step 1 on the concave energy ``E(C) = - sum_j g(|s_j(C)|)`` over
couplings whose rows lie on the simplex):

- ``routing_couplings_feasible``: every coupling finite, every row on the simplex:
  ``max_{t,b,i} |sum_j c_ij - 1| <= 4 (N + 1) eps`` (the rounding of a softmax row of ``N (+ 1)``
  entries). A softmax over the wrong axis breaks it.
- ``routing_energy_increase``: ``max_{t,b} (E_b(C_{t+1}) - E_b(C_t)) / tol_b <= 1``, the seed's
  "energy never increases", every sample, every pass.
- ``routing_kl_decrease``: ``max_{t,b} (SKL_b[t] - (E_b(C_t) - E_b(C_{t+1}))) / tol_b <= 1`` where
  ``SKL[t] = KL(C_{t+1}||C_t) + KL(C_t||C_{t+1})`` (from the log-couplings): the mirror-descent bound
  ``E(C_{t+1}) <= E(C_t) - SKL[t]``, which concavity gives at every step.
- ``routing_kkt_gap`` (only with ``kkt_passes``): the Frank-Wolfe/KKT gap
  ``G(C) = sum_i [max_j a_ij - sum_j c_ij a_ij]`` (``a_ij = <u_hat_ij, v_j>``), zero exactly at the
  KKT points that the theorem says are the limits; after ``kkt_passes`` passes it must have fallen
  to ``kkt_ratio`` of its value at uniform couplings. Not rigorous: the theorem gives the limit, not
  a rate (a model with tiny votes moves slowly; an untrained CapsNet barely moves in 1000 passes).

**Bias and regularized routing.** A per-parent bias ``beta`` keeps ``E`` concave (``s_j`` stays affine in
``C``) and adds ``sum_j |beta_j|`` to ``S_b`` below. A regularized run (``b <- (1 - lambda tau) b + lambda a``)
is certified on ``F = E + tau sum c log c`` with its decrease bound ``(1/lambda - tau) KL(C_t+1||C_t) +
(1/lambda) KL(C_t||C_t+1)``, plus ``routing_strictly_convex`` (``max_b tau*_b / tau_b < 1``, the threshold of
:func:`~proxnets.capsules.routing.convexity_threshold`) and ``routing_min_coupling`` (every coupling of every
pass above ``exp(-2 max |u_hat| / tau) / (N + 1)``). :func:`layer_certificate` certifies any
:class:`~proxnets.capsules.CapsuleLinear` on its inputs; :func:`certificate` a CapsNet on images.

**The round-off tolerance.** With ``S_b = sum_i max_j |u_hat_bij|`` (:meth:`Votes.vote_scale`, an
upper bound for factored votes), every ``|s_j| <= sum_i c_ij |u_hat_ij|`` sums to at most ``S_b``, so
``|E_b| <= S_b`` (``g(r) <= r``) and, since ``|v_j| < 1``, ``sum_ij |a_ij| <= S_b``. A float64 sum of
``M`` terms is wrong by at most ``M eps`` times the sum of their magnitudes (Higham's ``gamma_M``),
and ``g`` is 1-Lipschitz; the ``M * D`` products of ``s``, the ``N`` terms of ``E`` and the rounding of
the couplings (``N`` terms per row, multiplied by agreements summing to ``S_b``) each contribute at
most ``(M + D + N) eps S_b`` to ``E_b(C_t)`` and to ``E_b(C_{t+1})``; a factor 4 covers both values
and the second-order terms:

    tol_b = 8 (M + N + D) eps S_b,       eps = 2^-52.

For the reference CapsNet (``M = 1152, N = 10, D = 16``) that is ``2.1e-12 S_b``; the increases
caused by a wrong-sign update on a trained model are ``> 1e9`` times larger.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from proxnets.capsules.routing import RoutingInfo, convexity_threshold, dynamic_routing
from proxnets.capsules.votes import FactoredVotes, Votes
from proxnets.certificates import Certificate
from proxnets.utils.validation import check_int, check_number

__all__ = ["certificate", "layer_certificate", "routing_certificates", "energy_tolerance"]

_EPS64 = torch.finfo(torch.float64).eps


def energy_tolerance(votes: Votes, bias: torch.Tensor | None = None, tau: torch.Tensor | None = None) -> torch.Tensor:
    """``tol_b = 8 (M + N + D) eps (S_b + sum_j |beta_j|)`` per sample ``(B,)``: the float64 rounding bound of ``E``.

    A bias adds at most ``|beta_j|`` to every ``|s_j|`` (hence to ``|E|``). With the entropic weight ``tau``
    (regularized routing) the term ``tau sum_ij c_ij log c_ij`` of ``F`` adds ``8 (N + 1) eps tau M (log(N + 1)
    + 425)``: ``M`` rows of ``N + 1`` terms whose ``|log c|`` is at most the logit floor (425 in float64) plus
    ``log(N + 1)``.
    """
    scale = votes.vote_scale().double()
    if bias is not None:
        scale = scale + bias.double().norm(dim=-1).sum(-1)
    tol = 8 * (votes.children + votes.parents + votes.dim) * _EPS64 * scale
    if tau is not None:
        n1 = votes.parents + 1
        tol = tol + 8 * n1 * _EPS64 * tau.double() * votes.children * (math.log(n1) + 425.0)
    return tol


def _worst(x: torch.Tensor) -> float:
    """Max over all entries; NaN when any entry is not finite (so the certificate cannot hold)."""
    if x.numel() == 0:
        return 0.0
    return float(x.max()) if bool(torch.isfinite(x).all()) else float("nan")


def routing_certificates(votes: Votes, info: RoutingInfo, *, kkt_ratio: float | None = None,
                         bias: torch.Tensor | None = None) -> list[Certificate]:
    """The certificates of one traced float64 routing run (``info`` from ``dynamic_routing(votes, trace=True)``).

    ``bias``: the per-parent bias the run used (it enters the tolerance). With ``kkt_ratio`` the run is
    read as a long run and the KKT-gap certificate is added. A regularized run (``info.tau > 0``) is
    certified on its objective ``F = E + tau sum c log c`` with its own decrease bound, plus
    ``routing_strictly_convex`` (``tau* / tau < 1``) and ``routing_min_coupling`` (no polarization).
    """
    if info.energy is None:
        raise ValueError("info: expected the RoutingInfo of a traced run (trace=True), got one without traces")
    if votes.dtype != torch.float64:
        raise ValueError(f"votes: expected float64 votes (the tolerance is float64 rounding), got {votes.dtype}")
    T = info.iterations
    tau = info.tau.double() if info.tau is not None else torch.zeros(votes.batch, dtype=torch.float64)
    regularized = bool((tau > 0).any())
    tol = energy_tolerance(votes, bias, tau if regularized else None)  # (B,)
    e = (info.objective if info.objective is not None else info.energy).double()  # (T, B)
    e = torch.where(torch.isfinite(info.energy.double()), e, info.energy.double())  # a non-finite E never passes
    bound = info.decrease_bound if info.decrease_bound is not None else info.sym_kl
    finite = bool(torch.isfinite(e).all()) and bool(torch.isfinite(info.couplings).all())
    row_err = _worst(info.row_sum_error) if finite else float("nan")
    rise = (e[1:] - e[:-1]) / tol  # (T-1, B), > 0 is an increase
    decrease = e[:-1] - e[1:]
    kl_excess = (bound[: T - 1].double() - decrease) / tol
    summary = info.summary()
    per_pass = {k: summary[k] for k in ("energy", "objective", "kkt_gap", "sym_kl", "entropy") if k in summary}
    n_rise = int((rise > 1).sum()) if T > 1 else 0
    common: dict[str, Any] = {"passes": T, "samples": votes.batch, "tolerance_mean": float(tol.mean())}
    what = "F(C) = E(C) + tau sum c log c" if regularized else "E(C)"
    certs = [
        Certificate(
            "routing_couplings_feasible", row_err, 4 * (votes.parents + 1) * _EPS64,
            method="float64 re-routing: max_{t,b,i} |sum_j c_ij - 1| over every pass (NaN if any coupling "
                   "or energy is not finite)",
            details=common),
        Certificate(
            "routing_energy_increase", _worst(rise), 1.0,
            method=f"float64 re-routing: max_(t,b) of the increase of {what} per pass / tol_b, "
                   "tol_b = 8 (M + N + D) eps (S_b + sum_j |beta_j|) [+ the entropic term's rounding]",
            details={**common, "largest_increase": _worst(e[1:] - e[:-1]), "increases_above_tolerance": n_rise,
                     "per_pass_batch_mean": per_pass}),
        Certificate(
            "routing_kl_decrease", _worst(kl_excess), 1.0,
            method="float64 re-routing: max_{t,b} (bound_t - decrease_t) / tol_b, bound_t = (1/lambda - tau) "
                   "KL(C_t+1||C_t) + (1/lambda) KL(C_t||C_t+1) from log-couplings (the symmetric KL for standard "
                   "routing)",
            details={**common, "total_bound": float(bound[: T - 1].double().sum(0).mean()) if T > 1 else 0.0,
                     "total_decrease": float((e[0] - e[-1]).mean())}),
    ]
    if regularized:
        threshold = convexity_threshold(votes).double()  # (B,)
        certs.append(Certificate(
            "routing_strictly_convex", float((threshold / tau).max()), 1.0, op="<",
            method="max_b tau*_b / tau_b, tau* = (3 sqrt 3 / 8) max_j sum_i |u_hat_ij|^2 (the curvature bound of -E)",
            details={**common, "tau_mean": float(tau.mean()), "threshold_mean": float(threshold.mean())}))
        n_par = votes.parents + int(info.couplings.shape[-1] != votes.parents)
        lower = -2 * votes.vote_max().double() / tau - math.log(votes.parents + 1)  # (B,), log of the floor
        margin = info.min_log_coupling.double() - lower  # (T, B)
        slack = 1e-12 * (1 + lower.abs())  # rounding of log-softmax
        certs.append(Certificate(
            "routing_min_coupling", float((margin + slack).min()) if finite else float("nan"), 0.0, op=">=",
            method="min_(t,b) [min_ij log c_ij - log(exp(-2 max_ij |u_hat_ij| / tau) / (N + 1))]: no coupling of "
                   "any pass below the floor that regularized routing guarantees (no polarization)",
            details={**common, "min_log_coupling": float(info.min_log_coupling.min()), "floor_log_mean":
                     float(lower.mean()), "parents": n_par}))
    if kkt_ratio is not None:
        gap = info.kkt_gap.double()  # (T, B)
        ratio = float(gap[-1].mean() / gap[0].mean()) if finite else float("nan")
        certs.append(Certificate(
            "routing_kkt_gap", ratio, float(kkt_ratio), rigorous=False,
            why="the theorem proves that the limit is a KKT point, not a rate: the bound is a target for a finite run",
            method=f"float64 re-routing for {T} passes: batch-mean G(C_T) / G(C_1), G(C) = sum_i [max_j q_ij - "
                   "sum_j c_ij q_ij], q = a - tau log C",
            details={**common, "gap_first": float(gap[0].mean()), "gap_last": float(gap[-1].mean())}))
    return certs


def _routing_kwargs(layer: torch.nn.Module) -> dict[str, Any]:
    """The layer's routing options, in float64 (bias included), for the re-routing."""
    opts = dict(layer.routing_options())
    opts.pop("gradient", None)
    opts.pop("backend", None)  # certificates always re-route eager (traced), whatever the layer's backend
    if opts.get("bias") is not None:
        opts["bias"] = opts["bias"].double()
    return opts


@torch.no_grad()
def layer_certificate(
    layer: torch.nn.Module,
    u: torch.Tensor,
    passes: int | None = None,
    *,
    kkt_passes: int | None = None,
    kkt_ratio: float = 1e-2,
) -> list[Certificate]:
    """The routing certificates of a :class:`~proxnets.capsules.CapsuleLinear` on its child capsules ``u``.

    The layer's votes are routed again in float64 with its own options (bias, leaky and regularized
    routing, and the deliberately broken variant of the falsification tests, ``layer.broken``).
    ``passes`` defaults to the layer's routing passes (at least 2, so that a step is checked);
    ``kkt_passes`` adds a long run of that many passes and its KKT-gap certificate (``kkt_ratio``).
    """
    r = max(layer.iterations if passes is None else check_int("passes", passes, low=1), 2)
    if kkt_passes is not None:
        kkt_passes = check_int("kkt_passes", kkt_passes, low=2)
        check_number("kkt_ratio", kkt_ratio, low=0.0, low_inclusive=False)
    votes = FactoredVotes(u.detach().double(), layer.weight.detach().double())
    opts = _routing_kwargs(layer)
    _, info = dynamic_routing(votes, r, trace=True, **opts)
    certs = routing_certificates(votes, info, bias=opts["bias"])
    if kkt_passes is not None:
        _, long_info = dynamic_routing(votes, kkt_passes, trace=True, **opts)
        certs.append(routing_certificates(votes, long_info, kkt_ratio=kkt_ratio, bias=opts["bias"])[-1])
    return certs


@torch.no_grad()
def certificate(
    model: torch.nn.Module,
    x: torch.Tensor,
    passes: int | None = None,
    *,
    kkt_passes: int | None = None,
    kkt_ratio: float = 1e-2,
) -> list[Certificate]:
    """The routing certificates of a :class:`~proxnets.capsules.CapsNet` on images ``x``
    (:func:`layer_certificate` of its class-capsule layer on its primary capsules)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        u = model.primary_capsules(x.to(device))  # (B, M, d_in)
        return layer_certificate(model.classes, u, passes, kkt_passes=kkt_passes, kkt_ratio=kkt_ratio)
    finally:
        model.train(was_training)
