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

from typing import Any

import torch

from proxnets.capsules.routing import RoutingInfo, dynamic_routing
from proxnets.capsules.votes import FactoredVotes, Votes
from proxnets.certificates import Certificate
from proxnets.utils.validation import check_int, check_number

__all__ = ["certificate", "routing_certificates", "energy_tolerance"]

_EPS64 = torch.finfo(torch.float64).eps


def energy_tolerance(votes: Votes) -> torch.Tensor:
    """``tol_b = 8 (M + N + D) eps S_b`` per sample ``(B,)``: the float64 rounding bound of ``E``."""
    return 8 * (votes.children + votes.parents + votes.dim) * _EPS64 * votes.vote_scale().double()


def _worst(x: torch.Tensor) -> float:
    """Max over all entries; NaN when any entry is not finite (so the certificate cannot hold)."""
    if x.numel() == 0:
        return 0.0
    return float(x.max()) if bool(torch.isfinite(x).all()) else float("nan")


def routing_certificates(votes: Votes, info: RoutingInfo, *, kkt_ratio: float | None = None) -> list[Certificate]:
    """The certificates of one traced float64 routing run (``info`` from ``dynamic_routing(votes, trace=True)``).

    With ``kkt_ratio`` the run is read as a long run and the KKT-gap certificate is added.
    """
    if info.energy is None:
        raise ValueError("info: expected the RoutingInfo of a traced run (trace=True), got one without traces")
    if votes.dtype != torch.float64:
        raise ValueError(f"votes: expected float64 votes (the tolerance is float64 rounding), got {votes.dtype}")
    T = info.iterations
    tol = energy_tolerance(votes)  # (B,)
    e = info.energy.double()  # (T, B)
    finite = bool(torch.isfinite(e).all()) and bool(torch.isfinite(info.couplings).all())
    row_err = _worst(info.row_sum_error) if finite else float("nan")
    rise = (e[1:] - e[:-1]) / tol  # (T-1, B), > 0 is an increase
    decrease = e[:-1] - e[1:]
    kl_excess = (info.sym_kl[: T - 1].double() - decrease) / tol
    summary = info.summary()
    per_pass = {k: summary[k] for k in ("energy", "kkt_gap", "sym_kl", "entropy")}
    n_rise = int((rise > 1).sum()) if T > 1 else 0
    common: dict[str, Any] = {"passes": T, "samples": votes.batch, "tolerance_mean": float(tol.mean())}
    certs = [
        Certificate(
            "routing_couplings_feasible", row_err, 4 * (votes.parents + 1) * _EPS64,
            method="float64 re-routing: max_{t,b,i} |sum_j c_ij - 1| over every pass (NaN if any coupling "
                   "or energy is not finite)",
            details=common),
        Certificate(
            "routing_energy_increase", _worst(rise), 1.0,
            method="float64 re-routing: max_{t,b} (E(C_t+1) - E(C_t)) / tol_b, tol_b = 8 (M + N + D) eps S_b",
            details={**common, "largest_increase": _worst(e[1:] - e[:-1]), "increases_above_tolerance": n_rise,
                     "per_pass_batch_mean": per_pass}),
        Certificate(
            "routing_kl_decrease", _worst(kl_excess), 1.0,
            method="float64 re-routing: max_{t,b} (SKL_t - (E(C_t) - E(C_t+1))) / tol_b, SKL_t = KL(C_t+1||C_t) + "
                   "KL(C_t||C_t+1) from log-couplings",
            details={**common, "total_sym_kl": float(info.sym_kl[: T - 1].double().sum(0).mean()) if T > 1 else 0.0,
                     "total_energy_decrease": float((e[0] - e[-1]).mean())}),
    ]
    if kkt_ratio is not None:
        gap = info.kkt_gap.double()  # (T, B)
        ratio = float(gap[-1].mean() / gap[0].mean()) if finite else float("nan")
        certs.append(Certificate(
            "routing_kkt_gap", ratio, float(kkt_ratio), rigorous=False,
            why="the theorem proves that the limit is a KKT point, not a rate: the bound is a target for a finite run",
            method=f"float64 re-routing for {T} passes: batch-mean G(C_T) / G(C_1), G(C) = sum_i [max_j a_ij - "
                   "sum_j c_ij a_ij]",
            details={**common, "gap_first": float(gap[0].mean()), "gap_last": float(gap[-1].mean())}))
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
    """The routing certificates of a :class:`~proxnets.capsules.CapsNet` on images ``x``.

    ``passes`` defaults to the model's routing passes (at least 2, so that a step is checked);
    ``kkt_passes`` adds a long run of that many passes and its KKT-gap certificate (``kkt_ratio``).
    The model's routing options (leaky routing, and the deliberately broken variant of the
    falsification tests, ``model.classes.broken``) are those of the re-routing.
    """
    layer = model.classes
    r = max(layer.iterations if passes is None else check_int("passes", passes, low=1), 2)
    if kkt_passes is not None:
        kkt_passes = check_int("kkt_passes", kkt_passes, low=2)
        check_number("kkt_ratio", kkt_ratio, low=0.0, low_inclusive=False)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        u = model.primary_capsules(x.to(device)).double()  # (B, M, d_in)
        votes = FactoredVotes(u, layer.weight.double())
        broken = getattr(layer, "broken", None)
        _, info = dynamic_routing(votes, r, trace=True, leaky=layer.leaky, _broken=broken)
        certs = routing_certificates(votes, info)
        if kkt_passes is not None:
            _, long_info = dynamic_routing(votes, kkt_passes, trace=True, leaky=layer.leaky, _broken=broken)
            certs.append(routing_certificates(votes, long_info, kkt_ratio=kkt_ratio)[-1])
    finally:
        model.train(was_training)
    return certs
