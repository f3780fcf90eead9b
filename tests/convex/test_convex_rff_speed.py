"""The random-feature DCCNN's shortcuts are exact: each equals the computation it replaces.

- ``M(Pbar_{t+1}) = (1 + th) M(P_{t+1}) - th M(P_t)`` (one adjoint product per pass): the iterates of
  :func:`~proxnets.convex.dual.solve_dual` equal those of the two-adjoint loop it replaced, in float64.
- The fused RFF feature path (ZCA and bias folded into one GEMM, in-place cosine, pooling before the
  ``sqrt(2/D)`` factor) equals ``pool(phi(zca(cn(patches))))`` computed step by step.
- ``gram_norm`` over a streamed source (its subsample cached once) equals the estimate over the
  cached features.
- The certificate at the last iterate equals an independent dense evaluation of ``F(Theta)`` and
  ``D(P_s)``, and weak duality holds at every iterate.
"""

from __future__ import annotations

import math

import pytest
import torch

from proxnets.convex.dual import solve_dual
from proxnets.convex.duality import entropy, logistic_loss, scores, scores_adjoint, spectral_norm
from proxnets.convex.features import PatchFeaturizer
from proxnets.convex.patches import ZCA, pool_features
from proxnets.convex.primal import nuclear_step, one_hot
from proxnets.convex.sources import CachedFeatures, StreamedFeatures, cache_features, gram_bound, gram_norm


def _problem(n=60, p=4, d=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, p, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    y = torch.randint(0, k, (n,), generator=g)
    return z, y, k


def _two_adjoint_dual(source, y, k, lam, iters, beta0, gram):
    """The loop ``solve_dual`` ran before: ``M(Pbar)`` from a second adjoint product every pass."""
    n, npos, d = source.n, source.n_positions, source.dim
    beta = beta0
    tau = 2.0 / (beta * gram)
    p = torch.full((n, k), 1.0 / k, dtype=torch.float64)
    theta = torch.zeros(d, k * npos, dtype=torch.float64)
    m_bar, out = None, []
    for _ in range(iters):
        if m_bar is not None:
            theta, _, _ = nuclear_step(theta + tau * m_bar, lam, None, tau)
        th = 1.0 / math.sqrt(1.0 + 2.0 * beta)
        m_new, m_bar = torch.zeros_like(theta), torch.zeros_like(theta)
        for rows, z in source.chunks():
            u = scores(z, theta)
            p_old = p[rows]
            p_next = torch.softmax((beta * u + torch.log(p_old.clamp_min(1e-30))) / (1.0 + beta), dim=-1)
            e = one_hot(y[rows], k, torch.float64)
            m_new += scores_adjoint(z, e - p_next)
            m_bar += scores_adjoint(z, e - (p_next + th * (p_next - p_old)))
            p[rows] = p_next
        m_new /= n
        m_bar /= n
        beta, tau = th * beta, tau / th
        out.append((theta.clone(), p.clone(), m_new.clone()))
    return out


def test_one_adjoint_per_pass_gives_the_same_iterates():
    z, y, k = _problem()
    src = CachedFeatures(z, chunk=16)
    lam, gram = 0.05, gram_bound(src)
    ref = _two_adjoint_dual(src, y, k, lam, 25, 1.0, gram)
    for t in (1, 2, 7, 25):  # the iterate after t passes (a run of max_iter = t)
        res, trace = solve_dual(src, y, k, lam, max_iter=t, tol=0.0, gram=gram, on_nonconvergence="ignore")
        theta_r, p_r, m_r = ref[t - 1]
        assert torch.allclose(res.theta, theta_r, rtol=0, atol=1e-12), t
        assert torch.allclose(res.p, p_r, rtol=0, atol=1e-12), t
        assert torch.allclose(res.m, m_r, rtol=0, atol=1e-12), t
        assert float((res.theta - ref[0][0]).abs().max()) > 1e-6 or t == 1  # the iterates do move


def test_certificate_matches_an_independent_dense_evaluation():
    z, y, k = _problem(n=50, seed=1)
    src = CachedFeatures(z, chunk=7)
    lam = 0.05
    for iters in (1, 3, 40):
        res, trace = solve_dual(src, y, k, lam, max_iter=iters, tol=0.0, on_nonconvergence="ignore")
        n = z.shape[0]
        # primal F(Theta) = mean logistic loss + lam |Theta|_* at the returned multiplier
        theta = res.theta
        u = torch.einsum("ipd,dkp->ik", z, theta.reshape(z.shape[2], k, z.shape[1]))
        primal = float(torch.nn.functional.cross_entropy(u, y)) + lam * float(torch.linalg.svdvals(theta).sum())
        # dual D(P_s): M(P) = A^*(E - P) / n densely, shrink to |M|_2 <= lam, mean entropy
        e = one_hot(y, k, torch.float64)
        m = torch.einsum("ipd,ik->dkp", z, e - res.p).reshape(z.shape[2], k * z.shape[1]) / n
        s = min(1.0, lam / float(torch.linalg.matrix_norm(m, ord=2)))
        dual = float(entropy(s * res.p + (1 - s) * e).mean())
        assert abs(trace.primal[-1] - primal) <= 1e-10 * max(1.0, abs(primal))
        assert abs(trace.dual[-1] - dual) <= 1e-10
        assert torch.allclose(res.m, m, rtol=0, atol=1e-12)
        assert min(trace.primal) - max(trace.dual) >= 0.0  # weak duality over every iterate
        assert all(g >= 0 for g in trace.residuals)


def _featurizer(dtype, pool=(2, 2)):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(24, 1, 14, 14, generator=g)
    f = PatchFeaturizer(patch_size=5, n_features=32, gamma=0.2, pool_size=pool[0], pool_stride=pool[1])
    f.fit(x, torch.Generator().manual_seed(0))
    if dtype == torch.float64:
        f = f.double()
        f.zca = ZCA(f.zca.mean.double(), f.zca.matrix.double())
    return f, x.to(dtype)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("pool", [(2, 2), (3, 1)])
def test_fused_rff_features_equal_the_step_by_step_pipeline(dtype, atol, pool):
    f, x = _featurizer(dtype, pool)
    with torch.no_grad():
        fused = f._raw_rff(x)
        step = pool_features(f.phi(f.whitened_patches(x)), f.grid, f.pool_size, f.pool_stride)
    assert fused.shape == step.shape
    assert float((fused - step).abs().max()) <= atol
    # and it is what the featurizer (hence every solver) reads: forward = (raw - center) / scale
    assert torch.allclose(f(x), (fused - f.center) / f.scale, rtol=0, atol=atol)


def test_fused_path_not_taken_when_gradients_are_needed():
    f, x = _featurizer(torch.float32)
    x = x.clone().requires_grad_(True)
    out = f(x)
    out.sum().backward()  # the in-place cosine would break this
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_gram_norm_streamed_equals_cached():
    f, x = _featurizer(torch.float32)
    x = torch.cat([x] * 3)  # 72 samples: max_samples=40 takes a subsample
    streamed = StreamedFeatures(f, x, chunk=8)
    cached = CachedFeatures(cache_features(f, x, 8), chunk=8)
    a = gram_norm(streamed, 3, max_samples=40)
    b = gram_norm(cached, 3, max_samples=40)
    assert a == b
    a_all, b_all = gram_norm(streamed, 3), gram_norm(cached, 3)  # n <= max_samples: the whole set
    assert abs(a_all - b_all) <= 1e-6 * b_all


@pytest.mark.parametrize("budget_chunks", [0, 2, 100])
def test_bounded_cache_gives_bitwise_the_same_iterates(budget_chunks):
    f, x = _featurizer(torch.float32)
    y = torch.arange(x.shape[0]) % 3
    plain = StreamedFeatures(f, x, chunk=5)
    chunk_bytes = 5 * f.n_positions * f.dim * 4
    kept = StreamedFeatures(f, x, chunk=5, cache_bytes=budget_chunks * chunk_bytes)
    gram = gram_bound(plain)
    r1, t1 = solve_dual(plain, y, 3, 0.05, max_iter=12, tol=0.0, gram=gram, on_nonconvergence="ignore")
    r2, t2 = solve_dual(kept, y, 3, 0.05, max_iter=12, tol=0.0, gram=gram, on_nonconvergence="ignore")
    assert t1.primal == t2.primal and t1.dual == t2.dual  # bitwise
    assert torch.equal(r1.theta, r2.theta) and torch.equal(r1.p, r2.p)
    assert kept._kept_bytes <= kept.cache_bytes
    assert kept.cached_fraction == pytest.approx(min(1.0, budget_chunks * 5 / x.shape[0]))
    if budget_chunks == 2:  # what is kept is what the featurizer computes
        with torch.no_grad():
            assert torch.equal(kept._kept[1], f(x[5:10]))


def test_dccnn_cache_mb_same_model():
    f, x = _featurizer(torch.float32)
    from proxnets.convex import DCCNN
    y = (torch.arange(x.shape[0]) % 2).numpy()
    kw = dict(patch_size=5, n_features=32, pool_size=2, max_iter=8, chunk=6, on_nonconvergence="ignore")
    a = DCCNN(**kw).fit(x.numpy(), y)
    b = DCCNN(**kw, cache_mb=0.01).fit(x.numpy(), y)
    assert a.trace_.primal == b.trace_.primal and a.trace_.dual == b.trace_.dual
    assert (a.predict(x.numpy()) == b.predict(x.numpy())).all()
    with pytest.raises(ValueError, match="cache_mb"):
        DCCNN(**kw, cache_mb=-1).fit(x.numpy(), y)
