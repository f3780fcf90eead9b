"""CCNN's primal solver: accelerated proximal / projected gradient with a duality gap.

Iteration (FISTA with adaptive restart), step ``1/L``, ``L = lambda_max(A^* A / n) / 2`` (the
Hessian of the mean logistic loss is at most half the Gram operator because
``diag(p) - p p^T <= I / 2``):

    Y_t       = Theta_t + b_t (Theta_t - Theta_{t-1})
    Theta_t+1 = prox(Y_t - grad L(Y_t) / L)

with ``prox`` the singular value thresholding at ``lam / L`` (regularized problem) or the projection
onto the nuclear ball of radius ``R`` (constrained problem). ``b_t = (k_{t-1} - 1) / k_t``,
``k_t = (1 + sqrt(1 + 4 k_{t-1}^2)) / 2``; ``k`` restarts at 1 when the objective increases.
Scores are linear in ``Theta``, so ``A Y_t`` comes from the stored ``A Theta_t`` and ``A Theta_{t-1}``:
one pass over the features per iteration computes ``F(Theta_t)``, the gradient at ``Y_t`` and the
dual certificate of ``Theta_t`` (``P = softmax(A Theta_t)``, see :mod:`proxnets.convex.duality`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from proxnets.convex.duality import (
    _flat_theta,
    _unflat,
    constrained_dual_value,
    logistic_loss,
    regularized_dual_value,
    spectral_norm,
)
from proxnets.convex.nuclear import project_l1_ball
from proxnets.convex.sources import check_problem_labels, gram_norm
from proxnets.utils.buffers import workspace_buffer
from proxnets.utils.convergence import IterInfo, handle_nonconvergence
from proxnets.utils.validation import check_int, check_number, fail

__all__ = ["GapTrace", "solve_primal", "one_hot", "nuclear_step"]


@dataclasses.dataclass
class GapTrace(IterInfo):
    """Per-iteration certificate of a CCNN solver (lists of length ``iterations``).

    - ``primal[t]``: ``F(Theta_t)``, the primal objective (mean loss + lam |Theta_t|_*, or mean loss).
    - ``dual[t]``: ``D(P_t)``, the dual value of the dual iterate made feasible (a lower bound of
      the optimum by weak duality).
    - ``residuals[t]``: the duality gap ``primal[t] - dual[t] >= 0``; ``converged`` when it is
      ``<= tol``.
    - ``rank[t]``: rank of ``Theta_t``; ``passes``: passes over the features (feature
      recomputations when streamed); ``gram_norm``: the ``lambda_max(A^* A / n)`` used for steps.
    """

    primal: list[float] = dataclasses.field(default_factory=list)
    dual: list[float] = dataclasses.field(default_factory=list)
    rank: list[int] = dataclasses.field(default_factory=list)
    passes: int = 0
    gram_norm: float = 0.0

    def record(self, primal: float, dual: float, rank: int, tol: float) -> bool:
        """Append one iterate's bounds; returns (and sets ``converged``) whether ``0 <= gap <= tol``
        (a negative gap breaks weak duality: never called converged)."""
        self.primal.append(primal)
        self.dual.append(dual)
        self.residuals.append(primal - dual)
        self.rank.append(rank)
        self.iterations += 1
        self.converged = 0.0 <= primal - dual <= tol
        return self.converged

    @property
    def gap(self) -> float:
        return self.residuals[-1] if self.residuals else math.inf


def one_hot(y: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(y, k).to(dtype)


def nuclear_step(a: torch.Tensor, lam: float | None, radius: float | None, step: float) -> tuple[torch.Tensor, float, int]:
    """``prox`` of the nuclear term at step ``step``: ``(Theta, |Theta|_*, rank)``."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    if lam is not None:
        s = (s - step * lam).clamp_min(0)
    elif s.sum() > radius:
        s = project_l1_ball(s, radius)
    keep = s > 0
    u, s, vh = u[:, keep], s[keep], vh[keep]
    return (u * s) @ vh, float(s.sum()), int(keep.sum())


def _check_problem(lam: float | None, radius: float | None) -> None:
    if (lam is None) == (radius is None):
        fail("lam/radius", "exactly one of lam (regularized) or radius (constrained)", (lam, radius))
    if lam is not None:
        check_number("lam", lam, low=0.0, low_inclusive=False)
    else:
        check_number("radius", radius, low=0.0, low_inclusive=False)


def solve_primal(
    source,
    y: torch.Tensor,
    n_classes: int,
    *,
    lam: float | None = None,
    radius: float | None = None,
    max_iter: int = 300,
    tol: float = 1e-3,
    theta0: torch.Tensor | None = None,
    lipschitz: float | None = None,
    on_nonconvergence: str = "warn",
    callback=None,
) -> tuple[torch.Tensor, GapTrace]:
    """Minimize the CCNN primal over ``Theta (D, K P)``; returns ``(Theta, GapTrace)``.

    ``source``: :class:`~proxnets.convex.sources.CachedFeatures` or ``StreamedFeatures``; ``y (n,)``
    labels; exactly one of ``lam`` / ``radius``; stops when the duality gap is ``<= tol``;
    ``callback(t, trace)`` after every iteration (progress display).
    """
    _check_problem(lam, radius)
    check_problem_labels(source, y, n_classes)
    check_int("max_iter", max_iter, low=1)
    check_number("tol", tol, low=0.0)
    n, k, p, d = source.n, n_classes, source.n_positions, source.dim
    info = GapTrace()
    info.gram_norm = gram_norm(source, k) if lipschitz is None else float(lipschitz) * 2
    step = 1.0 / (0.5 * 1.1 * info.gram_norm)
    sample = next(iter(source.chunks()))[1]
    theta = torch.zeros(d, k * p, dtype=sample.dtype, device=sample.device) if theta0 is None else theta0.clone()
    nuc = float(torch.linalg.svdvals(theta).sum()) if theta0 is not None else 0.0
    rank = int(torch.linalg.matrix_rank(theta)) if theta0 is not None else 0
    theta_prev, u_prev = theta, None
    momentum_k, prev_obj = 1.0, math.inf
    beta = 0.0
    # the pass works in the flat (P D, K) layout of the scores' GEMMs (as the dual solver's): Theta flattened
    # once per pass, M and grad unflattened once, each chunk's adjoint product in one reused buffer; the same
    # sums in the same order as scores / scores_adjoint per chunk, so bitwise the same values
    workspace: dict = {}
    for _ in range(max_iter):
        u_all = torch.empty(n, k, dtype=theta.dtype, device=theta.device)
        theta_flat = _flat_theta(theta, p)
        m_flat = torch.zeros(p * d, k, dtype=theta.dtype, device=theta.device)  # A^*(E - P_t) / n, flat
        grad_flat = torch.zeros_like(m_flat)  # grad L(Y_t), flat
        loss = 0.0
        for rows, z in source.chunks(workspace):  # each chunk is done with before the next is computed
            zf = z.reshape(z.shape[0], -1)  # (b, P D), a view
            u = zf @ theta_flat  # scores (b, K)
            u_all[rows] = u
            yb = y[rows]
            e = one_hot(yb, k, u.dtype)
            loss += float(logistic_loss(u, yb))
            m_flat += torch.mm(zf.T, e - torch.softmax(u, -1), out=workspace_buffer(workspace, "adjoint", m_flat.shape, m_flat))
            if beta > 0:
                uy = u + beta * (u - u_prev[rows])
                grad_flat += torch.mm(zf.T, torch.softmax(uy, -1) - e, out=workspace_buffer(workspace, "adjoint", m_flat.shape, m_flat))
        m, grad_y = _unflat(m_flat, p, d, k), _unflat(grad_flat, p, d, k)
        info.passes += 1
        m /= n
        grad_y = -m if beta == 0 else grad_y / n
        obj = loss / n + (lam * nuc if lam is not None else 0.0)
        p_t = torch.softmax(u_all, -1)
        mnorm = spectral_norm(m)
        dual = regularized_dual_value(p_t, y, mnorm, lam)[0] if lam is not None else constrained_dual_value(p_t, mnorm, radius)
        stop = info.record(obj, dual, rank, tol)
        if callback is not None:
            callback(info.iterations - 1, info)
        if stop:
            break
        if obj > prev_obj:  # adaptive restart: drop the momentum
            momentum_k = 1.0
        prev_obj = obj
        y_point = theta + beta * (theta - theta_prev)
        new_theta, nuc, rank = nuclear_step(y_point - step * grad_y, lam, radius, step)
        k_next = (1 + math.sqrt(1 + 4 * momentum_k**2)) / 2
        beta = (momentum_k - 1) / k_next
        momentum_k = k_next
        theta_prev, theta, u_prev = theta, new_theta, u_all
    handle_nonconvergence(info, on_nonconvergence, "CCNN primal solver (duality gap)")
    return theta, info
