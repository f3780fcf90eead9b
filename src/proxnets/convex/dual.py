"""DCCNN's solver: the dual of the regularized CCNN program by a primal-dual first-order method.

The dual (:mod:`proxnets.convex.duality`) is ``max_P (1/n) sum_i H(p_i)`` over rows ``p_i`` on the
simplex with ``|M(P)|_2 <= lam``, ``M(P) = A^*(E - P) / n``. Its spectral-norm constraint is the
conjugate of ``lam |.|_*``; we handle it through its Lagrange multiplier, which is the primal
``Theta`` itself, i.e. we solve the saddle problem

    min_Theta max_P  (1/n) sum_i [ <p_i - e_i, (A Theta)_i> + H(p_i) ] + lam |Theta|_*

by Chambolle-Pock with an entropic (KL) proximal step on the dual variable, accelerated by the
strong concavity of the entropy (the dual side is 1-strongly convex relative to KL):

    Theta_{t+1} = SVT_{tau lam}( Theta_t + tau M(Pbar_t) )
    p_i^{t+1}   = softmax( (beta u_i + log p_i^t) / (1 + beta) ),    u = A Theta_{t+1}
    th = 1 / sqrt(1 + 2 beta);  beta <- th beta;  tau <- tau / th
    Pbar_{t+1}  = P_{t+1} + th (P_{t+1} - P_t)

with ``tau beta Lbar <= 2`` for a proved bound ``Lbar >= lambda_max(A^* A / n)``.

Step size and convergence. This is the accelerated primal-dual method of Chambolle & Pock (2011,
Alg. 2; with Bregman distances, Chambolle & Pock 2016) with the dual rows ``P`` as the strongly
convex side: the KL step ``beta`` on ``P`` is ``n beta`` in the Bregman distance
``sum_i KL(p_i, p_i')``, and ``-(1/n) sum_i H(p_i)`` is ``1/n``-strongly convex relative to it
(``-H - KL(., q)`` is linear), which gives ``th = 1/sqrt(1 + 2 beta)``. The method converges (the
dual iterates at rate ``O(1/t^2)`` in KL) when ``tau (n beta) L^2 <= 1``, ``L`` the norm of the
coupling ``(1/n) sum_i <p_i, u_i>`` in the norms the Bregman distances are 1-strongly convex for:
``KL(p, q) >= |p - q|_1^2 / 2`` (Pinsker), so ``|P| = sqrt(sum_i |p_i|_1^2)`` on the dual side, the
Frobenius norm on ``Theta``. The method only ever pairs the coupling with differences of points of
the simplex product (or of its affine hull: the extrapolation ``Pbar``), whose rows sum to zero,
and for such a row ``d``: ``<d, u> = <d, u - c 1> <= |d|_1 (max u - min u) / 2``; with
``(max u - min u)^2 / 4 <= (max u^2 + min u^2) / 2 <= |u|^2 / 2`` and Cauchy-Schwarz over rows,
``L^2 <= |A|^2 / (2 n^2)``. Hence ``tau beta lambda_max(A^* A / n) <= 2`` suffices: twice the step
the Euclidean bound gives (measured: 287 -> 203 passes to gap 5e-3 at n = 1000). ``Lbar`` is the
proved bound of :class:`~proxnets.convex.sources.GramBound`, accumulated during the first pass
(``Theta_0 = 0`` makes that pass independent of ``tau``) from a basis of a 256-sample subsample:
no power-iteration estimate enters the step.

Certificate at every iteration: the lower bound ``D(P_s)`` of the dual iterate shrunk to
feasibility (``|M(P_s)|_2 <= lam`` by construction, ``|M|_2`` computed exactly), and the upper bound
``F(Theta_{t+1})`` of the primal recovered from the dual iterate. Weak duality makes their
difference a valid gap at every iterate, whatever the step sizes.
"""

from __future__ import annotations

import math

import torch

from proxnets.convex.duality import _flat_theta, _unflat, logistic_loss, regularized_dual_value, spectral_norm
from proxnets.convex.primal import GapTrace, nuclear_step, one_hot
from proxnets.convex.sources import GramBound, check_problem_labels, deflation_basis
from proxnets.utils.buffers import workspace_buffer
from proxnets.utils.convergence import handle_nonconvergence
from proxnets.utils.validation import check_int, check_number

__all__ = ["DualResult", "solve_dual"]


class DualResult:
    """The dual solution: ``p (n, K)`` dual rows, ``m (D, K P)`` = ``M(P)``, ``theta`` the multiplier."""

    def __init__(self, p: torch.Tensor, m: torch.Tensor, theta: torch.Tensor, m_norm: float):
        self.p, self.m, self.theta, self.m_norm = p, m, theta, m_norm


def solve_dual(
    source,
    y: torch.Tensor,
    n_classes: int,
    lam: float,
    *,
    max_iter: int = 300,
    tol: float = 1e-3,
    beta0: float = 1.0,
    accelerate: bool = True,
    gram: float | None = None,
    on_nonconvergence: str = "warn",
    callback=None,
    step_sign: float = 1.0,
    feasible_dual: bool = True,
    rtol: float = 0.0,
) -> tuple[DualResult, GapTrace]:
    """Solve the DCCNN dual; returns ``(DualResult, GapTrace)`` with the gap of every iterate.

    Stops when the gap is ``<= max(tol, rtol |F|)`` (absolute or relative tolerance);
    ``callback(t, trace)`` after every iteration (progress display). ``gram``: a proved upper
    bound of ``lambda_max(A^* A / n)`` (e.g. :func:`~proxnets.convex.sources.gram_bound`); ``None``
    computes one in the first pass (:class:`~proxnets.convex.sources.GramBound`). The step is
    ``tau = 2 / (beta0 gram)`` (see the module docstring); ``trace.gram_norm`` the bound used.

    ``step_sign`` and ``feasible_dual`` exist for the deliberately broken variants of
    ``proxnets reproduce convex`` and its tests (never change them otherwise):
    ``step_sign=-1`` moves the dual rows against the scores (a dual step of the wrong sign: the
    gap stays valid but does not close); ``feasible_dual=False`` records the value of the
    *unshrunk* dual iterate, which is not a lower bound (weak duality then fails).
    """
    check_problem_labels(source, y, n_classes)
    check_number("lam", lam, low=0.0, low_inclusive=False)
    check_int("max_iter", max_iter, low=1)
    check_number("tol", tol, low=0.0)
    check_number("beta0", beta0, low=0.0, low_inclusive=False)
    check_number("rtol", rtol, low=0.0)
    if step_sign not in (1.0, -1.0):
        raise ValueError(f"step_sign: expected 1 or -1, got {step_sign!r}")
    n, k, npos, d = source.n, n_classes, source.n_positions, source.dim
    info = GapTrace()
    if gram is not None:
        check_number("gram", gram, low=0.0, low_inclusive=False)
    acc = GramBound(deflation_basis(source), npos, d) if gram is None else None
    beta = beta0
    tau = math.nan  # set after the first pass, which does not use it (Theta_0 = 0)
    sample = next(iter(source.chunks()))[1]
    dtype, device = sample.dtype, sample.device
    p = torch.full((n, k), 1.0 / k, dtype=dtype, device=device)
    theta = torch.zeros(d, k * npos, dtype=dtype, device=device)
    nuc, rank, m_norm = 0.0, 0, math.nan
    m_bar = None  # M(Pbar_t); None before the first pass
    m_new = None  # M(P_t): after the first pass, the previous pass's M
    # scratch buffers of this fit's passes (the features of a chunk, the per-chunk adjoint): the same
    # few chunk-sized temporaries every chunk, without fresh pages each time; freed when the fit returns
    workspace: dict = {}
    for _ in range(max_iter):
        if m_bar is not None:
            theta, nuc, rank = nuclear_step(theta + tau * m_bar, lam, None, tau)
        th = 1.0 / math.sqrt(1.0 + 2.0 * beta) if accelerate else 1.0
        m_old = m_new
        # the pass works in the flat (P D, K) layout of the scores' GEMMs: Theta flattened once per pass
        # and M unflattened once (not per chunk, as scores / scores_adjoint do); the same sums in the same
        # order, so bitwise the values those functions give
        theta_flat = _flat_theta(theta, npos)
        m_flat = torch.zeros(npos * d, k, dtype=theta.dtype, device=theta.device)  # M(P_{t+1}), flat
        m0_flat = torch.zeros_like(m_flat) if m_old is None else None  # M(P_0), summed in the first pass only
        loss = 0.0
        for rows, z in source.chunks(workspace):  # each chunk is done with before the next is computed
            zf = z.reshape(z.shape[0], -1)  # (b, P D), a view
            u = zf @ theta_flat  # scores (b, K)
            yb = y[rows]
            loss += float(logistic_loss(u, yb))
            p_old = p[rows]
            p_next = torch.softmax((step_sign * beta * u + torch.log(p_old.clamp_min(1e-30))) / (1.0 + beta), dim=-1)
            e = one_hot(yb, k, dtype)
            m_flat += torch.mm(zf.T, e - p_next, out=workspace_buffer(workspace, "adjoint", m_flat.shape, m_flat))
            if m0_flat is not None:
                m0_flat += torch.mm(zf.T, e - p_old, out=workspace_buffer(workspace, "adjoint", m_flat.shape, m_flat))
                if acc is not None:
                    acc.add(z)
            p[rows] = p_next
        m_new = _unflat(m_flat, npos, d, k)
        if m0_flat is not None:
            m_old = _unflat(m0_flat, npos, d, k)
        if info.passes == 0:
            m_old /= n
            workspace.clear()  # not held while the bound's eigenvalue problems run (the peak of the fit's memory)
            info.gram_norm = acc.value() if acc is not None else float(gram)
            acc = None  # its (P, D, D) accumulators are freed before the second pass
            tau = 2.0 / (beta * info.gram_norm)  # tau beta Lbar = 2: the proved step (module docstring)
        info.passes += 1
        m_new /= n
        # M is linear in P: M(Pbar_{t+1}) = M(P_{t+1} + th (P_{t+1} - P_t)) = (1 + th) M(P_{t+1}) - th M(P_t),
        # from the previous pass's M(P_t): one adjoint product per pass instead of two
        m_bar = (1.0 + th) * m_new - th * m_old
        if accelerate:
            beta, tau = th * beta, tau / th
        if not (math.isfinite(loss) and math.isfinite(nuc) and bool(torch.isfinite(m_new).all())):
            info.diverged, info.stop_reason = True, f"non-finite scores or M(P) at pass {info.passes}"
            break  # nothing is recorded: no bound is claimed for a non-finite iterate
        m_norm = spectral_norm(m_new)
        primal = loss / n + lam * nuc
        # the shrunk dual point is feasible: |M(P_s)|_2 = s |M(P)|_2 <= lam (see duality.py)
        dual, _ = regularized_dual_value(p, y, m_norm, lam if feasible_dual else math.inf)
        finite = math.isfinite(primal) and math.isfinite(dual)
        stop = info.record(primal, dual, rank, max(tol, rtol * abs(primal))) and feasible_dual  # the broken variant runs its budget
        if callback is not None:
            callback(info.iterations - 1, info)
        if not finite:  # never "converged"; stop rather than iterate on NaN
            info.diverged, info.stop_reason = True, f"non-finite bounds at iteration {info.iterations} (primal {primal}, dual {dual})"
            break
        if stop:
            break
    handle_nonconvergence(info, on_nonconvergence, f"DCCNN dual solver (duality gap; lam={lam:g})")
    return DualResult(p, m_new, theta, m_norm), info
