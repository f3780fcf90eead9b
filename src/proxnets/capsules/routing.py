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
from proxnets.capsules.votes import (FactoredVotes, ParentMajorVotes, Votes, as_votes, form_parent_major,
                                     workspace_buffer)
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
      routing the real parents' columns only).

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


def _softmax_couplings(logits: torch.Tensor, leaky: bool, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Couplings from parent-major logits ``(N [+ 1], B, M)``: softmax over the parents (dim 0).

    Returns ``(c, c_full)``; with ``leaky`` the last row of the logits is the leak (its logit never
    changes from 0) and ``c`` drops it. (Parent-major because a softmax over a short last axis is
    slow on CPU.) ``dim = 2`` (the children) is only the broken variant ``"softmax-over-children"``.
    """
    full = torch.softmax(logits, dim=dim)
    return (full[:-1] if leaky else full), full


def _bmn(c: torch.Tensor) -> torch.Tensor:
    return c.permute(1, 2, 0)  # parent-major (N, B, M) -> logical (B, M, N) view


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
    _out: dict | None = None,
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
        _out: (internal, the chunked paths) a dict that receives ``"s"``, the output pass's
            ``sum_i c_ij u_hat_ij`` ``(B, N, D)`` without the bias, and ``"c_pm"``, its couplings parent-major
            ``(N, B, M)``: what the caller would otherwise recompute.

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
    passes = max(iterations, 1)
    measure = trace or tol is not None
    outer_grad = torch.is_grad_enabled()
    detached = gradient == "last"
    if backend == "compiled" and not measure and _broken is None and _out is None:
        return _compiled_call(votes, iterations, gradient=gradient, leaky=leaky, bias=bias, routing=routing, tau=tau,
                              step=step, initial_logits=initial_logits)
    if isinstance(votes, FactoredVotes) and passes > 1:
        # The passes read the same votes 2r - 1 times: form them once, parent-major (ParentMajorVotes), when they
        # fit in _MATERIALIZE_BYTES; otherwise route cache-sized chunks of the batch (same result, per sample).
        if votes.batch * votes.parents * votes.children * votes.dim * votes.dtype.itemsize <= _MATERIALIZE_BYTES:
            if detached or not outer_grad:
                with torch.no_grad():
                    inner = votes.parent_major()  # the final pass keeps the factored votes (gradients, memory)
            elif _FORMED_ADJOINT and not measure and _broken is None and _out is None:
                if initial_logits is not None:
                    check_tensor("initial_logits", initial_logits, shape=(votes.batch, votes.children, votes.parents))
                return _adjoint_routing(votes, iterations, leaky=leaky, bias=bias, routing=routing, tau=tau, step=step,
                                        initial_logits=initial_logits, mute_threshold=mute_threshold, _broken=None)
            else:
                votes = inner = votes.parent_major()  # autograd through every pass; keeps B N M D numbers
        elif tol is None and not trace and (detached or not outer_grad or _broken is None):
            if initial_logits is not None:
                check_tensor("initial_logits", initial_logits, shape=(votes.batch, votes.children, votes.parents))
            # (a broken variant with gradients through every pass takes the generic path below: tests only)
            chunked = _chunked_routing if detached or not outer_grad else _adjoint_routing
            return chunked(votes, iterations, leaky=leaky, bias=bias, routing=routing, tau=tau, step=step,
                           initial_logits=initial_logits, mute_threshold=mute_threshold, _broken=_broken)
        else:
            inner = votes.detach() if detached else votes
    else:
        inner = votes.detach() if detached else votes
    axis = 2 if _broken == "softmax-over-children" else 0  # parent-major logits: dim 0 = parents
    sign = -1.0 if _broken == "negative-update" else 1.0
    tau_b, step_b_ = _regularization(inner if isinstance(inner, ParentMajorVotes) else votes, routing, tau, step)
    inner_bias = None if bias is None else (bias.detach() if detached else bias)
    inner_mode = torch.no_grad() if detached else contextlib.nullcontext()
    regularized = routing == "regularized"
    if regularized:  # (standard routing needs none of these: fewer small ops per call)
        decay = (1 - (-1 if _broken == "anti-regularized" else 1) * step_b_ * tau_b)[None, :, None]  # 1 - lambda tau
        lam = step_b_[None, :, None]
        tau_pm = tau_b[None, :, None]

    last_sum: list[torch.Tensor] = []

    def combine(vs: Votes, c: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
        s_ = vs.combine(_bmn(c))  # (B, N, D)
        if _out is not None:
            last_sum[:] = [s_]  # the last call is the output pass (its couplings are those reported)
        return s_ if beta is None else s_ + beta

    # b, parent-major (N, B, M) plus the leak's row; reset for every call
    logits = torch.zeros(N + int(leaky), B, M, dtype=votes.dtype, device=votes.device)
    if initial_logits is not None:
        init = check_tensor("initial_logits", initial_logits, shape=(B, M, N))
        logits[:N] = init.detach().to(votes.dtype).permute(2, 0, 1)
    floor = _logit_floor(votes.dtype)
    c, c_full = _softmax_couplings(logits, leaky, axis)
    log_c = torch.log_softmax(logits, dim=axis) if trace else None
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in RoutingInfo.TRACE_FIELDS}
    residuals: list[float] = []
    converged = False
    s = v = None
    s_has_grad = False
    for t in range(passes):
        final = t == passes - 1 and not measure
        if final and detached:
            # The last pass of the classic procedure: the only one gradients go through.
            with torch.set_grad_enabled(outer_grad):
                s = combine(votes, c, bias)
            s_has_grad = True
        else:
            with inner_mode:
                s = combine(inner, c, inner_bias)
            s_has_grad = not detached
        v = squash(s)  # (B, N, D)
        if trace:
            with torch.no_grad():
                cf_, lc_ = c_full.detach(), log_c.detach()
                energy = _energy_of(s.detach())
                stats["energy"].append(energy)
                stats["objective"].append(energy + tau_b * (cf_ * lc_).sum((0, 2)))
                stats["entropy"].append(-torch.special.xlogy(cf_, cf_).sum(0).mean(-1))
                stats["max_coupling"].append(cf_.amax(0).mean(-1))
                stats["min_log_coupling"].append(lc_.amin((0, 2)))
                stats["muted"].append((capsule_length(v.detach()) < mute_threshold).to(s.dtype).mean(-1))
                stats["row_sum_error"].append((cf_.sum(0) - 1).abs().amax(-1))
        if final or iterations == 0:
            break
        with inner_mode:
            agreement = inner.agree(v).permute(2, 0, 1)  # a = -grad E(C), (N, B, M)
            if leaky:
                agreement = torch.cat([agreement, agreement.new_zeros(1, B, M)])  # the leak's gradient is 0
            if trace:
                a, cf = agreement.detach(), c_full.detach()  # (N [+ 1], B, M)
                q = a - tau_pm * log_c.detach() if regularized else a  # -grad F up to a row constant
                stats["kkt_gap"].append((q.amax(0) - (cf * q).sum(0)).sum(-1))  # (B,)
            if regularized:
                logits = decay * logits + (sign * lam) * agreement  # b <- (1 - lambda tau) b + lambda a
            else:
                logits = logits + sign * agreement  # b <- b - grad E(C)
            if torch.is_grad_enabled():
                logits = (logits - logits.amax(axis, keepdim=True)).clamp_min(-floor)  # same softmax; no subnormals
            else:  # nothing is saved for backward: in place, no new (N, B, M) buffers
                logits.sub_(logits.amax(axis, keepdim=True)).clamp_min_(-floor)
            c_next, c_next_full = _softmax_couplings(logits, leaky, axis)
        if measure:
            moved = (c_next_full - c_full).detach().abs().amax((0, 2))  # (B,)
            residuals.append(float(moved.max()))
            if trace:
                stats["change"].append(moved)
                log_next = torch.log_softmax(logits.detach(), dim=axis)
                diff = log_next - log_c
                # KL(C'||C) and KL(C||C') from logs (couplings underflow in linear space)
                kl_fwd = (c_next_full.detach() * diff).sum((0, 2))
                kl_bwd = -(cf * diff).sum((0, 2))
                stats["sym_kl"].append(kl_fwd + kl_bwd)
                stats["decrease_bound"].append((1 / step_b_ - tau_b) * kl_fwd + kl_bwd / step_b_)
                log_c = log_next
            if tol is not None and residuals[-1] < tol:
                converged = True
                break
        if t == passes - 1:
            break
        c, c_full = c_next, c_next_full

    if detached and not s_has_grad and outer_grad:
        s = combine(votes, c, bias)  # re-run the final pass with gradients to the votes
        v = squash(s)
    for name in ("change", "sym_kl", "kkt_gap", "decrease_bound"):
        if trace and len(stats[name]) < len(stats["energy"]):
            stats[name].append(torch.full((B,), math.nan, dtype=votes.dtype, device=votes.device))
    if _out is not None:
        _out["s"], _out["c_pm"] = last_sum[0], c
    info = RoutingInfo(
        iterations=len(stats["energy"]) if trace else min(passes, t + 1),
        converged=converged,
        residuals=residuals,
        couplings=_bmn(c).detach() if _out is not None else _bmn(c).detach().contiguous(),  # _out: the caller copies
        tau=tau_b, step=step_b_,
        **({k: torch.stack(val) for k, val in stats.items()} if trace else {}),
    )
    if tol is not None:
        handle_nonconvergence(info, policy, "dynamic routing")
    return v, info


_MATERIALIZE_BYTES = 32 << 20
"""Factored votes up to this size (``B N M D`` numbers) are formed once per routing call (the suite's models:
2.3 MB at batch 25); larger batches are routed in chunks of ``_CHUNK_BYTES``."""
_CHUNK_BYTES = 8 << 20  # one chunk's votes stay in the last-level cache while its passes run (2-16 MB measured)


def _chunked_routing(votes: FactoredVotes, iterations: int, *, bias: torch.Tensor | None, initial_logits, **options):
    """``dynamic_routing`` without gradients through the passes, over chunks of the batch: each chunk's votes are
    formed once (:meth:`FactoredVotes.parent_major`) and routed; the output pass uses the factored votes, so
    gradients reach ``u`` and ``weight`` without the ``(B, M, N, D)`` votes ever existing in full."""
    B = votes.batch
    per_sample = votes.parents * votes.children * votes.dim * votes.dtype.itemsize
    step = max(1, min(B, _CHUNK_BYTES // per_sample))
    N, M, D = votes.parents, votes.children, votes.dim
    # each chunk's output-pass couplings (parent-major, the layout of the backward kernels) and sums land here
    c_pm = torch.empty(N, B, M, dtype=votes.dtype, device=votes.device)
    sums = torch.empty(B, N, D, dtype=votes.dtype, device=votes.device)
    taus, steps = [], []
    workspace: dict = {}  # every chunk's votes in the same two buffers (votes.workspace_buffer)
    with torch.no_grad():
        wi = votes.child_major_weight()
        for sl in _batch_chunks(B, step):
            formed = form_parent_major(votes.u[sl], wi, votes.parents, workspace)
            out: dict = {}
            _, info = dynamic_routing(formed, iterations, gradient="last", bias=_rows(bias, sl),
                                      initial_logits=_rows(initial_logits, sl), _out=out, **options)
            c_pm[:, sl] = out["c_pm"]
            sums[sl] = out["s"]  # the output pass's s, bias excluded (not recomputed)
            taus.append(info.tau)
            steps.append(info.step)
    c = c_pm.permute(1, 2, 0)  # (B, M, N) view: the couplings of the output pass
    s = votes.combine_given(c, sums)  # gradients to u and weight through the factored maps
    v = squash(s if bias is None else s + bias)
    info = RoutingInfo(iterations=max(iterations, 1), converged=False, residuals=[], couplings=c.contiguous(),
                       tau=torch.cat(taus), step=torch.cat(steps))
    return v, info


def _route_formed(votes: ParentMajorVotes, passes: int, *, leaky: bool, bias: torch.Tensor | None,
                  decay: torch.Tensor | None, lam: torch.Tensor | None, init: torch.Tensor | None, floor: float,
                  keep: bool):
    """The ``passes`` of standard/regularized routing on formed votes, without autograd: the formulas of the eager
    loop of :func:`dynamic_routing` in the same order, with the logits batch-major ``(b, N [+ 1], M)`` (each
    agreement comes out of its product in that layout: no transposing copies). ``decay``/``lam`` ``(b, 1, 1)``
    (None: ``b <- b + a``). Returns ``(v, c, record)``: the output ``v (b, N, D)``, the output pass's couplings
    ``(b, N [+ 1], M)`` and, with ``keep``, what :class:`_AdjointRouting` needs to run the passes backwards:
    per pass ``s_t + beta`` and ``v_t`` ``(b, N, D)`` and ``C_t``, and the renormalized logits ``b_t`` of the passes
    ``t >= 1``."""
    b, N, M, D = votes.u_pm.shape
    U = votes.u_pm.view(b * N, M, D)
    logits = torch.zeros(b, N + int(leaky), M, dtype=votes.dtype, device=votes.device)
    if init is not None:
        logits[:, :N] = init.permute(0, 2, 1)
    c = torch.softmax(logits, dim=1)
    sb, vs, cs, bs = [], [], [], []
    for t in range(passes):
        s = torch.bmm(c[:, :N].reshape(b * N, 1, M), U).view(b, N, D)  # s_j = sum_i c_ij u_hat_ij
        if bias is not None:
            s = s + bias
        v = squash(s)
        if keep:
            sb.append(s)
            vs.append(v)
            cs.append(c)
        if t == passes - 1:
            break
        agreement = torch.bmm(v.view(b * N, 1, D), U.transpose(1, 2)).view(b, N, M)  # a = -grad E(C)
        if leaky:
            agreement = torch.cat([agreement, agreement.new_zeros(b, 1, M)], 1)  # the leak's gradient is 0
        if decay is None:
            logits = logits + (agreement if lam is None else lam * agreement)
        else:
            logits = decay * logits + lam * agreement
        logits.sub_(logits.amax(1, keepdim=True)).clamp_min_(-floor)  # same softmax; no subnormals
        if keep:
            bs.append(logits)
        c = torch.softmax(logits, dim=1)
    return v, c, (sb, vs, cs, bs)


def _squash_vjp(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``(d squash / d s)^T g`` by autograd on the small ``(b, N, D)`` tensor (the same ops as the forward)."""
    with torch.enable_grad():
        x = s.detach().requires_grad_()
        (gs,) = torch.autograd.grad(squash(x), x, g)
    return gs


def _renormalization_vjp(gb: torch.Tensor, bt: torch.Tensor, floor: float) -> torch.Tensor:
    """Adjoint of ``b_t = max(x - max_j x, -floor)`` (``(b, N [+ 1], M)``, parents on dim 1) given ``G_b`` and
    ``b_t``: ``G_y = G_b [b_t > -floor]``, ``G_x = G_y - [b_t = 0] / #[b_t = 0] sum_j G_y`` (torch's ``amax``
    splits its gradient evenly over ties). When nothing is clamped ``sum_j G_b = 0`` exactly in real arithmetic
    (softmax backward, and the same for the carried ``G_x``), so the max's term is round-off and skipped
    (unless ``_EXACT_MAX_PATH``)."""
    if not _EXACT_MAX_PATH and not bool((bt <= -floor).any()):
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
    batched product written straight in the child-major layout, then back-propagated through ``U = u W`` (two
    batched products). The derivative autograd takes through every pass (the subtracted max and the clamp
    included), without autograd's replay of the forward.
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
                v[sl], c, rec = _route_formed(formed, passes, leaky=leaky, bias=_rows(bias, sl), decay=_rows(decay, sl),
                                              lam=_rows(lam, sl), init=_rows(init, sl), floor=floor, keep=keep)
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
                    _, _, rec = _route_formed(formed, passes, leaky=leaky, bias=_rows(bias, sl), decay=dec, lam=la,
                                              init=_rows(init, sl), floor=floor, keep=True)
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
                # dL/dU = the sum of the rank-one terms, written child-major (M, b, N D) as the votes were formed
                g_votes = workspace_buffer(workspace, "cm", (M, b, ND), wi)
                torch.bmm(torch.cat(left, 1).transpose(1, 2), torch.cat(right, 1),
                          out=g_votes.view(M, b * N, D).transpose(0, 1))
                if need_u:
                    g_u[sl] = torch.bmm(g_votes, wi.transpose(1, 2)).transpose(0, 1)  # (b, M, K)
                if need_w:
                    g_wi.baddbmm_(u[sl].permute(1, 2, 0), g_votes)  # sum_b u[b, i]^T dL/dU[b, i]
        return g_u, g_wi, g_bias, None, None, None, None, None, None, None, None, None

def _batch_chunks(batch: int, step: int) -> list[slice]:
    return [slice(b0, min(b0 + step, batch)) for b0 in range(0, batch, step)]


def _rows(x: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    """The samples ``sl`` of a per-sample tensor (``(B, ...)``); a shared ``(N, D)`` bias and None pass through."""
    return x if x is None or x.ndim == 2 else x[sl]


_FORMED_ADJOINT = False
"""Formed votes (the suite's models) with ``gradient="all"`` take autograd through the passes, not the adjoint: the
adjoint there saved 3% CPU on the quick suite (one paired run, within its noise) and moves every trained claim value
by float round-off (docs/capsules.md); True selects it (tested equal to autograd)."""
_KEEP_BYTES = 32 << 20  # the adjoint's per-pass tensors are kept up to this size, else replayed in backward
_EXACT_MAX_PATH = False  # tests: also take the subtracted max's (round-off) term when nothing is clamped


def _adjoint_routing(votes: FactoredVotes, iterations: int, *, bias: torch.Tensor | None, initial_logits,
                     leaky: bool, routing: str, tau: Any, step: Any, mute_threshold: float, _broken: None):
    """``dynamic_routing(..., gradient="all")`` for votes too large to keep: over chunks of the batch, each chunk's
    votes formed once and routed, with the hand-derived backward of :class:`_AdjointRouting`. The forward keeps
    ``u``, ``weight``, ``bias`` and the small per-pass tensors; the backward re-forms one chunk's votes at a time.
    Values and gradients are those of autograd through every pass (up to rounding); memory is one chunk's votes
    (``_CHUNK_BYTES``) and their gradient instead of all the votes and one gradient per map."""
    B, N, M, D = votes.batch, votes.parents, votes.children, votes.dim
    per_sample = N * M * D * votes.dtype.itemsize
    chunk = max(1, min(B, _CHUNK_BYTES // per_sample))
    passes = max(iterations, 1)
    tau_b, step_b = _regularization(votes, routing, tau, step)
    decay = lam = None
    if routing == "regularized":
        decay, lam = (1 - step_b * tau_b)[:, None, None], step_b[:, None, None]
    init = None if initial_logits is None else initial_logits.detach().to(votes.dtype)
    kept = ((2 * passes - 1) * (N + int(leaky)) * M + 2 * passes * N * D) * B * votes.dtype.itemsize
    wi = votes.child_major_weight()  # formed once with gradient (backward: one accumulated gradient)
    v, c = _AdjointRouting.apply(votes.u, wi, bias, N, init, passes, chunk, leaky, decay, lam,
                                 _logit_floor(votes.dtype), kept <= _KEEP_BYTES)
    info = RoutingInfo(iterations=passes, converged=False, residuals=[], couplings=c, tau=tau_b, step=step_b)
    return v, info

def _compiled_call(votes: Votes, iterations: int, *, gradient: str, leaky: bool, bias: torch.Tensor | None,
                   routing: str, tau: Any, step: Any, initial_logits: torch.Tensor | None):
    """``backend="compiled"``: the untraced fixed-pass call as one compiled graph (same formulas, same order)."""
    from proxnets.capsules.compiled import compiled_routing

    B, M, N = votes.batch, votes.children, votes.parents
    init = None
    if initial_logits is not None:
        init = check_tensor("initial_logits", initial_logits, shape=(B, M, N)).detach().to(votes.dtype)
    tau_b, step_b = _regularization(votes, routing, tau, step)
    decay = lam = None
    if routing == "regularized":
        decay, lam = (1 - step_b * tau_b)[:, None, None], step_b[:, None, None]
    if isinstance(votes, FactoredVotes):
        u, weight = votes.u, votes.weight
    else:
        u, weight = votes.dense(), None
    v, c = compiled_routing(u, weight, iterations=iterations, gradient=gradient, leaky=leaky, bias=bias, decay=decay,
                            lam=lam, initial_logits=init, floor=_logit_floor(votes.dtype),
                            chunk_bytes=_CHUNK_BYTES)
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
