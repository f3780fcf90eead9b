"""Recovery of a CNN with ``r`` filters and a linear head from the dual solution.

KKT (see :mod:`proxnets.convex.duality`): the optimal ``Theta*`` has its left singular vectors in
the singular subspace of ``M(P*)`` whose singular values equal ``lam``; the dual does not fix its
singular values. Recovery therefore

1. takes the filters ``W (D, r)`` = the top ``r`` left singular vectors of ``M(P*)``, ``r`` given or
   the number of singular values ``>= (1 - rtol) lam`` (the active part of the spectrum), at least
   the rank of the dual solver's multiplier ``Theta`` (which lies in that subspace at the optimum);
2. fits the head ``H (r, K P)`` by the small convex problem
   ``min_H L(W H) + lam |H|_*`` (``|W H|_* = |H|_*`` since ``W`` has orthonormal columns) on the
   reduced features ``Z_i W`` of shape ``(P, r)``, warm-started at ``W^T Theta``.

Every feasible ``W H`` is a primal point, so ``F(W H) - D(P*)`` is again a certified gap; its excess
over the dual's own gap is what the restriction to ``r`` filters costs.
"""

from __future__ import annotations

import dataclasses

import torch

from proxnets.convex.dual import DualResult
from proxnets.convex.duality import scores
from proxnets.convex.primal import GapTrace, solve_primal
from proxnets.convex.sources import CachedFeatures
from proxnets.utils.validation import check_int, check_number, check_tensor, fail

__all__ = ["Recovery", "active_rank", "reduced_features", "recover"]


@dataclasses.dataclass
class Recovery:
    """``filters (D, r)``, ``head (r, K P)``, ``theta = filters @ head``, the head solve's trace,
    ``objective`` = ``F(theta)``, ``agreement`` = fraction of training samples whose recovered
    prediction equals the dual's (argmax of ``P*``), ``tv`` = mean total variation
    ``(1/2) |softmax(u_i) - p_i*|_1``."""

    filters: torch.Tensor
    head: torch.Tensor
    trace: GapTrace
    objective: float
    agreement: float
    tv: float

    @property
    def theta(self) -> torch.Tensor:
        return self.filters @ self.head


def active_rank(singular_values: torch.Tensor, lam: float, rtol: float = 0.05) -> int:
    """Number of singular values ``>= (1 - rtol) lam`` (at least 1)."""
    return max(1, int((singular_values >= (1 - rtol) * lam).sum()))


def reduced_features(source, filters: torch.Tensor) -> torch.Tensor:
    """``Z_i W`` for every sample: ``(n, P, r)`` (the CNN's pooled filter responses)."""
    workspace: dict = {}  # each chunk's features are reduced before the next chunk is computed
    parts = [z @ filters for _, z in source.chunks(workspace)]
    workspace.clear()  # the chunk buffers are not held while the (n, P, r) result is assembled (peak memory)
    return torch.cat(parts)


def recover(
    source,
    y: torch.Tensor,
    n_classes: int,
    dual: DualResult,
    lam: float,
    *,
    n_filters: int | None = None,
    rtol: float = 0.05,
    max_iter: int = 300,
    tol: float = 1e-3,
    on_nonconvergence: str = "warn",
    filters: torch.Tensor | None = None,
) -> Recovery:
    """Filters and head from ``dual`` (see the module docstring).

    ``filters`` ``(D, r)`` with orthonormal columns replaces the dual's singular vectors (only the
    head is fitted): the deliberately broken variant of ``proxnets reproduce convex`` passes a
    random subspace to show that the recovery's choice of subspace matters.
    """
    check_number("lam", lam, low=0.0, low_inclusive=False)
    check_number("rtol", rtol, low=0.0, high=1.0)
    u, s, _ = torch.linalg.svd(dual.m, full_matrices=False)
    if filters is not None:
        check_tensor("filters", filters, ndim=2)
        if filters.shape[0] != u.shape[0]:
            fail("filters", f"a ({u.shape[0]}, r) matrix", f"shape {tuple(filters.shape)}")
        r = filters.shape[1]
    elif n_filters is None:
        r = max(active_rank(s, lam, rtol), int(torch.linalg.matrix_rank(dual.theta)))
    else:
        r = check_int("n_filters", n_filters, low=1)
        if r > s.numel():
            fail("n_filters", f"at most {s.numel()} (the feature dimension)", n_filters)
    filters = u[:, :r].contiguous() if filters is None else filters.to(u)  # (D, r)
    h = reduced_features(source, filters)  # (n, P, r)
    head0 = filters.T @ dual.theta  # (r, K P)
    head, trace = solve_primal(
        CachedFeatures(h), y, n_classes, lam=lam, max_iter=max_iter, tol=tol, theta0=head0,
        on_nonconvergence=on_nonconvergence,
    )
    u_rec = scores(h, head)  # (n, K)
    agreement = float((u_rec.argmax(1) == dual.p.argmax(1)).float().mean())
    tv = float(0.5 * (torch.softmax(u_rec, -1) - dual.p).abs().sum(1).mean())
    return Recovery(filters, head, trace, trace.primal[-1], agreement, tv)
