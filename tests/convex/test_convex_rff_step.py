"""The random-feature dual's step size is proved, not estimated.

- :class:`~proxnets.convex.sources.GramBound` is an upper bound of ``lambda_max(A^* A / n)`` (a dense
  eigenvalue) for any orthonormal basis, tight with the subsample basis; the per-position bound
  without deflation is far looser, and ``max_p`` of the per-position eigenvalues (what a careless
  bound would take) is *below* the dense value on these coherent features: the test data can tell.
- The coupling inequality behind the factor 2 of the step (rows of simplex differences sum to zero,
  Pinsker): ``((1/n) sum_i <d_i, u_i>)^2 <= (sum_i |d_i|_1^2) |A Theta|^2 / (2 n^2)``, with equality
  for an antisymmetric two-class ``Theta`` (the factor cannot be improved).
- ``solve_dual`` calls no power iteration; its bound is ``gram_bound``'s, its first pass is the
  same with the bound computed inside or given; weak duality at every iterate; "converged" only
  at tol; non-finite features stop it as diverged.
"""

from __future__ import annotations

import math

import pytest
import torch

from proxnets.convex import sources
from proxnets.convex.dual import solve_dual
from proxnets.convex.duality import scores
from proxnets.convex.sources import CachedFeatures, GramBound, deflation_basis, gram_bound


def _coherent(n=80, p=6, d=10, seed=0):
    """Features whose positions share a component (as pooled image features do)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(n, 1, d, generator=g, dtype=torch.float64)
    z = 0.8 * common + 0.5 * torch.randn(n, p, d, generator=g, dtype=torch.float64)
    return z


def _dense(z):
    q = z.reshape(z.shape[0], -1)
    return float(torch.linalg.eigvalsh(q.T @ q / z.shape[0])[-1])


def _bound(z, basis, chunk=7):
    acc = GramBound(basis, z.shape[1], z.shape[2], batch=5)
    for i in range(0, z.shape[0], chunk):
        acc.add(z[i : i + chunk])
    return acc.value()


def test_gram_bound_is_an_upper_bound_for_any_basis_and_tight_with_the_deflation_basis():
    z = _coherent()
    dense = _dense(z)
    pd = z.shape[1] * z.shape[2]
    src = CachedFeatures(z, chunk=9)
    g = torch.Generator().manual_seed(1)
    rand_basis, _ = torch.linalg.qr(torch.randn(pd, 4, generator=g, dtype=torch.float64))
    bases = {"none": torch.zeros(pd, 0, dtype=torch.float64), "random": rand_basis,
             "subsample": deflation_basis(src, rank=8, max_samples=40), "deflation": deflation_basis(src, rank=8)}
    values = {name: _bound(z, b) for name, b in bases.items()}
    for name, v in values.items():
        assert v >= dense, name
    assert values["deflation"] <= 1.001 * dense  # basis from every sample: the top eigenvector is in it
    assert values["subsample"] <= 1.15 * dense
    assert values["none"] >= 1.2 * dense  # sum_p lambda(G_pp) alone is loose: deflation is what makes it tight
    per_pos = torch.linalg.eigvalsh(torch.einsum("npd,npe->pde", z, z) / z.shape[0])[:, -1]
    assert float(per_pos.max()) < dense  # a max over positions would not be a bound here
    # the helper computes the same up to rounding and margin (batch 32 vs 5)
    assert gram_bound(src, rank=8) == pytest.approx(values["deflation"], rel=1e-4)  # other batches: other float32 sums, margins


def test_gram_bound_rejects_a_basis_that_is_not_orthonormal():
    z = _coherent()
    with pytest.raises(ValueError, match="basis"):
        GramBound(2.0 * torch.eye(z.shape[1] * z.shape[2], 3, dtype=torch.float64), z.shape[1], z.shape[2])


def test_coupling_bound_behind_the_factor_two_of_the_step():
    z = _coherent(n=50, p=3, d=4)
    n, p, d = z.shape
    k = 4
    g = torch.Generator().manual_seed(2)
    for _ in range(200):
        theta = torch.randn(d, k * p, generator=g, dtype=torch.float64)
        u = scores(z, theta)  # (n, K)
        a = torch.rand(n, k, generator=g, dtype=torch.float64)
        b = torch.rand(n, k, generator=g, dtype=torch.float64)
        dvec = a / a.sum(1, keepdim=True) - b / b.sum(1, keepdim=True)  # differences of simplex rows
        lhs = float((dvec * u).sum() / n) ** 2
        rhs = float((dvec.abs().sum(1) ** 2).sum()) * float((u * u).sum()) / (2 * n * n)
        assert lhs <= rhs * (1 + 1e-12)
    # equality: Theta = (w, -w, 0, ..) and d_i = sign(u_i1) (e_1 - e_2) / 2 ... scaled to the simplex
    w = torch.randn(d, p, generator=g, dtype=torch.float64)
    theta = torch.zeros(d, k, p, dtype=torch.float64)
    theta[:, 0], theta[:, 1] = w, -w
    u = scores(z, theta.reshape(d, k * p))
    s = u[:, 0].sign()
    dvec = torch.zeros(n, k, dtype=torch.float64)
    dvec[:, 0], dvec[:, 1] = s * u[:, 0].abs(), -s * u[:, 0].abs()  # rows sum to zero, |d_i|_1 prop. to range
    lhs = float((dvec * u).sum() / n) ** 2
    rhs = float((dvec.abs().sum(1) ** 2).sum()) * float((u * u).sum()) / (2 * n * n)
    assert lhs == pytest.approx(rhs, rel=1e-10)
    assert lhs > rhs / 1.25  # so a factor above 2 (here 2.5) would be violated


def _labels(n, k=3):
    return torch.arange(n) % k


def test_solve_dual_uses_the_proved_bound_and_no_power_iteration(monkeypatch):
    z = _coherent(n=60)
    src = CachedFeatures(z, chunk=8)
    y = _labels(60)
    expected = gram_bound(src)

    def boom(*a, **kw):
        raise AssertionError("a power-iteration estimate was used for the step")

    monkeypatch.setattr(sources, "power_iteration", boom)
    monkeypatch.setattr(sources, "gram_norm", boom)
    res, trace = solve_dual(src, y, 3, 0.05, max_iter=15, tol=0.0, on_nonconvergence="ignore")
    assert trace.gram_norm == pytest.approx(expected, rel=1e-12)
    assert trace.gram_norm >= _dense(z)
    res2, trace2 = solve_dual(src, y, 3, 0.05, max_iter=15, tol=0.0, gram=trace.gram_norm, on_nonconvergence="ignore")
    assert torch.allclose(res.theta, res2.theta, rtol=0, atol=1e-12) and trace.primal == pytest.approx(trace2.primal, rel=1e-12)
    # the step is tau = 2 / (beta0 Lbar): after one Theta update from zero, Theta = SVT_{tau lam}(tau Mbar)
    with pytest.raises(ValueError, match="gram"):
        solve_dual(src, y, 3, 0.05, max_iter=2, gram=-1.0)


def test_weak_duality_every_iterate_and_converged_only_at_tol():
    z = _coherent(n=60)
    src = CachedFeatures(z, chunk=8)
    y = _labels(60)
    _, trace = solve_dual(src, y, 3, 0.2, max_iter=400, tol=1e-4, on_nonconvergence="ignore")
    assert all(math.isfinite(v) for v in trace.primal + trace.dual)
    assert min(trace.primal) - max(trace.dual) >= 0.0
    assert trace.converged and 0.0 <= trace.gap <= 1e-4
    assert all(g > 1e-4 for g in trace.residuals[:-1])  # stopped at the first iterate within tol
    _, short = solve_dual(src, y, 3, 0.2, max_iter=3, tol=1e-4, on_nonconvergence="ignore")
    assert not short.converged


def test_non_finite_features_stop_as_diverged():
    z = _coherent(n=40)
    y = _labels(40)
    bad = z.clone()
    bad[3, 1, 2] = float("inf")
    acc = GramBound(torch.zeros(bad.shape[1] * bad.shape[2], 0, dtype=torch.float64), bad.shape[1], bad.shape[2])
    acc.add(bad)
    with pytest.raises(FloatingPointError):  # the bound refuses non-finite accumulators
        acc.value()
    huge = z * 1e200  # finite features, overflowing scores: the bounds become non-finite
    _, trace = solve_dual(CachedFeatures(huge, chunk=8), y, 3, 0.05, max_iter=5, gram=1.0, on_nonconvergence="ignore")
    assert not trace.converged and getattr(trace, "diverged", False)


def test_pass_in_flat_layout_is_bitwise_the_scores_functions():
    """One pass of solve_dual (Theta flattened once, M unflattened once) equals, bitwise, the pass
    written with scores / scores_adjoint per chunk."""
    from proxnets.convex.duality import logistic_loss, scores_adjoint
    from proxnets.convex.primal import nuclear_step, one_hot

    z = _coherent(n=45).float()
    src = CachedFeatures(z, chunk=8)
    y = _labels(45)
    n, p, d = z.shape
    gram = gram_bound(src)
    res, _ = solve_dual(src, y, 3, 0.05, max_iter=2, tol=0.0, gram=gram, on_nonconvergence="ignore")
    # reference: pass 1 from Theta = 0, uniform P; then the Theta step and pass 2
    pm = torch.full((n, 3), 1 / 3)
    m1, m0 = torch.zeros(d, 3 * p), torch.zeros(d, 3 * p)
    beta, tau = 1.0, 2.0 / gram
    for rows, zc in src.chunks():
        e = one_hot(y[rows], 3, zc.dtype)
        pn = torch.softmax(torch.log(pm[rows].clamp_min(1e-30)) / 2.0, dim=-1)
        m1 += scores_adjoint(zc, e - pn)
        m0 += scores_adjoint(zc, e - pm[rows])
        pm[rows] = pn
    m1, m0 = m1 / n, m0 / n
    th = 1 / math.sqrt(3.0)
    theta, _, _ = nuclear_step(tau / th * ((1 + th) * m1 - th * m0), 0.05, None, tau / th)
    beta = th
    m2 = torch.zeros(d, 3 * p)
    for rows, zc in src.chunks():
        u = scores(zc, theta)
        e = one_hot(y[rows], 3, zc.dtype)
        pn = torch.softmax((beta * u + torch.log(pm[rows].clamp_min(1e-30))) / (1 + beta), dim=-1)
        m2 += scores_adjoint(zc, e - pn)
        pm[rows] = pn
    assert torch.equal(res.theta, theta) and torch.equal(res.p, pm) and torch.equal(res.m, m2 / n)
