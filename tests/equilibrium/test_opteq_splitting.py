"""Peaceman-Rachford splitting for MON (theory as tests).

Theorems checked: on a strongly monotone problem PR converges for every step alpha > 0, where forward-
backward with a step past 2 m / L^2 diverges; its fixed point is forward-backward's at a safe step (and
the exact solution where one is known); capped, it reports non-convergence; the resolvents solve their
linear systems; MON trained through PR gets the same implicit gradient as through forward-backward.
"""

import pytest
import torch

from proxnets.equilibrium import MONConfig, MONConv2d
from proxnets.equilibrium.splitting import CircularResolvent, DenseResolvent, IterativeResolvent, peaceman_rachford
from proxnets.solvers import fixed_point


def _monotone(n=12, m=0.1, skew=5.0, seed=0):
    """``M = m I + A^T A + S``, ``S`` skew: ``(M + M^T)/2 >= m I`` while ``|M|_2`` is large (FB's safe step tiny)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    s = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m * torch.eye(n, dtype=torch.float64) + a.T @ a + skew * (s - s.T) / 2


def _dense(mat, alpha):
    return DenseResolvent().update(lambda: mat, alpha, key=0)


def test_pr_converges_for_every_step_where_fb_diverges():
    mat = _monotone(m=0.5, skew=2.0)
    c = torch.randn(3, mat.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.solve(mat, c.T).T  # f = 0 (prox = identity): z* = M^{-1} c
    lip = float(torch.linalg.matrix_norm(mat, 2))
    mu = float(torch.linalg.eigvalsh((mat + mat.T) / 2)[0])
    alpha_fb = 0.5  # far past the safe limit 2 mu / L^2
    assert alpha_fb > 2 * mu / lip**2
    rho = float(torch.linalg.eigvals(torch.eye(mat.shape[0], dtype=mat.dtype) - alpha_fb * mat).abs().max())
    assert rho > 1.5  # premise: the linear FB map z -> z - alpha (M z - c) expands some direction
    _, fb = fixed_point(lambda z: z - alpha_fb * (z @ mat.T - c), torch.zeros_like(c), tol=1e-8, max_iter=3000)
    assert not fb.converged and fb.diverged
    for alpha in (0.1, 1.0, 10.0):
        z, _, info = peaceman_rachford(_dense(mat, alpha), c, alpha, prox=lambda u: u, tol=1e-11, max_iter=20000)
        assert info.converged and info.solver == "peaceman_rachford"
        assert float((z - exact).norm() / exact.norm()) < 1e-8


def test_pr_fixed_point_is_fb_fixed_point_at_a_safe_step():
    mat = _monotone(skew=1.0)
    c = torch.randn(4, mat.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lip = float(torch.linalg.matrix_norm(mat, 2))
    mu = float(torch.linalg.eigvalsh((mat + mat.T) / 2)[0])
    step = mu / lip**2
    z_fb, fb = fixed_point(lambda z: torch.relu(z - step * (z @ mat.T - c)), torch.zeros_like(c), tol=1e-12,
                           max_iter=200000)
    assert fb.converged
    z_pr, _, pr = peaceman_rachford(_dense(mat, 1.0), c, 1.0, tol=1e-12, max_iter=5000)
    assert pr.converged and pr.iterations < fb.iterations
    assert float((z_pr - z_fb).norm() / z_fb.norm()) < 1e-8
    assert bool((z_pr >= 0).all())  # the relu constraint holds at the PR point


def test_pr_reports_non_convergence_when_capped():
    mat = _monotone()
    c = torch.ones(2, mat.shape[0], dtype=torch.float64)
    _, _, info = peaceman_rachford(_dense(mat, 1.0), c, 1.0, tol=1e-14, max_iter=3)
    assert not info.converged and info.stop_reason == "max_iter" and info.iterations == 3


@pytest.mark.parametrize("padding,resolvent", [("circular", "dense"), ("zeros", "dense"), ("zeros", "cg"), ("zeros", "gmres")])
def test_mon_resolvent_solves_its_system_and_pr_matches_fb(padding, resolvent):
    torch.manual_seed(0)
    layer = MONConv2d(3, 4, (6, 6), MONConfig(padding=padding, solver="peaceman_rachford", tol=1e-9, max_iter=500,
                                              policy="ignore", pr_resolvent=resolvent, pr_inner_tol=1e-13,
                                              pr_inner_max_iter=400)).double()
    a, b = layer.A.weight, layer.B.weight
    # the convolution's adjoint (circular: the folded transposed convolution)
    u, v = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert abs(float((layer._conv(u, a) * v).sum() - (u * layer._conv_t(v, a)).sum())) < 1e-10
        res = layer.resolvent(a, b, 0.7)
        y = torch.randn(2, 4, 6, 6, dtype=torch.float64)
        r = res(y)
        assert float((r + 0.7 * layer.monotone_part(r, a, b) - y).norm() / y.norm()) < 1e-11
    kind = CircularResolvent if padding == "circular" else DenseResolvent if resolvent == "dense" else IterativeResolvent
    assert isinstance(layer._resolvent, kind)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    fb = MONConv2d(3, 4, (6, 6), MONConfig(padding=padding, tol=1e-11, max_iter=50000, policy="ignore")).double()
    fb.load_state_dict(layer.state_dict())
    fb.backward_config.tol = layer.backward_config.tol = 1e-11
    fb.backward_config.max_iter = layer.backward_config.max_iter = 5000
    grads = []
    for mod in (layer, fb):
        z = mod(x)
        assert mod.last_info.converged
        grads.append((z, torch.autograd.grad(z.pow(2).sum(), [x, *mod.parameters()])))
    assert layer.last_info.iterations < fb.last_info.iterations
    if resolvent in ("cg", "gmres"):  # every inner solve of both runs met its tolerance
        assert layer.last_info.inner_calls > 0 and layer.last_info.inner_unconverged == 0
        assert layer.last_info.backward.inner_calls > 0 and layer.last_info.backward.converged
    assert float((grads[0][0] - grads[1][0]).detach().norm() / grads[1][0].detach().norm()) < 1e-8
    g_pr, g_fb = torch.cat([g.reshape(-1) for g in grads[0][1]]), torch.cat([g.reshape(-1) for g in grads[1][1]])
    assert float((g_pr - g_fb).norm() / g_fb.norm()) < 1e-6


def test_resolvent_refreshed_only_when_weights_change():
    torch.manual_seed(0)
    layer = MONConv2d(2, 3, (5, 5), MONConfig(padding="circular", solver="peaceman_rachford", policy="ignore"))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        layer(x), layer(x)
    assert layer._resolvent.refreshes == 1
    layer(x).sum().backward()
    opt.step()
    with torch.no_grad():
        z = layer(x)
    assert layer._resolvent.refreshes == 2
    with torch.no_grad():  # the refreshed factor is the new weights' (the system is solved with them)
        y = torch.randn_like(z)
        r = layer._resolvent(y)
        rel = (r + layer.config.pr_alpha * layer.monotone_part(r, layer.A.weight, layer.B.weight) - y).norm() / y.norm()
    assert float(rel) < 1e-5


def test_pr_backward_reports_its_adjoint_solve_honestly():
    torch.manual_seed(0)
    layer = MONConv2d(2, 3, (5, 5), MONConfig(padding="circular", solver="peaceman_rachford", tol=1e-6,
                                              max_iter=200, policy="ignore"))
    layer.backward_config.tol, layer.backward_config.max_iter = 1e-12, 1
    x = torch.randn(2, 2, 5, 5)
    layer(x).pow(2).sum().backward()
    binfo = layer.last_info.backward
    assert binfo is not None and binfo.solver == "peaceman_rachford"
    assert not binfo.converged and binfo.stop_reason == "max_iter"


def test_circular_spectrum_brackets_the_dense_spectrum():
    from proxnets.equilibrium.models import _circular_spectrum, dense_matrix

    torch.manual_seed(1)
    layer = MONConv2d(2, 3, (5, 6), MONConfig(padding="circular", solver="peaceman_rachford"))
    a, b = layer.A.weight.detach().double(), layer.B.weight.detach().double()
    mat = dense_matrix(lambda v: layer.monotone_part(v, a, b), (3, 5, 6))
    mu_dense = float(torch.linalg.eigvalsh((mat + mat.T) / 2)[0])
    lip_dense = float(torch.linalg.matrix_norm(mat, 2))
    mu, lip = _circular_spectrum(layer, a, b)
    assert mu <= mu_dense < mu + 1e-9 and lip - 1e-9 < lip_dense <= lip


def _cg_layer(**kw):
    torch.manual_seed(3)
    cfg = dict(padding="zeros", solver="peaceman_rachford", pr_resolvent=kw.pop("resolvent", "cg"), policy="ignore")
    return MONConv2d(2, 3, (5, 4), MONConfig(**{**cfg, **kw})).double()


@pytest.mark.parametrize("resolvent", ["cg", "gmres"])
@pytest.mark.parametrize("transpose", [False, True])
def test_cg_resolvent_matches_a_dense_solve_within_its_error_bound(transpose, resolvent):
    """Zero padding, non-circulant M: CG on the normal equations equals the dense solve of (I + alpha M) x = y
    (or its transpose) within ``tol / (1 + alpha m)^2`` relative (sigma_min(I + alpha M) >= 1 + alpha m)."""
    from proxnets.equilibrium.models import dense_matrix

    layer = _cg_layer(m=0.5, resolvent=resolvent)
    a, b = layer.A.weight.detach(), layer.B.weight.detach()
    alpha, n = 0.8, 3 * 5 * 4
    mat = dense_matrix(lambda v: layer.monotone_part(v, a, b), (3, 5, 4))
    circ = dense_matrix(lambda v: layer.monotone_part(v, a, b, circular=True), (3, 5, 4))
    assert float((mat - circ).norm()) > 0.1 * float(mat.norm())  # premise: zero padding is not the circular M
    k = torch.eye(n, dtype=torch.float64) + alpha * mat
    y = torch.randn(4, 3, 5, 4, dtype=torch.float64)
    exact = torch.linalg.solve(k.T if transpose else k, y.reshape(4, -1).T).T.reshape(y.shape)
    for tol in (1e-4, 1e-10):
        layer._resolvent.tol = tol
        with torch.no_grad():
            x = layer.resolvent(a, b, alpha)(y, transpose=transpose)
        info = layer._resolvent.last_info
        assert info.converged and info.iterations < n
        err = (x - exact).reshape(4, -1).norm(dim=1) / x.reshape(4, -1).norm(dim=1)
        assert float(err.max()) <= tol * layer._resolvent.error_bound_factor * 1.01
    assert float(err.max()) < 1e-9


@pytest.mark.parametrize("resolvent", ["cg", "gmres"])
def test_unconverged_inner_solve_makes_the_run_unconverged(resolvent):
    """Inner CG capped at 1 iteration: the outer residual may pass tol, but the run is not converged,
    forward and backward, and policy "raise" raises."""
    from proxnets.utils.convergence import NonConvergenceError

    x = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    good = _cg_layer(tol=1e-6, max_iter=300, resolvent=resolvent)
    bad = _cg_layer(tol=1e-6, max_iter=300, pr_inner_max_iter=1, pr_inner_tol=1e-14, resolvent=resolvent)
    good.backward_config.tol = bad.backward_config.tol = 1e-6
    for layer, ok in ((good, True), (bad, False)):
        z = layer(x)
        z.pow(2).sum().backward()
        info = layer.last_info
        assert info.converged is ok and info.backward.converged is ok
        assert (info.inner_unconverged == 0) is ok and (info.backward.inner_unconverged == 0) is ok
        assert info.inner_calls == info.iterations  # one resolvent per PR step
    bad.config.policy = "raise"
    with pytest.raises(NonConvergenceError), torch.no_grad():
        bad(x)
    res = bad._resolvent
    _, _, info = peaceman_rachford(res, torch.ones(1, 3, 5, 4, dtype=torch.float64), res.alpha, tol=1e-6)
    assert not info.converged and info.inner_unconverged == info.inner_calls > 0


def test_cg_resolvent_gradients_equal_finite_differences():
    layer = _cg_layer(tol=1e-12, max_iter=500, pr_inner_tol=1e-14, pr_inner_max_iter=300)
    layer.backward_config.tol, layer.backward_config.max_iter = 1e-12, 500
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    c = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    loss = lambda: float((c * layer(x)).sum())  # noqa: E731
    (c * layer(x)).sum().backward()
    assert layer.last_info.converged and layer.last_info.backward.converged
    for p in (layer.A.weight, layer.B.weight, layer.U.bias):
        d = torch.randn_like(p)
        h = 1e-6
        with torch.no_grad():
            p.add_(h * d)
            up = loss()
            p.sub_(2 * h * d)
            down = loss()
            p.add_(h * d)
        fd = (up - down) / (2 * h)
        assert abs(float((p.grad * d).sum()) - fd) <= 1e-6 * max(1.0, abs(fd))
