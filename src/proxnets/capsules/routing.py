"""Dynamic routing as entropic mirror descent on a concave energy.

Notation (one sample; the batch is a leading axis everywhere): votes ``u_hat[i, j]`` of child
``i = 1..M`` for parent ``j = 1..N``, couplings ``C`` of shape ``(M, N)`` with rows on the
probability simplex (``C >= 0``, ``C 1 = 1``: linear constraints), parent inputs
``s_j(C) = sum_i c_ij u_hat_ij`` and outputs ``v_j = squash(s_j)``.

**Energy.** ``E(C) = - sum_j g(n(s_j(C)))`` with ``g(r) = r - arctan(r)`` and the safe length
``n`` of :mod:`proxnets.capsules.functional`. Since ``g'(r) = r^2 / (1 + r^2)``,

    dE/dc_ij = - <u_hat_ij, v_j>                      (the "agreement", with a minus sign)

``g`` is convex and non-decreasing on ``r >= 0`` and ``n(s)`` is convex in ``s``, so ``-E`` is convex
and ``E`` concave in ``C``.

**Routing = mirror descent.** Procedure 1 of Sabour et al. (2017) keeps logits ``b`` (zero for every
sample), sets ``C = softmax(b)`` over the *parents* and adds the agreement to ``b``. That is

    C_{t+1} = C_t * exp(-grad E(C_t)) / Z         (row-wise normalization)

an exponentiated-gradient (entropic mirror descent) step of size 1 on the product of simplices.
For a concave ``E`` the linearization is an upper bound, and the mirror step gives

    E(C_{t+1}) <= E(C_t) - KL(C_{t+1} || C_t) - KL(C_t || C_{t+1}),

so the energy is non-increasing at every iteration, at any scale of the votes; its minima sit at
vertices (one-hot rows): repeated routing *polarizes* the couplings and mutes some parents.

**Counting.** ``iterations = r`` follows Sabour et al.: ``r`` passes, the output uses ``C_{r-1}``
(after ``r - 1`` mirror steps); ``r = 1`` is uniform couplings. ``iterations = 0`` is accepted as
"no routing" and gives the same output as ``r = 1``.

**Per-parent bias** (Sabour et al.'s code): ``s_j(C) = sum_i c_ij u_hat_ij + beta_j``. ``s_j`` is still
affine in ``C``, so ``|s_j(C)|`` is still convex, ``E`` still concave, and ``dE/dc_ij = -<u_hat_ij, v_j>``
with ``v_j = squash(s_j)`` (bias included): the same update is mirror descent on the extended energy.

**Regularized routing** (beyond the seed): ``b <- (1 - lambda tau) b + lambda a`` with step ``lambda`` and
entropic weight ``tau`` (``0 < lambda tau <= 1``) is the entropic mirror-descent step of size ``lambda`` on

    F(C) = E(C) + tau sum_ij c_ij log c_ij

(``log C_t = b_t`` up to row constants). Since ``E`` is concave and ``h = sum c log c`` has Bregman divergence
``D_h = sum_i KL``, ``F(Y) <= F(X) + <grad F(X), Y - X> + tau D_h(Y, X)`` exactly, and the mirror step gives

    F(C_{t+1}) <= F(C_t) - (1/lambda - tau) KL(C_{t+1}||C_t) - (1/lambda) KL(C_t||C_{t+1})

(``tau = 0, lambda = 1``: the bound above). **Strict convexity.** The Hessian of ``r(s) = g(n(s))`` has
eigenvalues ``n/(1+n^2) <= 1/2`` and at most ``2n/(1+n^2)^2 <= 3 sqrt(3)/8 =: L_g`` (at ``n = 1/sqrt 3``), so
``-E`` has curvature at most ``L_E = L_g max_j sigma_max(U_j)^2 <= L_g max_j sum_i |u_hat_ij|^2``
(``U_j``: the ``M x D`` votes for parent ``j``), while ``diag(1/c) >= I`` on the simplex. Hence for

    tau > tau* := L_g max_j sum_i |u_hat_ij|^2          (per sample; :func:`convexity_threshold`)

``F`` is ``mu = tau - tau*`` strongly convex relative to ``h`` (and ``tau``-smooth relative to it): a unique
minimizer, the unique fixed point of the iteration, reached linearly for ``lambda = 1/tau``:
``F(C_k) - F* <= mu KL(C*||C_0) / ((tau / tau*)^k - 1)`` (Lu, Freund & Nesterov 2018, Thm 3.1). **No
polarization.** ``b_t`` is a weighted sum of agreements with weights ``lambda (1 - lambda tau)^k`` summing to
at most ``1/tau``, and ``|a_ij| <= |u_hat_ij|``: every coupling of every pass satisfies
``c_ij >= exp(-2 max_j |u_hat_ij| / tau) / (N [+1])``, at any ``tau > 0``.

**Leaky routing** (Sabour et al.'s code) adds a none-of-the-above parent with a zero vote and a logit
fixed at 0: rows live on the simplex of ``N + 1`` entries and the couplings to real parents sum to
less than one. The energy and the mirror-descent reading are unchanged (the extra parent's
gradient is zero).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from proxnets.capsules.functional import EPS, _capsule_length as capsule_length, _squash as squash  # unchecked: hot path
from proxnets.capsules.votes import (FactoredVotes, ParentMajorVotes, Votes, _child_blocks, as_votes,
                                     form_parent_major, workspace_buffer)
from proxnets.utils.convergence import POLICIES, IterInfo, handle_nonconvergence
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor, fail

__all__ = [
    "GRADIENT_MODES",
    "BACKENDS",
    "ROUTING_MODES",
    "CURVATURE_BOUND",
    "AUTO_TAU_FACTOR",
    "convexity_threshold",
    "BROKEN_VARIANTS",
    "RoutingInfo",
    "routing_energy",
    "energy_gradient",
    "coupling_entropy",
    "dynamic_routing",
]

GRADIENT_MODES = ("last", "all")
BACKENDS = ("eager", "compiled")
ROUTING_MODES = ("standard", "regularized")
CURVATURE_BOUND = 3 * math.sqrt(3) / 8  # L_g = max_n 2n / (1 + n^2)^2: the curvature of g(n(s)) in s

BROKEN_VARIANTS = {
    "softmax-over-children": "couplings normalized over the children (the wrong axis): columns, not rows, sum to 1",
    "negative-update": "logit update of the wrong sign, b <- b - <u_hat, v> (mirror ascent on the concave energy)",
    "anti-regularized": "regularized routing with the entropic term of the wrong sign, b <- (1 + lambda tau) b + "
                        "lambda a (an entropy bonus turned into a penalty: polarizes)",
}
"""Deliberately wrong routing procedures (the two bugs public reimplementations make), selected by
``dynamic_routing(..., _broken=name)``: only for the falsification tests of the certificate and the
claims, which must catch them. Never a modelling choice."""


@dataclasses.dataclass
class RoutingInfo(IterInfo):
    """What :func:`dynamic_routing` reports besides the parent capsules.

    - ``iterations``: passes performed (``T``); fewer than asked when ``tol`` stopped it.
    - ``converged``: ``tol`` was given and reached (always ``False`` without ``tol``: the classic
      procedure runs a fixed number of passes and claims nothing).
    - ``residuals``: per pass ``t``, ``max_b max_{i,j} |C_{t+1} - C_t|`` (measured only with ``tol``
      or ``trace``; empty otherwise).
    - ``couplings``: ``(B, M, N)`` the couplings ``C`` that produced the output (detached; for leaky
      routing the real parents' columns only; batches routed in chunks give a non-contiguous view of the
      routing's own buffer: ``.contiguous()`` before ``.view``).

    With ``trace=True``, per pass ``t = 0..T-1`` and per sample (tensors of shape ``(T, B)``):

    - ``energy``: ``E(C_t) = - sum_j g(n(s_j))`` (non-increasing in ``t``).
    - ``entropy``: mean over children of the row entropy ``- sum_j c_ij log c_ij`` (``log N`` for
      uniform rows, ``log(N + 1)`` with leaky routing, 0 for one-hot rows).
    - ``max_coupling``: mean over children of ``max_j c_ij`` (1 for one-hot rows).
    - ``change``: ``max_{i,j} |C_{t+1} - C_t|``, the step taken after pass ``t``.
    - ``muted``: fraction of parents with ``|v_j| < mute_threshold``.
    - ``kkt_gap``: ``sum_i [max_j a_ij - sum_j c_ij a_ij]`` at ``C_t`` with the agreements
      ``a_ij = <u_hat_ij, v_j> = -dE/dc_ij`` (the leak, if any, has ``a = 0``). It is the
      Frank-Wolfe gap ``max_{C' feasible} <grad E(C_t), C_t - C'>``: ``>= 0`` for feasible ``C_t`` and
      zero exactly at the KKT points of ``min E`` over the product of simplices (every child's
      coupling mass sits on parents of maximal agreement).
    - ``sym_kl``: ``KL(C_{t+1}||C_t) + KL(C_t||C_{t+1})`` summed over the children, computed from the
      log-couplings (``log_softmax`` of the logits; couplings underflow in linear space). The
      mirror-descent bound says ``E(C_t) - E(C_{t+1}) >= sym_kl[t]``.
    - ``row_sum_error``: ``max_i |sum_j c_ij - 1|`` over every child (leak included): the distance of
      ``C_t`` from the constraints (round-off for correct routing; NaN when a coupling is not finite).

    - ``objective``: ``F(C_t) = E(C_t) + tau sum_ij c_ij log c_ij`` (``= energy`` for standard routing).
    - ``decrease_bound``: ``(1/lambda - tau) KL(C_{t+1}||C_t) + (1/lambda) KL(C_t||C_{t+1})``, the decrease
      of ``F`` the mirror step guarantees (``= sym_kl`` for standard routing).
    - ``min_log_coupling``: ``min_{i,j} log c_ij`` (from the logits), the polarization floor.

    For regularized routing ``kkt_gap`` is the gap of ``F``: ``sum_i [max_j q_ij - sum_j c_ij q_ij]`` with
    ``q_ij = a_ij - tau log c_ij``, zero exactly at the fixed point ``C = softmax(a / tau)``. ``tau`` and
    ``step`` hold the per-sample ``tau`` and ``lambda`` ``(B,)`` used (``0`` and ``1`` for standard routing).

    ``change`` and ``sym_kl`` at the last pass describe the step to ``C_T`` (computed, not used for
    the output); NaN when ``tol`` stopped the run there. :meth:`summary` gives the batch means as lists.
    """

    couplings: torch.Tensor | None = None
    energy: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    max_coupling: torch.Tensor | None = None
    change: torch.Tensor | None = None
    muted: torch.Tensor | None = None
    kkt_gap: torch.Tensor | None = None
    sym_kl: torch.Tensor | None = None
    row_sum_error: torch.Tensor | None = None
    objective: torch.Tensor | None = None
    decrease_bound: torch.Tensor | None = None
    min_log_coupling: torch.Tensor | None = None
    tau: torch.Tensor | None = None
    step: torch.Tensor | None = None

    TRACE_FIELDS = ("energy", "entropy", "max_coupling", "change", "muted", "kkt_gap", "sym_kl", "row_sum_error",
                    "objective", "decrease_bound", "min_log_coupling")

    def summary(self) -> dict[str, list[float]]:
        """Batch-averaged traces: ``{field: [mean over the batch at pass t for t in 0..T-1]}``."""
        out = {}
        for name in self.TRACE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = [float(x) for x in value.double().mean(1)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "converged": self.converged,
            "residuals": list(self.residuals),
            **self.summary(),
        }


class _G(torch.autograd.Function):
    """``g(r) = r - arctan r`` with its exact derivative ``g'(r) = r^2 / (1 + r^2)``.

    In low precision the difference cancels for short capsules (``g(r) ~ r^3 / 3``): below
    ``r = 0.3`` the value comes from the series ``sum_k (-1)^(k+1) r^(2k+1) / (2k+1)``, k = 1..7
    (relative truncation error < 1e-8). float64 keeps the direct formula.
    """

    @staticmethod
    def forward(ctx, r):
        ctx.save_for_backward(r)
        direct = r - torch.atan(r)
        if r.dtype == torch.float64:
            return direct
        r2 = r * r
        series = r * r2 * (1 / 3 - r2 * (1 / 5 - r2 * (1 / 7 - r2 * (1 / 9 - r2 * (1 / 11 - r2 * (1 / 13 - r2 / 15))))))
        return torch.where(r < 0.3, series, direct)

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        r2 = r * r
        return grad * r2 / (1 + r2)


def _g(r: torch.Tensor) -> torch.Tensor:
    return _G.apply(r)  # g(r) = r - arctan r, g'(r) = r^2 / (1 + r^2)


def _energy_of(s: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return -_g(capsule_length(s, -1, eps)).sum(-1)  # (B,)


def _check_couplings(votes: Votes, couplings: Any) -> torch.Tensor:
    check_tensor("couplings", couplings, shape=(votes.batch, votes.children, votes.parents))
    if couplings.dtype != votes.dtype or couplings.device != votes.device:
        fail("couplings", f"dtype {votes.dtype} on {votes.device} (the votes')", f"{couplings.dtype} on {couplings.device}",
             TypeError)
    return couplings


def routing_energy(votes: torch.Tensor | Votes, couplings: torch.Tensor) -> torch.Tensor:
    """``E(C) = - sum_j g(n(s_j(C)))`` per sample, shape ``(B,)``, for any couplings ``(B, M, N)``.

    ``votes``: a ``(B, M, N, D)`` tensor or a :class:`~proxnets.capsules.votes.Votes`. The couplings
    need not come from routing (uniform, random, one-hot...); differentiable in both arguments.
    """
    votes = as_votes(votes)
    c = _check_couplings(votes, couplings)
    return _energy_of(votes.combine(c))


def energy_gradient(votes: torch.Tensor | Votes, couplings: torch.Tensor) -> torch.Tensor:
    """Closed form ``dE/dc_ij = - <u_hat_ij, squash(s_j(C))>``, shape ``(B, M, N)``."""
    votes = as_votes(votes)
    c = _check_couplings(votes, couplings)
    return -votes.agree(squash(votes.combine(c)))


def coupling_entropy(couplings: torch.Tensor) -> torch.Tensor:
    """Mean over children of the row entropy ``- sum_j c_ij log c_ij`` (``0 log 0 = 0``): ``(B,)``."""
    check_tensor("couplings", couplings, ndim=3)
    if bool((couplings < 0).any()):
        fail("couplings", "non-negative couplings", "negative entries")
    return -torch.special.xlogy(couplings, couplings).sum(-1).mean(-1)


def convexity_threshold(votes: torch.Tensor | Votes) -> torch.Tensor:
    """``tau* = L_g max_j sum_i |u_hat_ij|^2`` per sample ``(B,)``, ``L_g = 3 sqrt(3) / 8``.

    Above it the regularized objective ``F = E + tau sum c log c`` is strictly convex (module docstring):
    ``sum_i |u_hat_ij|^2 = |U_j|_F^2 >= sigma_max(U_j)^2`` bounds the curvature of ``-E``. Detached. The
    factor ``1 + 4 (M + D) eps`` covers the rounding of the sums of squares.
    """
    votes = as_votes(votes)
    with torch.no_grad():
        sq = votes.column_sq_norms()  # (B, N)
    eps = torch.finfo(sq.dtype).eps
    return CURVATURE_BOUND * sq.amax(-1) * (1 + 4 * (votes.children + votes.dim) * eps)


def _logit_floor(dtype: torch.dtype) -> float:
    """How far below its row's maximum a logit may fall: ``0.6 * |log(smallest normal)|`` (52 in float32).

    Polarized rows drive logits apart without bound; couplings near ``exp(-87)`` (float32) become
    subnormal numbers, which make CPU arithmetic ~100x slower. Holding them at ``exp(-floor)``
    (2e-23 in float32, 1e-185 in float64) changes ``s`` by less than the rounding of a row's sum.
    """
    return 0.6 * -math.log(torch.finfo(dtype).tiny)


def _update_rule(votes: Votes, routing: str, tau: Any, step: Any, broken: str | None):
    """The logit update of every routing path, written once: ``(tau_b, step_b, decay, lam, sign, axis)``.

    ``tau_b``, ``step_b``: per-sample ``tau`` and ``lambda`` ``(B,)`` (:func:`_regularization`); ``decay = 1 - lambda
    tau`` and ``lam = lambda`` ``(B,)`` for regularized routing, both None for standard routing (``b <- b + a``);
    ``sign = -1`` and ``axis = "children"`` only for the broken variants ``"negative-update"`` and
    ``"softmax-over-children"`` (``"anti-regularized"`` flips the sign of ``lambda tau`` in ``decay``)."""
    tau_b, step_b = _regularization(votes, routing, tau, step)
    decay = lam = None
    if routing == "regularized":
        decay = 1 - (-1 if broken == "anti-regularized" else 1) * step_b * tau_b
        lam = step_b
    sign = -1.0 if broken == "negative-update" else 1.0
    axis = "children" if broken == "softmax-over-children" else "parents"
    return tau_b, step_b, decay, lam, sign, axis


def _per_sample(x: torch.Tensor | None, pdim: int) -> torch.Tensor | None:
    """A ``(B,)`` tensor shaped to broadcast against logits of layout ``pdim`` (:func:`_route_passes`)."""
    return None if x is None else x.view((1, -1, 1) if pdim == 0 else (-1, 1, 1))


def _route_passes(combine, agree, logits: torch.Tensor, passes: int, *, pdim: int, leaky: bool,
                  bias: torch.Tensor | None, inner_bias: torch.Tensor | None, decay: torch.Tensor | None,
                  lam: torch.Tensor | None, sign: float, axis: str, floor: float, inplace: bool,
                  uniform: bool = False, output_pass: bool = True, step_after_last: bool = False, on_pass=None,
                  on_step=None):
    """The routing passes, the one implementation every path runs (eager, formed/chunked, the adjoint's forward,
    compiled). Per pass ``t``:

        s = combine(C_t) (+ beta),  v = squash(s),  a = agree(v) (+ the leak's 0),
        x = b + sign a  |  decay b + lam sign a,    b_t+1 = max(x - max_j x, -floor),   C_t+1 = softmax_j(b_t+1)

    ``logits``: the initial logits in one of two layouts, parent-major ``(N [+ 1], B, M)`` (``pdim = 0``) or
    batch-major ``(B, N [+ 1], M)`` (``pdim = 1``); the children are dim 2 in both (``axis = "children"``: the
    broken softmax over them). ``combine(c, final) -> (B, N, D)`` (bias excluded) takes the real parents' couplings
    in that layout, ``agree(v, final)`` returns the agreement in it; ``final`` marks the output pass (where
    ``gradient="last"`` uses the votes with gradients and ``bias`` instead of ``inner_bias``). ``decay``/``lam``:
    shaped like :func:`_per_sample`. ``inplace``: renormalize without new buffers (nothing saved for backward).
    ``uniform``: the logits are zeros, ``C_0 = 1 / n`` without the softmax (the same numbers: ``exp(0) = 1``).

    ``output_pass=False`` (measured runs): the last pass is not the output pass; ``step_after_last``: the step to
    ``C_T`` is still taken (its change and KL are traced). ``on_pass(t, s + beta, v, C_t, b_t)`` observes every pass,
    ``on_step(t, a, C_t, C_t+1, b_t+1)`` every step and stops the run when it returns True (``tol``). Returns
    ``(s, v, C, passes done, stopped)`` of the output pass: ``s`` without the bias, ``C`` with the leak."""
    parents = logits.shape[pdim] - int(leaky)
    ax = pdim if axis == "parents" else 2
    c_full = torch.full_like(logits, 1.0).div_(logits.shape[ax]) if uniform else torch.softmax(logits, ax)
    stopped = False
    s = v = None
    t = 0
    for t in range(passes):
        last = t == passes - 1
        final = last and output_pass
        s = combine(c_full.narrow(pdim, 0, parents) if leaky else c_full, final)
        beta = bias if final else inner_bias
        sb = s if beta is None else s + beta
        v = squash(sb)
        if on_pass is not None:
            on_pass(t, sb, v, c_full, logits)
        if last and not step_after_last:
            break
        a = agree(v, final)  # a = -grad E(C)
        if leaky:  # the leak's gradient is 0
            a = torch.cat([a, a.new_zeros(a.shape[:pdim] + (1,) + a.shape[pdim + 1:])], pdim)
        step_a = a if sign == 1.0 else sign * a
        # Without autograd (inplace) and with nothing keeping the logits or a (on_step): from zero logits x = lambda a,
        # later the update goes into the loop's own logit buffer. With autograd the graph stays as it was: one node
        # fewer reorders the engine's gradient sums over the passes (round-off that training would carry on).
        if inplace and on_step is None and uniform and t == 0:
            x = step_a if decay is None else lam * step_a
        elif inplace and on_step is None:
            x = logits.add_(step_a) if decay is None else logits.mul_(decay).add_(lam * step_a)
        else:
            x = logits + step_a if decay is None else decay * logits + lam * step_a  # b <- (1 - lambda tau) b + lambda a
        if inplace:
            x.sub_(x.amax(ax, keepdim=True)).clamp_min_(-floor)  # same softmax; no subnormals
        else:
            x = (x - x.amax(ax, keepdim=True)).clamp_min(-floor)
        c_next = torch.softmax(x, ax)
        if on_step is not None and on_step(t, a, c_full, c_next, x):
            stopped = True
            break
        if last:
            break
        logits, c_full = x, c_next
    return s, v, c_full, t + 1, stopped


def _bmn(c: torch.Tensor) -> torch.Tensor:
    return c.permute(1, 2, 0)  # parent-major (N, B, M) -> logical (B, M, N) view


def _tracer(stats: dict, residuals: list, *, pdim: int, axis: str, trace: bool, tol: float | None, regularized: bool,
            tau_b: torch.Tensor, step_b: torch.Tensor, mute_threshold: float, logits: torch.Tensor):
    """``(on_pass, on_step)`` of :func:`_route_passes` that record the certificate's bookkeeping of
    :class:`RoutingInfo` (energy, objective, entropy, couplings, muting, row sums per pass; change, KKT gap,
    symmetric KL and the regularized decrease bound per step) into ``stats`` and the residuals, and stop at
    ``tol``. Everything from the logits' layout ``pdim``; log-couplings from ``log_softmax`` of the logits
    (couplings underflow in linear space)."""
    ax = pdim if axis == "parents" else 2
    both = (pdim, 2)
    tau_l = _per_sample(tau_b, pdim)
    state = {"log_c": torch.log_softmax(logits.detach(), dim=ax) if trace else None}

    def on_pass(t, sb, v, c_full, _logits):
        if not trace:
            return
        with torch.no_grad():
            cf, lc = c_full.detach(), state["log_c"]
            energy = _energy_of(sb.detach())
            stats["energy"].append(energy)
            stats["objective"].append(energy + tau_b * (cf * lc).sum(both))
            stats["entropy"].append(-torch.special.xlogy(cf, cf).sum(pdim).mean(-1))
            stats["max_coupling"].append(cf.amax(pdim).mean(-1))
            stats["min_log_coupling"].append(lc.amin(both))
            stats["muted"].append((capsule_length(v.detach()) < mute_threshold).to(sb.dtype).mean(-1))
            stats["row_sum_error"].append((cf.sum(pdim) - 1).abs().amax(-1))

    def on_step(t, a, c_full, c_next, x):
        with torch.no_grad():
            cf = c_full.detach()
            moved = (c_next - cf).abs().amax(both)  # (B,)
            residuals.append(float(moved.max()))
            if trace:
                log_c = state["log_c"]
                q = a.detach() - tau_l * log_c if regularized else a.detach()  # -grad F up to a row constant
                stats["kkt_gap"].append((q.amax(pdim) - (cf * q).sum(pdim)).sum(-1))  # (B,)
                stats["change"].append(moved)
                log_next = torch.log_softmax(x.detach(), dim=ax)
                diff = log_next - log_c
                # KL(C'||C) and KL(C||C') from logs (couplings underflow in linear space)
                kl_fwd = (c_next.detach() * diff).sum(both)
                kl_bwd = -(cf * diff).sum(both)
                stats["sym_kl"].append(kl_fwd + kl_bwd)
                stats["decrease_bound"].append((1 / step_b - tau_b) * kl_fwd + kl_bwd / step_b)
                state["log_c"] = log_next
        return tol is not None and residuals[-1] < tol

    return on_pass, on_step


def dynamic_routing(
    votes: torch.Tensor | Votes,
    iterations: int = 3,
    *,
    tol: float | None = None,
    gradient: str = "all",
    leaky: bool = False,
    bias: torch.Tensor | None = None,
    routing: str = "standard",
    tau: float | str | None = None,
    step: float | None = None,
    initial_logits: torch.Tensor | None = None,
    trace: bool = False,
    mute_threshold: float = 1e-2,
    policy: str = "warn",
    backend: str = "eager",
    _broken: str | None = None,
    _formed_adjoint: bool = False,
) -> tuple[torch.Tensor, RoutingInfo]:
    """Routing by agreement (Sabour et al. 2017, Procedure 1), vectorized over batch, children, parents.

    Args:
        votes: ``(B, M, N, D)`` prediction vectors, or a :class:`Votes` (a capsule layer passes
            :class:`~proxnets.capsules.votes.FactoredVotes`, which never forms them).
        iterations: passes ``r >= 0`` (see the module docstring for the counting); with ``tol``, the
            maximum number of passes.
        tol: stop once ``max |C_{t+1} - C_t| < tol`` over the batch (the output then uses ``C_t``);
            not reaching it within ``iterations`` is handled by ``policy``.
        gradient: ``"all"`` (default, as in Sabour et al.'s official code, which has no stop-gradient):
            back-propagate through every pass, couplings included. ``"last"``: the couplings are
            constants for back-propagation, gradients reach the votes only through
            ``s = sum_i c_ij u_hat_ij`` of the final pass (what many reimplementations do; cheaper).
        leaky: add a none-of-the-above parent (zero vote, logit fixed at 0).
        bias: per-parent bias ``beta`` ``(N, D)`` (or ``(B, N, D)``): ``s_j = sum_i c_ij u_hat_ij + beta_j``
            (the official code's learned bias; the energy stays concave, module docstring).
        routing: ``"standard"`` (``b <- b + a``) or ``"regularized"`` (``b <- (1 - lambda tau) b + lambda a``,
            mirror descent on ``F = E + tau sum c log c``).
        tau: entropic weight of regularized routing: a positive number, or ``"auto"`` (default there):
            ``AUTO_TAU_FACTOR`` times :func:`convexity_threshold` of each sample (strictly convex ``F``).
        step: ``lambda`` of regularized routing, ``0 < lambda tau <= 1``; default ``1 / tau``.
        initial_logits: ``(B, M, N)`` logits to start from instead of zeros (uniform couplings).
        trace: record the per-pass fields of :class:`RoutingInfo` (costs one extra agreement pass).
        mute_threshold: ``|v_j|`` below which a parent counts as muted in the trace.
        policy: ``"ignore" | "warn" | "raise"`` when ``tol`` is not reached.
        backend: ``"eager"`` (default) or ``"compiled"``: the fixed-pass call without ``trace``/``tol`` as one
            ``torch.compile`` graph (:mod:`proxnets.capsules.compiled`; same values up to round-off, compiled on
            first use per shape; ``RuntimeError`` when no compiler is available). Traced or ``tol`` calls (the
            certificates) always run eager.
        _broken: a key of :data:`BROKEN_VARIANTS` runs that deliberately wrong procedure (tests of
            the certificate and the claims only).
        _formed_adjoint: (tests) factored votes formed whole with ``gradient="all"`` take the hand-derived
            backward (:class:`_AdjointRouting`) instead of autograd through the passes (the default there: the
            adjoint saved 3% CPU on the quick suite, within its noise, and would move every trained claim value by
            round-off; docs/capsules.md). Votes routed in chunks always take the adjoint.

    Returns:
        ``(v, info)``: parent capsules ``v (B, N, D)`` and a :class:`RoutingInfo`.
    """
    votes = as_votes(votes)
    iterations = check_int("iterations", iterations, low=0)
    if tol is not None:
        tol = check_number("tol", tol, low=0.0, low_inclusive=False)
    check_choice("gradient", gradient, GRADIENT_MODES)
    check_choice("routing", routing, ROUTING_MODES)
    mute_threshold = check_number("mute_threshold", mute_threshold, low=0.0)
    check_choice("policy", policy, POLICIES)
    check_choice("backend", backend, BACKENDS)
    if not isinstance(leaky, bool):
        raise TypeError(f"leaky: expected a bool, got {leaky!r}")
    if _broken is not None:
        check_choice("_broken", _broken, tuple(BROKEN_VARIANTS))
    B, M, N = votes.batch, votes.children, votes.parents
    if bias is not None:
        bias = check_tensor("bias", bias, finite=False)
        if bias.shape not in ((N, votes.dim), (B, N, votes.dim)):
            fail("bias", f"shape ({N}, {votes.dim}) or ({B}, {N}, {votes.dim})", tuple(bias.shape))
    if initial_logits is not None:
        initial_logits = check_tensor("initial_logits", initial_logits, shape=(B, M, N)).detach().to(votes.dtype)
    passes = max(iterations, 1)
    measure = trace or tol is not None
    outer_grad = torch.is_grad_enabled()
    detached = gradient == "last"
    options = dict(leaky=leaky, bias=bias, routing=routing, tau=tau, step=step, initial_logits=initial_logits)
    if backend == "compiled" and not measure and _broken is None:
        return _compiled_call(votes, iterations, gradient=gradient, **options)
    inner = votes.detach() if detached else votes
    if isinstance(votes, FactoredVotes) and passes > 1:
        # The passes read the same votes 2r - 1 times: form them once, parent-major (ParentMajorVotes), when they
        # fit in _MATERIALIZE_BYTES; otherwise route cache-sized chunks of the batch (same result, per sample).
        if votes.batch * votes.parents * votes.children * votes.dim * votes.dtype.itemsize <= _MATERIALIZE_BYTES:
            if detached or not outer_grad:
                with torch.no_grad():
                    inner = votes.parent_major()  # the final pass keeps the factored votes (gradients, memory)
            elif _formed_adjoint and not measure and _broken is None:
                return _adjoint_routing(votes, iterations, **options)
            else:
                votes = inner = votes.parent_major()  # autograd through every pass; keeps B N M D numbers
        elif not measure and (detached or not outer_grad):
            return _chunked_routing(votes, iterations, _broken=_broken, **options)
        elif not measure and _broken is None:
            return _adjoint_routing(votes, iterations, **options)
        # (traced runs, and a broken variant with gradients through every pass, take the generic path: tests only)
    tau_b, step_b, decay, lam, sign, axis = _update_rule(
        inner if isinstance(inner, ParentMajorVotes) else votes, routing, tau, step, _broken)
    inner_mode = torch.no_grad() if detached else contextlib.nullcontext()

    def combine(c: torch.Tensor, final: bool) -> torch.Tensor:
        if final and detached:  # the last pass of the classic procedure: the only one gradients go through
            return votes.combine(_bmn(c))
        with inner_mode:
            return inner.combine(_bmn(c))  # (B, N, D)

    def agree(v: torch.Tensor, final: bool) -> torch.Tensor:
        with inner_mode:
            return inner.agree(v).permute(2, 0, 1)  # (N, B, M)

    # b, parent-major (N, B, M) plus the leak's row (a softmax over a short last axis is slow on CPU); reset for
    # every call
    logits = torch.zeros(N + int(leaky), B, M, dtype=votes.dtype, device=votes.device)
    if initial_logits is not None:
        logits[:N] = initial_logits.permute(2, 0, 1)
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in RoutingInfo.TRACE_FIELDS}
    residuals: list[float] = []
    on_pass, on_step = (_tracer(stats, residuals, pdim=0, axis=axis, trace=trace, tol=tol, regularized=decay is not None,
                                tau_b=tau_b, step_b=step_b, mute_threshold=mute_threshold, logits=logits) if measure else (None, None))
    inner_bias = None if bias is None else (bias.detach() if detached else bias)
    s, v, c_full, done, converged = _route_passes(
        combine, agree, logits, passes, pdim=0, leaky=leaky, bias=bias, inner_bias=inner_bias,
        decay=_per_sample(decay, 0), lam=_per_sample(lam, 0), sign=sign, axis=axis, floor=_logit_floor(votes.dtype),
        inplace=detached or not outer_grad, uniform=initial_logits is None, output_pass=not measure, step_after_last=measure and iterations > 0,
        on_pass=on_pass, on_step=on_step)
    c = c_full[:-1] if leaky else c_full
    if detached and measure and outer_grad:
        s = votes.combine(_bmn(c))  # re-run the final pass with gradients to the votes
        v = squash(s if bias is None else s + bias)
    for name in ("change", "sym_kl", "kkt_gap", "decrease_bound"):
        if trace and len(stats[name]) < len(stats["energy"]):
            stats[name].append(torch.full((B,), math.nan, dtype=votes.dtype, device=votes.device))
    info = RoutingInfo(
        iterations=len(stats["energy"]) if trace else done,
        converged=converged,
        residuals=residuals,
        couplings=_bmn(c).detach().contiguous(),
        tau=tau_b, step=step_b,
        **({k: torch.stack(val) for k, val in stats.items()} if trace else {}),
    )
    if tol is not None:
        handle_nonconvergence(info, policy, "dynamic routing")
    return v, info


_MATERIALIZE_BYTES = 32 << 20
"""Factored votes up to this size (``B N M D`` numbers) are formed once per routing call (the suite's models:
2.3 MB at batch 25); larger batches are routed in chunks of ``_CHUNK_BYTES``."""
_CHUNK_BYTES = 8 << 20  # one chunk's votes stay in the last-level cache while its passes run (2-16 MB measured)
_KEEP_BYTES = 32 << 20  # the adjoint's per-pass tensors are kept up to this size, else replayed in backward


def _chunk_size(votes: Votes) -> int:
    per_sample = votes.parents * votes.children * votes.dim * votes.dtype.itemsize
    return max(1, min(votes.batch, _CHUNK_BYTES // per_sample))


def _chunked_routing(votes: FactoredVotes, iterations: int, *, bias: torch.Tensor | None, initial_logits, leaky: bool,
                     routing: str, tau: Any, step: Any, _broken: str | None):
    """``dynamic_routing`` without gradients through the passes, over chunks of the batch: each chunk's votes are
    formed once (:func:`form_parent_major`) and routed (:func:`_route_formed`); the output pass uses the factored
    votes, so gradients reach ``u`` and ``weight`` without the ``(B, M, N, D)`` votes ever existing in full."""
    B, N, M, D = votes.batch, votes.parents, votes.children, votes.dim
    # each chunk's output-pass couplings and sums land here (batch-major, as the passes leave them)
    c_bm = torch.empty(B, N, M, dtype=votes.dtype, device=votes.device)
    sums = torch.empty(B, N, D, dtype=votes.dtype, device=votes.device)
    taus, steps = [], []
    workspace: dict = {}  # every chunk's votes in the same two buffers (votes.workspace_buffer)
    floor = _logit_floor(votes.dtype)
    with torch.no_grad():
        wi = votes.child_major_weight()
        for sl in _batch_chunks(B, _chunk_size(votes)):
            formed = form_parent_major(votes.u[sl], wi, N, workspace)
            tau_b, step_b, decay, lam, sign, axis = _update_rule(formed, routing, tau, step, _broken)
            sums[sl], _, c, _ = _route_formed(formed, max(iterations, 1), leaky=leaky, bias=_rows(bias, sl),
                                              decay=decay, lam=lam, sign=sign, axis=axis,
                                              init=_rows(initial_logits, sl), floor=floor, keep=False)
            c_bm[sl] = c[:, :N]
            taus.append(tau_b)
            steps.append(step_b)
    c = c_bm.permute(0, 2, 1)  # (B, M, N) view: the couplings of the output pass
    s = votes.combine_given(c, sums)  # gradients to u and weight through the factored maps
    v = squash(s if bias is None else s + bias)
    # the couplings as a (B, M, N) view of the batch-major buffer (a contiguous copy cost 5% of the layer's time)
    info = RoutingInfo(iterations=max(iterations, 1), converged=False, residuals=[], couplings=c,
                       tau=torch.cat(taus), step=torch.cat(steps))
    return v, info


def _route_formed(votes: ParentMajorVotes, passes: int, *, leaky: bool, bias: torch.Tensor | None,
                  decay: torch.Tensor | None, lam: torch.Tensor | None, init: torch.Tensor | None, floor: float,
                  keep: bool, sign: float = 1.0, axis: str = "parents"):
    """:func:`_route_passes` on formed votes without autograd, the logits batch-major ``(b, N [+ 1], M)`` (each
    agreement comes out of its product in that layout: no transposing copies). ``decay``/``lam`` ``(b,)`` (None:
    ``b <- b + a``). Returns ``(s, v, c, record)``: the output pass's ``s`` (bias excluded) and ``v (b, N, D)``, its
    couplings ``(b, N [+ 1], M)`` and, with ``keep``, what :class:`_AdjointRouting` needs to run the passes
    backwards: per pass ``s_t + beta`` and ``v_t`` ``(b, N, D)`` and ``C_t``, and the renormalized logits ``b_t`` of
    the passes ``t >= 1``."""
    b, N, M, D = votes.u_pm.shape
    U = votes.u_pm.view(b * N, M, D)
    logits = torch.zeros(b, N + int(leaky), M, dtype=votes.dtype, device=votes.device)
    if init is not None:
        logits[:, :N] = init.permute(0, 2, 1)
    record: tuple[list, list, list, list] = ([], [], [], [])
    sb, vs, cs, bs = record

    def on_pass(t, s_beta, v, c, _logits):
        sb.append(s_beta)
        vs.append(v)
        cs.append(c)

    def on_step(t, a, c, c_next, x):
        bs.append(x)
        return False

    s, v, c, _, _ = _route_passes(
        lambda c, final: torch.bmm(c.reshape(b * N, 1, M), U).view(b, N, D),  # s_j = sum_i c_ij u_hat_ij
        lambda v, final: torch.bmm(v.view(b * N, 1, D), U.transpose(1, 2)).view(b, N, M),  # <u_hat_ij, v_j>
        logits, passes, pdim=1, leaky=leaky, bias=bias, inner_bias=bias, decay=_per_sample(decay, 1),
        lam=_per_sample(lam, 1), sign=sign, axis=axis, floor=floor, inplace=True, uniform=init is None,
        on_pass=on_pass if keep else None, on_step=on_step if keep else None)
    return s, v, c, record


def _squash_vjp(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``(d squash / d s)^T g`` by autograd on the small ``(b, N, D)`` tensor (the same ops as the forward)."""
    with torch.enable_grad():
        x = s.detach().requires_grad_()
        (gs,) = torch.autograd.grad(squash(x), x, g)
    return gs


def _renormalization_vjp(gb: torch.Tensor, bt: torch.Tensor, floor: float, exact: bool = False) -> torch.Tensor:
    """Adjoint of ``b_t = max(x - max_j x, -floor)`` (``(b, N [+ 1], M)``, parents on dim 1) given ``G_b`` and
    ``b_t``: ``G_y = G_b [b_t > -floor]``, ``G_x = G_y - [b_t = 0] / #[b_t = 0] sum_j G_y`` (torch's ``amax``
    splits its gradient evenly over ties). When nothing is clamped ``sum_j G_b = 0`` exactly in real arithmetic
    (softmax backward, and the same for the carried ``G_x``), so the max's term is round-off and skipped
    (``exact``: taken anyway; the tests check that both agree with autograd)."""
    if not exact and not bool((bt <= -floor).any()):
        return gb
    gy = gb * (bt > -floor)  # clamp_min: no gradient where clamped
    is_max = bt == 0
    return gy - is_max * (gy.sum(1, keepdim=True) / is_max.sum(1, keepdim=True))


class _AdjointRouting(torch.autograd.Function):
    """``dynamic_routing(FactoredVotes(u, W), gradient="all")`` over chunks of the batch, with a hand-derived
    backward through every pass.

    Forward, per chunk: form the votes ``U = u W`` (parent-major) into a reused buffer and route without a graph
    (:func:`_route_formed`), keeping the small per-pass tensors (``s_t + beta``, ``v_t`` ``(b, N, D)``, the
    couplings ``C_t`` and the renormalized logits ``b_t`` ``(b, N [+ 1], M)``: ``2 (r - 1) / D`` of the votes' size;
    replayed per chunk in backward instead when they would exceed ``_KEEP_BYTES``). Backward, per chunk:
    re-form ``U`` and run the adjoint of the passes in reverse (upstream ``G_v`` of pass ``t``; ``x_t`` the logits
    before renormalization, ``b_t = max(x_t - max_j x_t, -floor)``, ``C_t = softmax_j b_t``,
    ``x_{t+1} = decay b_t + lambda a_t``):

        G_s = squash'(s_t)^T G_v;   G_beta += G_s;   dL/dU_ij += c_t,ij G_s,j
        G_c,ij = <U_ij, G_s,j>;     G_b = C_t (G_c - <C_t, G_c>_j) + decay G_x(t+1)
        G_y = G_b [b_t > -floor];   G_x(t) = G_y - [b_t = 0] / #[b_t = 0] sum_j G_y     (clamp, subtracted max)
        G_a(t-1) = lambda G_x(t);   dL/dU_ij += G_a,ij v_t-1,j;   G_v(t-1) = sum_i G_a,ij U_ij

    (the leak's logit enters the softmax, the max and the clamp; its agreement is the constant 0). Two batched
    matrix-vector passes over ``U`` per inner pass; the ``2 r - 1`` rank-one terms of ``dL/dU`` are summed by one
    batched product (parent-major, into the votes' buffer), then back-propagated through ``U = u W`` (two batched
    products) a block of children at a time, each block copied child-major while in cache. The derivative autograd
    takes through every pass (the subtracted max and the clamp included), without autograd's replay of the forward.
    """

    @staticmethod
    def forward(ctx, u, wi, bias, parents, init, passes, step, leaky, decay, lam, floor, keep):
        B, M, _ = u.shape
        D = wi.shape[2] // parents
        workspace: dict = {}
        v = torch.empty(B, parents, D, dtype=u.dtype, device=u.device)
        c_out = torch.empty(B, M, parents, dtype=u.dtype, device=u.device)
        records = []
        with torch.no_grad():
            for sl in _batch_chunks(B, step):
                formed = form_parent_major(u[sl], wi, parents, workspace)
                _, v[sl], c, rec = _route_formed(formed, passes, leaky=leaky, bias=_rows(bias, sl),
                                                 decay=_rows(decay, sl), lam=_rows(lam, sl), init=_rows(init, sl),
                                                 floor=floor, keep=keep)
                c_out[sl] = c[:, :parents].transpose(1, 2)
                records.append(rec if keep else None)
        ctx.save_for_backward(u, wi, bias)
        ctx.rest = (parents, init, passes, step, leaky, decay, lam, floor, workspace, records)
        ctx.mark_non_differentiable(c_out)
        return v, c_out

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _):
        u, wi, bias = ctx.saved_tensors
        parents, init, passes, step, leaky, decay, lam, floor, workspace, records = ctx.rest
        B = u.shape[0]
        M, K, ND = wi.shape
        N, D = parents, ND // parents
        need_u, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        g_u = torch.empty_like(u) if need_u else None
        g_wi = torch.zeros_like(wi) if need_w else None  # (M, K, N D), accumulated over the chunks
        g_bias = torch.zeros_like(bias) if need_bias else None
        for k, sl in enumerate(_batch_chunks(B, step)):
            b = sl.stop - sl.start
            dec, la = _rows(decay, sl), _rows(lam, sl)
            with torch.no_grad():
                formed = form_parent_major(u[sl], wi, parents, workspace)
                rec = records[k]
                if rec is None:  # not kept: replay this chunk's passes (no graph)
                    rec = _route_formed(formed, passes, leaky=leaky, bias=_rows(bias, sl), decay=dec, lam=la,
                                        init=_rows(init, sl), floor=floor, keep=True)[3]
                records[k] = None  # free as we go
                sb, vs, cs, bs = rec
                U = formed.u_pm.view(b * N, M, D)
                gv, gx = g[sl], None
                left, right = [], []
                for t in range(passes - 1, -1, -1):
                    gs = _squash_vjp(sb[t], gv)  # (b, N, D)
                    if need_bias:
                        if bias.ndim == 2:
                            g_bias += gs.sum(0)
                        else:
                            g_bias[sl] += gs
                    c_t = cs[t]  # (b, N [+ 1], M)
                    left.append(c_t[:, :N].reshape(b * N, 1, M))
                    right.append(gs.view(b * N, 1, D))
                    if t == 0:
                        break  # the initial logits are constants
                    gc = torch.bmm(gs.view(b * N, 1, D), U.transpose(1, 2)).view(b, N, M)
                    if leaky:
                        gc = torch.cat([gc, gc.new_zeros(b, 1, M)], 1)
                    gb = c_t * (gc - (c_t * gc).sum(1, keepdim=True))  # softmax backward
                    if gx is not None:
                        gb = gb + (gx if dec is None else dec * gx)
                    gx = _renormalization_vjp(gb, bs[t - 1], floor)
                    ga = (gx[:, :N] if la is None else la * gx[:, :N]).reshape(b * N, 1, M)
                    left.append(ga)
                    right.append(vs[t - 1].view(b * N, 1, D))
                    gv = torch.bmm(ga, U).view(b, N, D)  # G_v(t-1) = sum_i G_a,ij U_ij
                # dL/dU = the sum of the rank-one terms: one batched product into the votes' parent-major buffer (free
                # now), then back through U = u W a block of children at a time, copied child-major (M, b, N D) while
                # in cache, as the votes were formed (a product written straight into the strided child-major view
                # ran one small product per (b, j): 0.91x the call's time this way, 40 interleaved rounds)
                g_pm = formed.u_pm.view(b * N, M, D)
                torch.bmm(torch.cat(left, 1).transpose(1, 2), torch.cat(right, 1), out=g_pm)
                for blk in _child_blocks(M, b * ND):
                    g_cm = workspace_buffer(workspace, "cm", (blk.stop - blk.start, b, ND), wi)
                    g_cm.view(-1, b, N, D).copy_(g_pm.view(b, N, M, D)[:, :, blk].permute(2, 0, 1, 3))
                    if need_u:
                        g_u[sl, blk] = torch.bmm(g_cm, wi[blk].transpose(1, 2)).transpose(0, 1)  # (b, mi, K)
                    if need_w:
                        g_wi[blk].baddbmm_(u[sl, blk].permute(1, 2, 0), g_cm)  # sum_b u[b, i]^T dL/dU[b, i]
        return g_u, g_wi, g_bias, None, None, None, None, None, None, None, None, None

def _batch_chunks(batch: int, step: int) -> list[slice]:
    return [slice(b0, min(b0 + step, batch)) for b0 in range(0, batch, step)]


def _rows(x: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    """The samples ``sl`` of a per-sample tensor (``(B, ...)``); a shared ``(N, D)`` bias and None pass through."""
    return x if x is None or x.ndim == 2 else x[sl]


def _adjoint_routing(votes: FactoredVotes, iterations: int, *, bias: torch.Tensor | None, initial_logits,
                     leaky: bool, routing: str, tau: Any, step: Any):
    """``dynamic_routing(..., gradient="all")`` for votes too large to keep: over chunks of the batch, each chunk's
    votes formed once and routed, with the hand-derived backward of :class:`_AdjointRouting`. The forward keeps
    ``u``, ``weight``, ``bias`` and the small per-pass tensors; the backward re-forms one chunk's votes at a time.
    Values and gradients are those of autograd through every pass (up to rounding); memory is one chunk's votes
    (``_CHUNK_BYTES``) and their gradient instead of all the votes and one gradient per map."""
    B, N, M, D = votes.batch, votes.parents, votes.children, votes.dim
    passes = max(iterations, 1)
    tau_b, step_b, decay, lam, _, _ = _update_rule(votes, routing, tau, step, None)
    kept = ((2 * passes - 1) * (N + int(leaky)) * M + 2 * passes * N * D) * B * votes.dtype.itemsize
    wi = votes.child_major_weight()  # formed once with gradient (backward: one accumulated gradient)
    v, c = _AdjointRouting.apply(votes.u, wi, bias, N, initial_logits, passes, _chunk_size(votes), leaky,
                                 _per_sample(decay, 1), _per_sample(lam, 1), _logit_floor(votes.dtype),
                                 kept <= _KEEP_BYTES)
    info = RoutingInfo(iterations=passes, converged=False, residuals=[], couplings=c, tau=tau_b, step=step_b)
    return v, info


def _compiled_call(votes: Votes, iterations: int, *, gradient: str, leaky: bool, bias: torch.Tensor | None,
                   routing: str, tau: Any, step: Any, initial_logits: torch.Tensor | None):
    """``backend="compiled"``: the untraced fixed-pass call as one compiled graph (same formulas, same order)."""
    from proxnets.capsules.compiled import compiled_routing

    tau_b, step_b, decay, lam, _, _ = _update_rule(votes, routing, tau, step, None)
    if isinstance(votes, FactoredVotes):
        u, weight = votes.u, votes.weight
    else:
        u, weight = votes.dense(), None
    v, c = compiled_routing(u, weight, iterations=iterations, gradient=gradient, leaky=leaky, bias=bias,
                            decay=_per_sample(decay, 1), lam=_per_sample(lam, 1), initial_logits=initial_logits,
                            floor=_logit_floor(votes.dtype), chunk_bytes=_CHUNK_BYTES)
    if gradient == "last":  # v holds s (bias excluded); the output pass with gradients, couplings constant
        if isinstance(votes, FactoredVotes):
            s = votes.combine_given(c, v)  # the value computed, gradients through the factored maps
        else:
            s = votes.combine(c)
        v = squash(s if bias is None else s + bias)
    info = RoutingInfo(iterations=max(iterations, 1), converged=False, residuals=[], couplings=c.contiguous(),
                       tau=tau_b, step=step_b)
    return v, info


AUTO_TAU_FACTOR = 2.0
"""``tau = "auto"``: twice the convexity threshold, so ``mu = tau / 2`` and, with ``lambda = 1 / tau``, the
objective gap falls at least by half per pass (asymptotically)."""


def _regularization(votes: Votes, routing: str, tau: Any, step: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(tau, lambda)`` of shape ``(B,)``: ``(0, 1)`` for standard routing."""
    B, dtype, device = votes.batch, votes.dtype, votes.device
    if routing == "standard":
        if tau is not None or step is not None:
            fail("tau", 'None with routing="standard" (tau and step belong to routing="regularized")', tau)
        return torch.zeros(B, dtype=dtype, device=device), torch.ones(B, dtype=dtype, device=device)
    if tau is None or (isinstance(tau, str) and tau == "auto"):
        tau_b = (AUTO_TAU_FACTOR * convexity_threshold(votes)).clamp_min(1e-12).to(dtype)
    else:
        tau_b = torch.full((B,), check_number("tau", tau, low=0.0, low_inclusive=False), dtype=dtype, device=device)
    if step is None:
        return tau_b, 1 / tau_b
    lam = torch.full((B,), check_number("step", step, low=0.0, low_inclusive=False), dtype=dtype, device=device)
    if bool((lam * tau_b > 1 + 1e-12).any()):
        fail("step", f"0 < step * tau <= 1 (tau = {float(tau_b.max()):.4g})", step)
    return tau_b, lam
