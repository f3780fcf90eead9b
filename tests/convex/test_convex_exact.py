"""DCCNN's kernel-only dual (loss="hinge", feature_map="exact"): theory as tests.

Weak duality at every iterate (checked against an independent dense evaluation of the dual
constraint), the gap closing, independence of random_state, few recovered filters that reproduce
the solver's predictions, the exact linear export, the scikit-learn contract and input errors.
"""

import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import check_estimator

from proxnets.convex import DCCNN, to_torch
from proxnets.convex.exact import PatchKernel
from proxnets.convex.features import PatchFeaturizer
from proxnets.convex.hinge import solve_hinge_dual
from proxnets.data import load_dataset

EXACT = dict(loss="hinge", feature_map="exact", patch_size=3, pool_size=2, C=1.0, max_iter=80, tol=1e-3,
             on_nonconvergence="ignore")


@pytest.fixture(scope="module")
def pair():
    """A binary problem: digits 3 vs 8 (the hardest pair of the 8x8 digits), 60 images."""
    ds = load_dataset("digits", n_train=400, n_test=200)
    keep = (ds.y_train == 3) | (ds.y_train == 8)
    x, y = ds.x_train[keep][:60], ds.y_train[keep][:60]
    keep_t = (ds.y_test == 3) | (ds.y_test == 8)
    return x, y, ds.x_test[keep_t], ds.y_test[keep_t]


@pytest.fixture(scope="module")
def fitted(pair):
    x, y, _, _ = pair
    return DCCNN(**EXACT, kernel="rbf").fit(x, y)


def _dense_lambda_max(est, alpha, y_pm) -> float:
    """lambda_max(sum_ij b_i b_j K_ij) from the full dense kernel (n P x n P): an independent check."""
    kern = est.kernel_
    n, p = kern.n, kern.n_positions
    patches = kern._patches_of(kern.train_images)
    big = kern._block(patches, patches).reshape(n * p, n * p)
    b = torch.as_tensor(alpha, dtype=torch.float64) * y_pm
    sel = torch.kron(b[:, None], torch.eye(p, dtype=torch.float64))  # (n P, P)
    return float(torch.linalg.eigvalsh(sel.T @ big @ sel)[-1])


def test_weak_duality_every_iterate_and_gap_closes(fitted, pair):
    tr = fitted.traces_[0]
    assert all(p >= d for p, d in zip(tr.primal, tr.dual))
    assert max(tr.dual) <= min(tr.primal)  # every lower bound below every upper bound
    assert tr.converged and fitted.duality_gap_[0] <= 1e-3
    # the final dual point is feasible by an independent dense computation of its constraint
    y_pm = torch.where(torch.as_tensor(pair[1]) == fitted.classes_[1], 1.0, -1.0).double()
    assert _dense_lambda_max(fitted, fitted.dual_coef_[0], y_pm) <= 1 + 1e-9
    assert abs(fitted.dual_coef_[0].sum() - tr.dual[-1]) <= 1e-9 * tr.dual[-1]
    assert (fitted.dual_coef_ >= 0).all() and (fitted.dual_coef_ <= fitted.C + 1e-12).all()


def test_recovered_model_primal_value_recomputed(fitted, pair):
    """The recovered model's primal value |A|_* + C sum hinge, recomputed from its predictions."""
    x, y, _, _ = pair
    b = fitted.binary_[0]
    f = fitted.decision_function(x)
    y_pm = np.where(np.asarray(y) == fitted.classes_[1], 1.0, -1.0)
    nuc = float(torch.linalg.svdvals(b.head).sum())  # |S|_*: the head carries sigma_k times unit vectors
    value = nuc + fitted.C * np.maximum(0, 1 - y_pm * f).sum()
    assert value == pytest.approx(fitted.traces_[0].recovered[-1], rel=1e-6)
    assert value >= fitted.traces_[0].dual[-1]  # weak duality for the model that predicts


def test_exact_model_does_not_depend_on_random_state(pair):
    x, y, xt, _ = pair
    preds = [DCCNN(**{**EXACT, "max_iter": 4}, kernel="rbf", random_state=s).fit(x, y).decision_function(xt) for s in (0, 1)]
    assert np.array_equal(preds[0], preds[1])


def test_few_filters_that_reproduce_the_solver(fitted, pair):
    x, _, _, _ = pair
    p = fitted.kernel_.n_positions
    assert 1 <= fitted.n_filters_[0] <= p // 2
    b = fitted.binary_[0]
    agree = float((torch.sign(b.train_scores) == torch.sign(b.master_scores)).double().mean())
    assert agree >= 0.95


def test_linear_kernel_exports_exactly(pair):
    x, y, xt, _ = pair
    est = DCCNN(**{**EXACT, "max_iter": 8}, kernel="linear").fit(x, y)
    net = to_torch(est)
    assert isinstance(net.layers[0].whiten, torch.nn.Conv2d) and isinstance(net.layers[0].filters, torch.nn.Conv2d)
    with torch.no_grad():
        out = net(xt).double().numpy()
    ref = est.class_scores(xt)
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_one_vs_rest_each_problem_certified():
    ds = load_dataset("digits", n_train=40, n_test=10)
    est = DCCNN(**{**EXACT, "max_iter": 4}).fit(ds.x_train, ds.y_train)
    assert est.dual_coef_.shape == (10, 40) and len(est.traces_) == 10
    for tr in est.traces_:
        assert max(tr.dual) <= min(tr.primal)
    assert est.trace_.primal[-1] == pytest.approx(sum(t.primal[-1] for t in est.traces_))


def test_sklearn_estimator_checks_exact_mode():
    est = DCCNN(loss="hinge", feature_map="exact", patch_size=1, contrast_eps=None, zca_eps=None, pool_size=1,
                gamma=0.5, C=1.0, max_iter=12, on_nonconvergence="ignore")  # 12 passes: gaps ~1e-2 on blobs (3 left the recovered model at a random early point)
    failed = [r for r in check_estimator(est, on_fail=None) if r["status"] == "failed"]
    assert not failed, [(r["check_name"], str(r["exception"])[:200]) for r in failed]


def test_verbose_shows_the_gap(pair, capsys):
    x, y, _, _ = pair
    DCCNN(**{**EXACT, "max_iter": 2}, verbose=2).fit(x, y)
    err = capsys.readouterr().err
    assert "relative gap" in err and "dual" in err


def test_bad_input(pair):
    x, y, _, _ = pair
    kern = PatchKernel(PatchFeaturizer(patch_size=3, pool_size=2, kernel="linear", feature_map="linear"), "rbf").fit(x)
    with pytest.raises(ValueError, match=r"y: expected binary labels in \{-1, \+1\}"):
        solve_hinge_dual(kern, torch.as_tensor(y).double(), 1.0)
    with pytest.raises(ValueError, match=r"C: expected a number in \(0.0, inf\], got 0"):
        DCCNN(**{**EXACT, "C": 0}).fit(x, y)
    with pytest.raises(ValueError, match=r"kernel: expected a positive semi-definite kernel"):
        DCCNN(**EXACT, kernel=lambda a, b: -(a @ b.T)).fit(x, y)
    with pytest.raises(ValueError, match=r"patch_size: expected a window no larger than the \(padded\) image 8x8"):
        DCCNN(**{**EXACT, "patch_size": 9}).fit(x, y)
    with pytest.raises(ValueError, match=r"feature_map: expected 'exact' exactly when loss='hinge'"):
        DCCNN(loss="hinge", feature_map="rff").fit(x, y)


@pytest.mark.parametrize("kernel,pool,stride", [("rbf", 2, 2), ("rbf", 3, 1), ("inverse_poly", 2, 1), ("linear", 1, 1)])
def test_streamed_blocks_equal_the_kernel_definition(pair, kernel, pool, stride):
    """K(x_i, x_j) = S^T k(X_i, X_j) S / s, from the named kernel and the dense pooling matrix S
    (the blocks use a fused GEMM and strided-slice pooling); M(b) and C_i(b) from the streamed passes
    equal the dense sums over that definition."""
    from proxnets.convex.kernels import kernel as named

    x, y, _, _ = pair
    feat = PatchFeaturizer(patch_size=3, pool_size=pool, pool_stride=stride, kernel="linear", feature_map="linear")
    kern = PatchKernel(feat, kernel, 0.2).fit(x[:20])
    pat = kern._patches_of(kern.train_images)  # (n, J, d)
    n, j, d = pat.shape
    g = named(kernel, 0.2)(pat.reshape(-1, d), pat.reshape(-1, d)).reshape(n, j, n, j)
    ref = torch.einsum("ap,iajb,bq->ipjq", kern.pool, g, kern.pool) / kern.scale  # (n, P, n, P)
    got = kern._block(pat, pat)
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()
    w = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w[:, ::3] = 0  # a support that is not every image
    m_ref = torch.einsum("ki,ipjq,kj->kpq", w, ref, w)
    assert (kern.quadratic(w) - m_ref).abs().max() <= 1e-10 * m_ref.abs().max()
    c_ref = torch.einsum("ipjq,kj->kipq", ref, w)
    assert (kern.contract(w) - c_ref).abs().max() <= 1e-10 * c_ref.abs().max()


def test_dense_kernel_variant_gives_the_same_iterates(pair):
    """The materialized kernel (the suite's broken memory variant) changes memory only, not the solve."""
    x, y, _, _ = pair
    a = DCCNN(**{**EXACT, "max_iter": 5}).fit(x, y)
    b = DCCNN(**{**EXACT, "max_iter": 5}, solver_options={"dense_kernel": True}).fit(x, y)
    assert np.allclose(a.traces_[0].dual, b.traces_[0].dual, rtol=1e-9)
    assert b.kernel_.dense is None  # released after the solve
    with pytest.raises(ValueError, match=r"solver_options: expected None or a dict"):
        DCCNN(**EXACT, solver_options=[1]).fit(x, y)


def test_segment_search_is_exact_on_the_segment_and_finds_its_maximum(pair):
    """M is quadratic in alpha: Lagrange interpolation of M at t = 0, 1/2, 1 equals the streamed M at
    alpha(t) for every t; D(t) = l(t) / max(1, sqrt(mu_1(M(t)))) is quasi-concave, so golden-section
    search reaches the maximum of a dense grid of the segment."""
    from proxnets.convex.hinge import _segment_search

    x, y, _, _ = pair
    feat = PatchFeaturizer(patch_size=3, pool_size=2, kernel="linear", feature_map="linear")
    kern = PatchKernel(feat, "rbf", 0.2).fit(x[:20])
    gen = torch.Generator().manual_seed(1)
    sign = torch.where(torch.rand(2, 20, generator=gen) > 0.5, 1.0, -1.0).double()
    a_in = 0.05 * torch.rand(2, 20, generator=gen, dtype=torch.float64)  # inside (small), outside (large)
    a_out = torch.rand(2, 20, generator=gen, dtype=torch.float64)
    a_in[:, ::4] = 0.0
    pts = torch.stack([a_in, (a_in + a_out) / 2, a_out]) * sign  # (3, 2 problems, n)
    m_in, m_mid, m_out = kern.quadratic(pts.reshape(6, 20)).reshape(3, 2, *([kern.n_positions] * 2))
    t, m_t = _segment_search(m_in, m_mid, m_out, a_in.sum(1), a_out.sum(1))
    direct = kern.quadratic(((1 - t[:, None]) * a_in + t[:, None] * a_out) * sign)
    assert (m_t - direct).abs().max() <= 1e-10 * direct.abs().max()
    for k in range(2):
        grid = torch.linspace(0, 1, 401, dtype=torch.float64)
        d_grid = []
        for s in grid:
            mk = kern.quadratic((((1 - s) * a_in[k] + s * a_out[k]) * sign[k])[None])[0]
            d_grid.append(float(((1 - s) * a_in[k].sum() + s * a_out[k].sum()) / torch.linalg.eigvalsh(mk)[-1].clamp_min(0).sqrt().clamp_min(1)))
        d_t = float(((1 - t[k]) * a_in[k].sum() + t[k] * a_out[k].sum()) / torch.linalg.eigvalsh(m_t[k])[-1].clamp_min(0).sqrt().clamp_min(1))
        assert d_t >= max(d_grid) * (1 - 1e-6)


def test_segment_search_lowers_the_passes_and_keeps_weak_duality(pair):
    """The searched point is a dual point like any other (weak duality at every iterate, checked
    by the dense lambda_max), and Kelley's cuts at the LP point are still added, so the search can
    only move the bounds closer: on this problem it needs fewer passes to the same gap."""
    x, y, _, _ = pair
    on = DCCNN(**EXACT, kernel="rbf").fit(x, y)
    off = DCCNN(**EXACT, kernel="rbf", solver_options={"line_search": False}).fit(x, y)
    for est in (on, off):
        tr = est.traces_[0]
        assert tr.converged and max(tr.dual) <= min(tr.primal)
    y_pm = torch.where(torch.as_tensor(y) == on.classes_[1], 1.0, -1.0).double()
    assert _dense_lambda_max(on, on.dual_coef_[0], y_pm) <= 1 + 1e-9
    assert on.traces_[0].iterations < off.traces_[0].iterations


def test_incremental_master_lp_equals_a_fresh_solve():
    """The master LP kept between passes (rows appended, warm basis) gives the optimum of a solve from
    scratch after every addition, and its multipliers w >= 0 certify it (LP duality: sum w + c sum
    max(0, 1 - rows^T w) equals the optimum), so the master bound built from w is tight."""
    from proxnets.convex.hinge import _lp, _LPHost, _MasterLP

    rng = np.random.default_rng(0)
    n, c = 20, 0.7
    host = _LPHost()  # shared by two problems: each solve either appends rows or reloads with its basis
    lp, other, rows = _MasterLP(n, c, host), _MasterLP(n, c, host), []
    assert np.array_equal(lp.solve()[0], np.full(n, c))  # no cut: the box corner
    for it in range(12):
        new = list(rng.normal(size=(int(rng.integers(1, 9)), n)) + 0.2)
        rows += new
        lp.add(new)
        if it % 3 == 1:  # another problem takes the host in between
            other.add(list(rng.normal(size=(3, n)) + 0.2))
            a_o, _ = other.solve()
            assert abs(a_o.sum() - _lp(list(other.rows), c, n)[0].sum()) <= 1e-9 * a_o.sum()
        a, w = lp.solve()
        a_ref, _ = _lp(rows, c, n)
        assert abs(a.sum() - a_ref.sum()) <= 1e-9 * a_ref.sum()
        assert (np.stack(rows) @ a <= 1 + 1e-9).all() and (a >= 0).all() and (a <= c).all()
        assert (w >= 0).all() and np.array_equal(lp.rows, np.stack(rows))
        assert np.allclose(lp.margins(w), np.stack(rows)[: w.size].T @ w, rtol=1e-12, atol=1e-12)
        bound = w.sum() + c * np.clip(1 - lp.rows.T @ w, 0, None).sum()  # the primal point built from w
        assert abs(bound - a.sum()) <= 1e-8 * a.sum()


def test_master_lp_without_the_highs_binding_solves_from_scratch(monkeypatch):
    """Where scipy's private HiGHS module is absent (or lacks a name the warm start calls), the master
    falls back to ``linprog`` per solve: the same optimum and valid multipliers."""
    import proxnets.convex.hinge as hg

    rng = np.random.default_rng(1)
    n, c = 15, 0.5
    rows = list(rng.normal(size=(10, n)) + 0.2)
    warm = hg._MasterLP(n, c)
    warm.add(rows)
    a_warm, _ = warm.solve()
    monkeypatch.setattr(hg, "_highs_core", None)
    cold = hg._MasterLP(n, c)
    assert cold._host.h is None
    cold.add(rows)
    a, w = cold.solve()
    assert abs(a.sum() - a_warm.sum()) <= 1e-9 * a_warm.sum()
    assert (np.stack(rows) @ a <= 1 + 1e-9).all() and (w >= 0).all()
    bound = w.sum() + c * np.clip(1 - np.stack(rows).T @ w, 0, None).sum()
    assert abs(bound - a.sum()) <= 1e-8 * a.sum()


def test_cached_training_patches_give_the_same_kernel(pair, monkeypatch):
    """Small training sets keep their patches (PATCH_CACHE_BYTES); the passes equal the recomputed ones."""
    import proxnets.convex.exact as ex

    x = pair[0][:20].double()
    feat = dict(patch_size=3, pool_size=2, kernel="linear", feature_map="linear", n_features=1)
    cached = PatchKernel(PatchFeaturizer(**feat), "rbf", 0.2).fit(x, torch.Generator().manual_seed(0))
    monkeypatch.setattr(ex, "PATCH_CACHE_BYTES", 0)
    plain = PatchKernel(PatchFeaturizer(**feat), "rbf", 0.2).fit(x, torch.Generator().manual_seed(0))
    assert cached._cache is not None and plain._cache is None
    w = torch.randn(3, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(cached.quadratic(w), plain.quadratic(w))
    assert torch.equal(cached.contract(w), plain.contract(w))


def test_recovery_reads_only_the_symmetric_part_of_r():
    """The recovery keeps the upper triangle of sym(R_i) (R_i = V^T C_i V diag(mu)^{-1/2} is not
    symmetric): the scale fit on sym(R) gives the same S, primal value and scores as on R, because
    tr(S R) = tr(S sym(R)) for symmetric S; and the triangle unpacks to sym(R)."""
    from proxnets.convex.hinge import _unpack_sym, fit_scales

    g = torch.Generator().manual_seed(0)
    r = torch.randn(40, 4, 4, generator=g, dtype=torch.float64)
    y = torch.where(torch.randn(40, generator=g) > 0, 1.0, -1.0).double()
    sym = (r + r.transpose(1, 2)) / 2
    assert (r - r.transpose(1, 2)).abs().max() > 0.1  # the test's R is far from symmetric
    i, j = torch.triu_indices(4, 4)
    assert torch.equal(_unpack_sym(sym[:, i, j], 4), sym)
    s_full, p_full, sc_full = fit_scales(r, y, 0.5)
    s_sym, p_sym, sc_sym = fit_scales(sym, y, 0.5)
    assert abs(p_full - p_sym) <= 1e-10 * p_full
    assert torch.allclose(s_full, s_sym, atol=1e-10) and torch.allclose(sc_full, sc_sym, atol=1e-10)


def test_symmetric_contract_equals_the_streamed_one(pair, monkeypatch):
    """Small problems evaluate each training block pair once for both row blocks (K_ji = K_ij^T);
    the result equals the streamed contract, with a support that leaves some blocks out."""
    import proxnets.convex.exact as ex

    x = pair[0][:40].double()
    feat = dict(patch_size=3, pool_size=2, kernel="linear", feature_map="linear", n_features=1)
    kern = PatchKernel(PatchFeaturizer(**feat), "rbf", 0.2).fit(x, torch.Generator().manual_seed(0))
    w = torch.randn(3, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w[:, 5:30] = 0  # whole blocks without support
    sym = kern.contract(w)
    monkeypatch.setattr(ex, "SYMMETRIC_BYTES", 0)
    streamed = kern.contract(w)
    assert torch.allclose(sym, streamed, rtol=1e-12, atol=1e-12 * float(streamed.abs().max()))
    red = lambda acc, rows: (acc.sum((2, 3)),)  # noqa: E731
    monkeypatch.setattr(ex, "SYMMETRIC_BYTES", 2**30)
    assert torch.allclose(kern.contract(w, reduce=red)[0], streamed.sum((2, 3)), rtol=1e-12)
