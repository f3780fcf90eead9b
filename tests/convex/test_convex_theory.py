"""The convex program and its dual: adjointness, weak duality at every iterate, strong duality
against an independent solver, KKT structure of the recovered filters."""

import numpy as np
import pytest
import scipy.optimize
import torch

from proxnets.convex.dual import solve_dual
from proxnets.convex.duality import entropy, logistic_loss, scores, scores_adjoint, shrink_to_feasible
from proxnets.convex.primal import solve_primal
from proxnets.convex.recovery import recover
from proxnets.convex.sources import CachedFeatures

N, P, D, K = 40, 3, 5, 3


def tiny_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % K
    z = torch.randn(N, P, D, generator=g, dtype=torch.float64)
    z[:, 0, :K] += 1.5 * torch.nn.functional.one_hot(y, K).double()  # a learnable signal
    return CachedFeatures(z, chunk=16), y


def factorized_optimum(z, y, lam):
    """Independent reference: min over U, V of L(U V^T) + lam (|U|^2 + |V|^2) / 2, by L-BFGS.

    ``|Theta|_* = min_{U V^T = Theta} (|U|_F^2 + |V|_F^2) / 2`` (full-rank factors), a smooth
    problem solved with a quasi-Newton method that shares no code with the library's solvers."""
    q = min(D, K * P)
    rng = np.random.default_rng(0)
    x0 = rng.normal(scale=0.1, size=(D + K * P) * q)

    def fun(x):
        t = torch.tensor(x, requires_grad=True)
        u, v = t[: D * q].reshape(D, q), t[D * q :].reshape(K * P, q)
        theta = u @ v.T  # (D, K P), column k P + p
        s = torch.einsum("npd,dkp->nk", z, theta.reshape(D, K, P))
        f = torch.nn.functional.cross_entropy(s, y) + lam * 0.5 * (u.pow(2).sum() + v.pow(2).sum())
        f.backward()
        return float(f.detach()), t.grad.numpy()

    res = scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", options=dict(maxiter=20000, gtol=1e-12, ftol=1e-15))
    return res.fun


def test_scores_adjoint_is_the_adjoint():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, P, D, generator=g, dtype=torch.float64)
    theta = torch.randn(D, K * P, generator=g, dtype=torch.float64)
    c = torch.randn(7, K, generator=g, dtype=torch.float64)
    assert torch.allclose((scores(z, theta) * c).sum(), (theta * scores_adjoint(z, c)).sum())
    # and the scores are tr(Z_i Theta_k) as in the paper's notation
    ref = torch.einsum("npd,dkp->nk", z, theta.reshape(D, K, P))
    assert torch.allclose(scores(z, theta), ref)


def test_dual_matrix_is_minus_the_gradient():
    src, y = tiny_problem()
    theta = torch.randn(D, K * P, dtype=torch.float64, requires_grad=True)
    loss = logistic_loss(scores(src.z, theta), y) / N
    loss.backward()
    p = torch.softmax(scores(src.z, theta.detach()), -1)
    m = scores_adjoint(src.z, torch.nn.functional.one_hot(y, K).double() - p) / N
    assert torch.allclose(m, -theta.grad)


@pytest.mark.parametrize("lam", [0.02, 0.2])
def test_strong_duality_against_independent_solver(lam):
    src, y = tiny_problem()
    ref = factorized_optimum(src.z, y, lam)
    res, info = solve_dual(src, y, K, lam, max_iter=5000, tol=1e-7, on_nonconvergence="raise")
    assert info.converged and info.gap <= 1e-7
    # the dual lower bound and the recovered primal both meet the reference optimum
    assert abs(info.dual[-1] - ref) < 1e-5
    assert abs(info.primal[-1] - ref) < 1e-5
    theta, pinfo = solve_primal(src, y, K, lam=lam, max_iter=5000, tol=1e-7, on_nonconvergence="raise")
    assert abs(pinfo.primal[-1] - ref) < 1e-5


def test_weak_duality_at_every_iterate():
    src, y = tiny_problem(3)
    lam = 0.05
    ref = factorized_optimum(src.z, y, lam)
    for info in (solve_dual(src, y, K, lam, max_iter=200, tol=0, on_nonconvergence="ignore")[1],
                 solve_dual(src, y, K, lam, max_iter=200, tol=0, beta0=50.0, accelerate=False, on_nonconvergence="ignore")[1],
                 solve_primal(src, y, K, lam=lam, max_iter=200, tol=0, on_nonconvergence="ignore")[1]):
        dual, primal = np.array(info.dual), np.array(info.primal)
        assert (dual <= ref + 1e-9).all() and (primal >= ref - 1e-9).all()
        assert (np.array(info.residuals) >= -1e-12).all()


def test_shrunk_dual_point_is_feasible_and_its_value_is_exact():
    src, y = tiny_problem()
    lam = 0.05
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(N, K, generator=g, dtype=torch.float64), -1)
    e = torch.nn.functional.one_hot(y, K).double()
    m = scores_adjoint(src.z, e - p) / N
    s = min(1.0, lam / float(torch.linalg.matrix_norm(m, 2)))
    ps = shrink_to_feasible(p, y, s)
    assert torch.allclose(ps.sum(1), torch.ones(N, dtype=torch.float64)) and (ps >= 0).all()
    ms = scores_adjoint(src.z, e - ps) / N
    assert float(torch.linalg.matrix_norm(ms, 2)) <= lam * (1 + 1e-12)
    # weak duality for this arbitrary feasible point against any primal point
    theta = torch.randn(D, K * P, generator=g, dtype=torch.float64)
    f = float(logistic_loss(scores(src.z, theta), y)) / N + lam * float(torch.linalg.svdvals(theta).sum())
    assert float(entropy(ps).mean()) <= f


def test_constrained_primal_gap_closes_and_respects_radius():
    src, y = tiny_problem()
    theta, info = solve_primal(src, y, K, radius=1.0, max_iter=5000, tol=1e-6, on_nonconvergence="raise")
    assert float(torch.linalg.svdvals(theta).sum()) <= 1.0 + 1e-9
    assert info.gap <= 1e-6 and min(info.residuals) >= -1e-12


def test_kkt_filters_span_the_active_spectrum_and_recovery_matches_dual():
    src, y = tiny_problem()
    lam = 0.1
    res, info = solve_dual(src, y, K, lam, max_iter=5000, tol=1e-8, on_nonconvergence="raise")
    s = torch.linalg.svdvals(res.m)
    assert abs(float(s[0]) - lam) < 1e-3 * lam  # the constraint is active at the optimum
    rec = recover(src, y, K, res, lam, max_iter=3000, tol=1e-8)
    r = rec.filters.shape[1]
    assert r == max(int((s >= 0.95 * lam).sum()), int(torch.linalg.matrix_rank(res.theta)))
    # recovered model: same objective as the dual's primal, same predictions as the dual P*
    assert abs(rec.objective - info.primal[-1]) < 1e-6
    assert rec.agreement == 1.0 and rec.tv < 1e-3
    # the dual's primal multiplier lives in the span of the filters (KKT)
    proj = rec.filters @ (rec.filters.T @ res.theta)
    assert torch.allclose(proj, res.theta, atol=1e-4)
