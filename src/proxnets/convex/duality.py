"""CCNN's convex program, its dual and the duality gap (the library's convention).

Data: features ``Z_i`` of shape ``(P, D)`` (:mod:`proxnets.convex.features`), labels ``y_i`` in
``{0..K-1}``, ``i = 1..n``. Parameter: ``Theta`` of shape ``(D, K P)``, column ``k P + p`` holding the
weights of class ``k`` at pooled position ``p``. Scores and their adjoint (the map ``A`` and ``A^*``):

    u_ik = [A Theta]_ik = sum_p <Z_i[p], Theta[:, k P + p]>          (scores, (n, K))
    [A^* C][:, k P + p] = sum_i C_ik Z_i[p]                         (C of shape (n, K))

A CNN with ``r`` filters ``W (D, r)`` and a linear head has ``Theta = W H``: rank ``r``. CCNN relaxes
the rank to the nuclear norm. With the mean multinomial logistic loss
``L(Theta) = (1/n) sum_i [logsumexp(u_i) - u_{i y_i}]``:

    regularized primal   F(Theta) = L(Theta) + lam |Theta|_*
    constrained primal   F(Theta) = L(Theta)   s.t. |Theta|_* <= R

Dual (our derivation, verified by the tests). ``logsumexp(u) = max_{p in simplex} <p, u> + H(p)``
with the entropy ``H(p) = -sum_k p_k log p_k``, so with ``P`` (n, K) rows on the simplex and
``E`` the one-hot labels, the dual matrix

    M(P) = A^*(E - P) / n        ( = -grad L(Theta) when P = softmax(A Theta) )

gives, by exchanging min and max (Sion),

    regularized dual   D(P) = (1/n) sum_i H(p_i)                 s.t.  |M(P)|_2 <= lam
    constrained dual   D(P) = (1/n) sum_i H(p_i) - R |M(P)|_2     (no constraint)

Weak duality ``F(Theta) >= D(P)`` holds for every feasible pair; the gap ``F - D`` certifies
optimality. Any ``P`` on the simplex is made dual-feasible for the regularized problem by shrinking
towards the labels, ``P_s = (1 - s) E + s P`` with ``s = min(1, lam / |M(P)|_2)``, because
``M(P_s) = s M(P)`` and ``E`` is feasible (``M(E) = 0``). KKT: at the optimum ``p_i = softmax(u_i)``
and ``M(P*) in lam d|Theta*|_*``: the left singular vectors of ``Theta*`` (the filters) span the
singular subspace of ``M(P*)`` whose singular values equal ``lam``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "scores",
    "scores_adjoint",
    "entropy",
    "logistic_loss",
    "spectral_norm",
    "shrink_to_feasible",
    "regularized_dual_value",
    "constrained_dual_value",
]


def _flat_theta(theta: torch.Tensor, n_positions: int) -> torch.Tensor:
    d, kp = theta.shape
    k = kp // n_positions
    return theta.reshape(d, k, n_positions).permute(2, 0, 1).reshape(n_positions * d, k)  # (P D, K)


def _unflat(g: torch.Tensor, npos: int, d: int, k: int) -> torch.Tensor:
    """``(P D, K)`` -> ``(D, K P)``: the layout of ``Theta``, the inverse of :func:`_flat_theta`."""
    return g.reshape(npos, d, k).permute(1, 2, 0).reshape(d, k * npos)


def scores(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``A Theta`` on a chunk: ``z (b, P, D)``, ``theta (D, K P)`` -> ``(b, K)``."""
    b, p, d = z.shape
    return z.reshape(b, p * d) @ _flat_theta(theta, p)


def scores_adjoint(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``A^* C`` on a chunk: ``z (b, P, D)``, ``c (b, K)`` -> ``(D, K P)``."""
    b, p, d = z.shape
    k = c.shape[1]
    return _unflat(z.reshape(b, p * d).T @ c, p, d, k)  # (P D, K) -> (D, K P)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Row entropies ``H(p_i) = -sum_k p_ik log p_ik`` (``0 log 0 = 0``): ``(n, K) -> (n,)``."""
    return -torch.special.xlogy(p, p).sum(-1)


def logistic_loss(u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over rows of ``logsumexp(u_i) - u_{i y_i}`` (the caller divides by ``n``)."""
    return F.cross_entropy(u, y, reduction="sum")


def spectral_norm(m: torch.Tensor) -> float:
    """``|M|_2`` exactly (largest singular value, in float64: it decides dual feasibility)."""
    return float(torch.linalg.svdvals(m.double())[0])


def shrink_to_feasible(p: torch.Tensor, y: torch.Tensor, s: float) -> torch.Tensor:
    """``(1 - s) E + s P`` for one-hot ``E`` of ``y``."""
    out = s * p
    out[torch.arange(len(y), device=y.device), y] += 1.0 - s
    return out


def regularized_dual_value(p: torch.Tensor, y: torch.Tensor, m_norm: float, lam: float) -> tuple[float, float]:
    """``(D(P_s), s)``: the dual value of ``P`` shrunk to feasibility; ``m_norm = |M(P)|_2``."""
    s = 1.0 if m_norm <= lam else lam / m_norm
    ps = shrink_to_feasible(p.double(), y, s)
    return float(entropy(ps).mean()), s


def constrained_dual_value(p: torch.Tensor, m_norm: float, radius: float) -> float:
    """``D(P) = mean_i H(p_i) - R |M(P)|_2`` for the constrained problem."""
    return float(entropy(p.double()).mean()) - radius * m_norm
