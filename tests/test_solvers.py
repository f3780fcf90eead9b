"""The shared solver core: one common test per registry entry, the stopping rules, the traps of issue 11."""

import warnings

import pytest
import torch

from proxnets.equilibrium.implicit import BackwardConfig, equilibrium
from proxnets.equilibrium.layers import OptEq
from proxnets.solvers import (
    ADJOINT_SOLVERS, SOLVERS, STOP_REASONS, SolverInfo, accelerated, anderson, check_solver_options, conjugate_gradient, fixed_point,
    register_solver, relative_residual, safeguarded_anderson, solve, solve_linear, solver_options,
)
from proxnets.utils.convergence import NonConvergenceWarning

# iterations each solver needs on the contraction below (Halpern converges like 1/k)
BUDGET = {"fixed_point": 500, "accelerated": 500, "anderson": 200, "safeguarded_anderson": 200, "halpern": 20000}
L = 0.8  # Lipschitz constant of the contraction


def _contraction(seed=0, n=6, dtype=torch.float32):
    """``T(z) = tanh(z S + c)``, ``S`` symmetric PSD with ``|S|_2 = L``: an L-contraction (tanh is 1-Lipschitz)
    and a proximal-gradient step of size 1 on a convex objective (tanh is the prox of a separable convex f;
    ``h(z) = z (I - S) z / 2 - <c, z>``), the setting every solver of the registry is made for."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    m = L * (a @ a.T) / torch.linalg.matrix_norm(a @ a.T, 2)
    c = 2 * torch.randn(3, n, generator=g, dtype=torch.float64)
    T64 = lambda z: torch.tanh(z @ m + c)  # noqa: E731
    m32, c32 = m.to(dtype), c.to(dtype)
    T = lambda z: torch.tanh(z @ m32 + c32)  # noqa: E731
    return T, T64, c


def _reference(T64, c, iters=100):
    """Newton's method in float64 on F(z) = T(z) - z over the whole batch (shares no code with the solvers)."""
    z = c.clone()
    F = lambda v: (T64(v.reshape(c.shape)) - v.reshape(c.shape)).reshape(-1)  # noqa: E731
    for _ in range(iters):
        jac = torch.autograd.functional.jacobian(F, z.reshape(-1))
        z_new = z - torch.linalg.solve(jac, F(z.reshape(-1))).reshape(c.shape)
        if (z_new - z).abs().max() < 1e-15:
            return z_new
        z = z_new
    return z


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_converges_on_a_contraction(name):
    T, T64, c = _contraction()
    z_star = _reference(T64, c)
    assert (T64(z_star) - z_star).abs().max() < 1e-12
    tol = 1e-4
    z, info = solve(name, T, torch.zeros(3, 6), tol=tol, max_iter=BUDGET[name])
    assert isinstance(info, SolverInfo) and info.solver == name
    assert info.converged and info.stop_reason == "tol" and not info.diverged
    assert info.iterations == len(info.residuals) == len(info.abs_residuals) >= 1
    assert info.residuals[-1] <= tol and max(info.final_residual) <= tol
    # the returned point is T(z_k) with |T(z_k) - z_k| <= tol * s_k, so |T(z_k) - z*| <= L / (1 - L) tol s_k
    scale = torch.maximum(z.double().norm(dim=1), z_star.norm(dim=1)) * 1.01
    err = (z.double() - z_star).norm(dim=1)
    assert (err <= L / (1 - L) * tol * scale + 1e-5).all(), (err, scale)


def _exploding(z):
    """No fixed point: ``exp(z) + 100`` overflows float32 at the second step (``e^101``)."""
    return torch.exp(z) + 100


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_solver_reports_a_divergent_map(name, dtype):
    z, info = solve(name, _exploding, torch.zeros(2, 6, dtype=dtype), tol=1e-4, max_iter=200)
    assert not info.converged and info.diverged
    assert info.stop_reason in ("nonfinite", "diverged")
    assert info.iterations < 200  # stopped by the rule, not by the budget
    assert torch.isfinite(z).all()  # never the non-finite iterate


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_stops_at_once_on_nan(name):
    z0 = torch.ones(2, 4)
    z, info = solve(name, lambda z: z * float("nan"), z0, tol=1e-4, max_iter=50)
    assert info.iterations == 1 and info.stop_reason == "nonfinite" and info.diverged and not info.converged
    assert torch.equal(z, z0)  # the last finite iterate


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_trap_relu_expansion_is_not_converged(name):
    # issue 11: today fixed_point, accelerated and halpern said converged=True with residual 0.0 here
    with pytest.warns(NonConvergenceWarning, match="did not converge"):
        z, info = equilibrium(lambda z: torch.relu(1.5 * z + 1), torch.zeros(2, 6), solver=name)
    assert not info.converged and info.stop_reason in STOP_REASONS
    # |z| grows like 1.5^k; Anderson instead stalls at residual ~1 (max_iter), and so does its safeguarded form
    # (its accepted candidates keep the residual bounded; the map is not averaged, so no guarantee applies)
    if name not in ("anderson", "safeguarded_anderson"):
        assert info.diverged and info.stop_reason == "diverged"
    assert torch.isfinite(z).all()


def test_residual_never_against_an_overflowed_norm():
    z = torch.full((1, 6), 1e20)  # finite entries whose float32 norm overflows
    r = relative_residual(z, 1.5 * z)
    assert not torch.isfinite(r).all() or float(r) > 0.1  # never a spurious 0
    _, info = fixed_point(lambda v: 1e25 * v + 1e25, torch.zeros(1, 6), tol=1e-4, max_iter=10)
    assert info.stop_reason == "nonfinite" and not info.converged
    # the scale is max(|T z|, |z|): a map to ~0 does not make every point look converged
    assert float(relative_residual(torch.ones(1, 3), torch.zeros(1, 3))) == 1.0


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_divergence_rule_ignores_round_off_at_the_fixed_point(name):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 32, generator=g)
    m = 0.8 * (a @ a.T) / torch.linalg.matrix_norm(a @ a.T, 2)
    c = torch.randn(4, 32, generator=g)
    # a 0.8-contraction in float32 with a tolerance below round-off: the run hovers at the noise level
    _, info = SOLVERS[name](lambda z: torch.sin(z @ m + c), torch.zeros(4, 32), tol=1e-15, max_iter=600)
    assert info.stop_reason == "max_iter" and not info.diverged and not info.converged


def test_unknown_option_raises_with_the_valid_list():
    with pytest.raises(ValueError, match=r"solver_options: expected options of 'anderson' among \['beta', 'divergence', 'lam', 'm'\]"):
        solve("anderson", lambda z: z, torch.zeros(1, 2), mm=3)
    with pytest.raises(ValueError, match=r"among \['divergence'\], got \['restart'\]"):
        check_solver_options("fixed_point", {"restart": "gradient"})
    with pytest.raises(ValueError, match="solver: expected one of"):
        solve("broyden", lambda z: z, torch.zeros(1, 2))
    assert solver_options(SOLVERS["accelerated"]) == ("divergence", "restart", "fused")


def test_register_solver_round_trip():
    def damped(T, z0, *, tol, max_iter, callback=None, objective=None, theta: float = 0.5):
        """Krasnosel'skii-Mann: the plain iteration of (1 - theta) I + theta T (same fixed points)."""
        z, info = fixed_point(lambda z: (1 - theta) * z + theta * T(z), z0, tol=tol, max_iter=max_iter,
                              callback=callback, objective=objective)
        info.solver = "damped"
        return z, info

    try:
        assert register_solver("damped", damped) is damped
        assert SOLVERS["damped"] is damped and ADJOINT_SOLVERS["damped"] is damped
        z, info = solve("damped", lambda z: 0.5 * z + 1, torch.zeros(2, 3), tol=1e-8, max_iter=500, theta=0.7)
        assert info.converged and info.solver == "damped" and torch.allclose(z, torch.full((2, 3), 2.0))
        with pytest.raises(ValueError, match=r"options of 'damped' among \['theta'\], got \['m'\]"):
            solve("damped", lambda z: z, torch.zeros(1, 2), m=2)
        with pytest.raises(TypeError, match="fn: expected a callable"):
            register_solver("bad", lambda T, z0: (z0, SolverInfo()))
    finally:
        SOLVERS.pop("damped", None)
        ADJOINT_SOLVERS.pop("damped", None)
    assert "damped" not in SOLVERS


def test_callback_sees_every_iteration():
    seen = []
    z, info = fixed_point(lambda z: 0.5 * z + 1, torch.zeros(1, 2), tol=1e-6, max_iter=100,
                          callback=lambda k, z, info: seen.append((k, z.clone())))
    assert [k for k, _ in seen] == list(range(1, info.iterations + 1))
    assert torch.equal(seen[-1][1], z)


def test_anderson_singular_system_falls_back_to_a_plain_step():
    # 1-D residuals g_0 = 1, g_1 = 0.5: <g_i, g_j> = [[1, .5], [.5, .25]] is exactly singular, and lam = 0
    z, info = anderson(lambda z: 0.5 * z + 1, torch.zeros(2, 1, dtype=torch.float64), tol=1e-10, max_iter=200, lam=0.0)
    assert info.converged and info.restarts >= 1
    assert torch.allclose(z, torch.full((2, 1), 2.0, dtype=torch.float64), atol=1e-8)


def _spd(n=12, cond=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)) @ q.T


def test_conjugate_gradient_on_spd_system_matches_linalg_solve():
    a = _spd()
    b = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.solve(a, b.T).T
    x, info = solve_linear(lambda v: v @ a, b, tol=1e-12, max_iter=100)
    assert info.converged and info.solver == "conjugate_gradient" and info.iterations <= 20  # n + 1 checks in exact arithmetic
    assert torch.allclose(x, exact, atol=1e-9)
    # the fixed-point form T(z) = z - (A z - b) = M z + b, M = I - A symmetric
    eye = torch.eye(12, dtype=torch.float64)
    z, info = solve("conjugate_gradient", lambda z: z @ (eye - a) + b, torch.zeros_like(b), tol=1e-12, max_iter=100,
                    registry=ADJOINT_SOLVERS)
    assert info.converged and torch.allclose(z, exact, atol=1e-9)


def test_conjugate_gradient_non_convergence_is_reported():
    a = _spd(cond=1e4)
    b = torch.randn(2, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, info = solve_linear(lambda v: v @ a, b, tol=1e-12, max_iter=3)
    assert not info.converged and info.stop_reason == "max_iter" and not info.diverged
    # an indefinite "SPD" system: non-positive curvature ends the run as diverged
    d = torch.diag(torch.tensor([1.0, -1.0, 2.0, 3.0], dtype=torch.float64))
    _, info = solve_linear(lambda v: v @ d, torch.ones(1, 4, dtype=torch.float64), tol=1e-12, max_iter=50)
    assert not info.converged and info.diverged and info.stop_reason == "diverged"
    _, info = conjugate_gradient(lambda z: z * float("nan"), torch.zeros(1, 3), tol=1e-6, max_iter=10)
    assert info.stop_reason == "nonfinite" and not info.converged


def test_blur_prox_records_cg_non_convergence():
    from proxnets.stable.physics import Blur, gaussian_kernel
    from proxnets.stable.pnp import pnp_fbs, pnp_drs

    physics = Blur(gaussian_kernel(5, 1.5).double(), "valid", cg_iterations=1, cg_tol=1e-12)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 1, 12, 12, dtype=torch.float64, generator=g)
    y = physics.A(torch.randn(1, 1, 12, 12, dtype=torch.float64, generator=g))
    with pytest.warns(NonConvergenceWarning, match="data prox: conjugate gradients did not converge"):
        physics.prox_data(z, y, 0.7)
    assert physics.last_cg_info is not None and not physics.last_cg_info.converged and physics.cg_unconverged == 1
    quiet = Blur(gaussian_kernel(5, 1.5).double(), "valid", cg_iterations=1, cg_tol=1e-12, cg_policy="ignore")
    _, info = pnp_drs(y, quiet, lambda v: v, max_iter=3, tol=1e-12, policy="ignore")
    assert info.inner_unconverged == 3  # one data prox per iteration, each reported
    _, info = pnp_fbs(y, quiet, lambda v: v, max_iter=3, tol=1e-12, policy="ignore")
    assert info.inner_unconverged == 0  # FBS uses no data prox


def test_pnp_reports_divergence():
    from proxnets.stable.physics import Denoising
    from proxnets.stable.pnp import pnp_admm, pnp_drs, pnp_fbs

    y = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x_true = y.clone()
    for solver in (pnp_fbs, pnp_drs, pnp_admm):
        with pytest.warns(NonConvergenceWarning, match="diverged"):
            x, info = solver(y, Denoising(), lambda v: 3.0 * v + 1.0, gamma=0.5, max_iter=200, tol=1e-6,
                             x_true=x_true, with_ssim=False)
        assert not info.converged and info.diverged, solver.__name__
        assert info.iterations < 200 and len(info.psnr) == info.iterations
        assert torch.isfinite(x).all()


def test_implicit_backward_info_reaches_the_forward_info():
    torch.manual_seed(0)
    layer = OptEq(4, 6, target_norm=0.95, tol=1e-6, max_iter=500, backward_tol=1e-12, backward_max_iter=1,
                  policy="ignore").double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    layer(x).sum().backward()
    back = layer.last_info.backward
    assert back is not None and not back.converged and back.stop_reason == "max_iter"
    # the generic (autograd) adjoint, with the warn policy
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z, info = equilibrium(lambda z: 0.5 * torch.tanh(z @ w), torch.ones(2, 3, dtype=torch.float64), tol=1e-10,
                              backward=BackwardConfig(solver="fixed_point", tol=1e-14, max_iter=1), policy="ignore")
    z.sum().backward()
    assert info.backward is not None and not info.backward.converged


# --- safeguarded Anderson (the KM guarantee kept by a residual safeguard) ---------------------------------------
def _reflect_clamp():
    """``S(x) = x/2 + clamp(x Q + c, -1, 1)/2`` with ``Q`` a 2x2 orthogonal reflection: ``clamp`` is firmly
    nonexpansive and ``Q`` an isometry, so ``S`` is a 1/2-averaged map (unique fixed point here). Found by a random
    search over such maps: unregularized Anderson (m = 5, lam = 0) blows up on it (residual 2.9e12 at step 8)."""
    q = torch.tensor([[-0.38185669585110626, -0.9242215447789972], [-0.9242215447789972, 0.38185669585110615]],
                     dtype=torch.float64)
    c = torch.tensor([[0.1672118887052519, 0.5285657955161001]], dtype=torch.float64)
    return lambda x: 0.5 * x + 0.5 * torch.clamp(x @ q + c, -1.0, 1.0)


def _random_reflect_clamp(seed: int):
    """``x/2 + clamp(x Q + c, -1, 1)/2`` with a random Householder reflection ``Q``: 1/2-averaged, as above."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, 1, generator=g, dtype=torch.float64)
    q = torch.eye(2, dtype=torch.float64) - 2 * (u @ u.T) / (u.T @ u)
    c = torch.randn(1, 2, generator=g, dtype=torch.float64)
    return lambda x: 0.5 * x + 0.5 * torch.clamp(x @ q + c, -1.0, 1.0)


def test_safeguarded_anderson_converges_where_plain_anderson_diverges():
    # whether plain Anderson blows up on one given map depends on the LAPACK least-squares round-off of the machine,
    # so the premise is checked on a family of 60 averaged maps: some of them make it diverge (28 of 200 where this
    # was written), and on every one of those the safeguarded method converges to the KM fixed point
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    diverged = 0
    for seed in range(60):
        S = _random_reflect_clamp(seed)
        _, plain = anderson(S, x0, tol=1e-10, max_iter=200, m=5, lam=0.0)
        assert not (plain.diverged and plain.converged)
        if not plain.diverged:
            continue
        diverged += 1
        z, info = safeguarded_anderson(S, x0, tol=1e-10, max_iter=400, m=5, lam=0.0)
        assert info.converged and not info.diverged
        assert float((S(z) - z).norm()) <= 1e-9 * max(1.0, float(z.norm()))
    assert diverged >= 1
    S = _reflect_clamp()
    z, info = safeguarded_anderson(S, x0, tol=1e-10, max_iter=200, m=5, lam=0.0)
    assert info.converged and info.stop_reason == "tol" and not info.diverged
    assert info.restarts >= 1  # the safeguard did reject candidates
    z_km, km = fixed_point(S, x0, tol=1e-13, max_iter=5000)
    assert km.converged and info.iterations < km.iterations  # and still accelerates the plain (KM) iteration
    assert (z - z_km).abs().max() < 1e-9  # the same fixed point (S is a contraction near it)


def test_safeguarded_anderson_same_fixed_point_as_km_and_rejections_keep_it():
    T, T64, c = _contraction(dtype=torch.float64)
    z_star = _reference(T64, c)
    for rho in (0.9, 1e-6):  # rho = 1e-6: nearly every candidate is rejected, the run is (mostly) KM
        z, info = safeguarded_anderson(T64, torch.zeros(3, 6, dtype=torch.float64), tol=1e-10, max_iter=500, rho=rho)
        assert info.converged and info.stop_reason == "tol"
        scale = torch.maximum(z.norm(dim=1), z_star.norm(dim=1))
        assert ((z - z_star).norm(dim=1) <= L / (1 - L) * 1e-10 * scale + 1e-14).all()
        if rho < 1e-3:
            assert info.restarts > 0
    # theta < 1: the KM step of T itself (every averaged S = (1 - theta) I + theta T has the same fixed points)
    z, info = safeguarded_anderson(T64, torch.zeros(3, 6, dtype=torch.float64), tol=1e-10, max_iter=500, theta=0.5)
    assert info.converged and (z - z_star).abs().max() < 1e-8


def test_safeguarded_anderson_capped_run_is_not_converged_and_options_are_checked():
    T, _, _ = _contraction(dtype=torch.float64)
    z, info = safeguarded_anderson(T, torch.zeros(3, 6, dtype=torch.float64), tol=1e-12, max_iter=2)
    assert info.stop_reason == "max_iter" and not info.converged and not info.diverged and info.iterations == 2
    assert max(info.final_residual) > 1e-12 and torch.isfinite(z).all()
    for bad in ({"rho": 1.0}, {"rho": 0.0}, {"theta": 0.0}, {"theta": 1.5}, {"m": 0}):
        with pytest.raises(ValueError):
            solve("safeguarded_anderson", T, torch.zeros(3, 6, dtype=torch.float64), **bad)


def test_safeguarded_anderson_returns_the_output_of_its_last_evaluation():
    # the OptEq layer attaches its implicit gradient to that very tensor (no extra evaluation of T)
    T, _, _ = _contraction()
    seen = {}

    def spy(z):
        seen["out"] = T(z)
        return seen["out"]

    z, info = safeguarded_anderson(spy, torch.zeros(3, 6), tol=1e-5, max_iter=100)
    assert info.converged and z is seen["out"]


# --- fused bookkeeping (``fused=True``): the same loop with compiled arithmetic kernels --------------------
# Claim (project, docs/opteq.md "Benchmark"): the fused path runs the eager path's iteration, so on a fixed
# problem it takes the same number of iterations, ends with the same flags and returns the same point up to
# float32 round-off (FUSED_RTOL relative). Broken variant: a fused kernel with a sign flipped fails the same check.
# The default run checks the fused kernels' arithmetic and the loop's wiring with the kernels run uncompiled
# (``uncompiled_fused``: no compile cost); the slow tests compile them (tiny shapes, still ~10-40 s cold).
FUSED_RTOL = 1e-4


@pytest.fixture
def uncompiled_fused(monkeypatch):
    """A fresh fused kernel set whose "compiled" forms are the fusable functions themselves, run eagerly."""
    import proxnets.solvers as S

    kernels = S._Bookkeeping(True)
    for name in S._Bookkeeping.COMPILED:
        kernel = getattr(kernels, name)
        kernel.compiled = kernel.fusable
    monkeypatch.setattr(S, "_FUSED", kernels)
    return kernels


def _spd32(n=12, seed=0, cond=30.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(0, float(torch.log10(torch.tensor(cond))), n, dtype=torch.float64)) @ q.T
    return a.float(), torch.randn(3, n, generator=g)


def _same_run(i0, i1) -> bool:
    return (i0.iterations, i0.stop_reason, i0.converged, i0.diverged, i0.restarts) == (
        i1.iterations, i1.stop_reason, i1.converged, i1.diverged, i1.restarts)


def _agree(run, tol=FUSED_RTOL) -> bool:
    """Fused and eager runs of ``run(fused) -> (z, info)``: same iterations, flags and stop, same point."""
    (z0, i0), (z1, i1) = run(False), run(True)
    scale = z0.abs().max().clamp_min(1e-30)
    return _same_run(i0, i1) and bool(torch.isfinite(z1).all()) and float((z1 - z0).abs().max() / scale) <= tol


def _cg_run(fused):
    a, b = _spd32()
    return solve_linear(lambda v: v @ a, b, tol=1e-6, max_iter=100, fused=fused)


def _fista_run(fused, restart="gradient"):
    T, _, _ = _contraction()
    return solve("accelerated", T, torch.zeros(3, 6), tol=1e-6, max_iter=500, restart=restart, fused=fused,
                 objective=(lambda z: (z * z).sum(1)) if restart == "objective" else None)


def _broken_cg_update(x, r, p, ap, rs):  # x -= alpha p instead of x += alpha p
    import proxnets.solvers as S

    pap, rs_new, *_ = S._cg_update_fusable(x, r, p, ap, rs)
    x.addcmul_(S._expand(rs / pap.clamp_min(1e-30), x), p, value=-2.0)
    return (pap, rs_new) + S._cg_norms(rs_new, S._flat_dot(x, x), S._flat_dot(x, r))


def _broken_norms(y, z_new, z, diff, d, gradient):  # <z_{k+1} - y_k, ...>: the restart test's sign flipped
    import proxnets.solvers as S

    norms = S._fista_norms_fusable(y, z_new, z, diff, d, gradient)
    return norms[:3] + ((-norms[3],) if gradient else (None,))


def _fused_claims(kernels) -> None:
    """Every check of the fused path; shapes shared, so each kernel compiles once per restart mode."""
    a, b = _spd32()
    assert _agree(_cg_run)
    x, info = _cg_run(True)
    assert info.converged and info.iterations > 3 and torch.allclose(x @ a, b, atol=1e-4)
    # the conjugate_gradient entry point (the affine fixed-point form) too
    assert _agree(lambda f: conjugate_gradient(lambda z: z - z @ a + b, torch.zeros(3, 12), tol=1e-6, max_iter=100,
                                               fused=f))
    # failures are reported as by the eager path: non-finite map, indefinite system, budget
    for A, tol, cap in ((lambda v: v @ a * float("nan"), 1e-6, 20), (lambda v: v @ torch.diag(torch.linspace(-1, 2, 12)),
                                                                      1e-6, 50), (lambda v: v @ a, 1e-12, 3)):
        (_, i0), (_, i1) = (solve_linear(A, b, tol=tol, max_iter=cap, fused=f) for f in (False, True))
        assert _same_run(i0, i1) and not i1.converged and i1.stop_reason != "tol"
        assert i1.diverged == (i1.stop_reason in ("nonfinite", "diverged"))
    for restart in ("gradient", "objective", "none"):
        assert _agree(lambda f: _fista_run(f, restart))
        z, info = _fista_run(True, restart)
        assert info.converged and (restart == "none" or info.restarts > 0)
    # relu(1.5 z + 1) has no fixed point and grows geometrically; z + inf is not finite
    for T, z0 in ((lambda z: torch.relu(1.5 * z + 1.0), torch.zeros(3, 6)), (lambda z: z + float("inf"), torch.ones(3, 6))):
        (_, i0), (z1, i1) = (accelerated(T, z0, tol=1e-6, max_iter=200, fused=f) for f in (False, True))
        assert _same_run(i0, i1) and not i1.converged and i1.diverged and torch.isfinite(z1).all()
    with pytest.raises(TypeError, match="fused: expected a bool"):
        solve_linear(lambda v: v @ a, b, fused="yes")
    # broken variants: a wrong sign in a fused axpy fails the agreement check
    for name, broken, run in (("cg_update", _broken_cg_update, _cg_run), ("fista_norms", _broken_norms, _fista_run)):
        kernel = getattr(kernels, name)
        intact, kernel.compiled = kernel.compiled, broken
        try:
            assert not _agree(run)
        finally:
            kernel.compiled = intact


def test_fused_kernels_run_the_eager_iteration_and_broken_kernels_fail(uncompiled_fused):
    _fused_claims(uncompiled_fused)


@pytest.mark.slow
def test_fused_kernels_compiled_run_the_eager_iteration_and_broken_kernels_fail():
    import proxnets.solvers as S

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback to eager would make this vacuous
        _fused_claims(S._FUSED)
    for name in S._Bookkeeping.COMPILED:
        kernel = getattr(S._FUSED, name)
        assert kernel.failure is None and kernel.compiled is not kernel.fusable
    assert S._FUSED.cg_direction is S._cg_direction


def test_fused_falls_back_to_eager_with_a_warning_when_compilation_fails(monkeypatch):
    import proxnets.solvers as S

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(S, "_FUSED", S._Bookkeeping(True))
    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.warns(RuntimeWarning, match="torch.compile of the 'cg_update' kernel failed.*no C\\+\\+ compiler"):
        x1, i1 = _cg_run(True)
    x0, i0 = _cg_run(False)
    assert torch.equal(x0, x1) and i0.residuals == i1.residuals and S._FUSED.cg_update.failure


def test_fused_options_reach_the_opteq_layer_and_give_the_eager_gradient(uncompiled_fused):
    from proxnets.equilibrium.layers import OptEqConv2d

    calls = {}
    for name in ("cg_update", "fista_norms"):
        kernel = getattr(uncompiled_fused, name)
        kernel.compiled = lambda *a, _f=kernel.fusable, _n=name: (calls.__setitem__(_n, calls.get(_n, 0) + 1), _f(*a))[1]
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        layer = OptEqConv2d(2, 3, (5, 5), solver="accelerated", solver_options={"fused": fused},
                            backward_options={"fused": fused}, tol=1e-6, max_iter=300, policy="raise").eval()
        x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(1))
        z = layer(x)
        grads = torch.autograd.grad((z * torch.linspace(-1, 1, z.numel()).reshape(z.shape)).sum(), list(layer.parameters()))
        info = layer.last_info
        results.append((z.detach(), grads, (info.iterations, info.backward.iterations, info.converged)))
    (z0, g0, it0), (z1, g1, it1) = results
    assert it0 == it1 and it1[2] and calls.get("cg_update", 0) >= it1[1] - 1 and calls.get("fista_norms", 0) >= it1[0]
    assert torch.allclose(z0, z1, rtol=1e-4, atol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(g0, g1))
    with pytest.raises(ValueError, match="fused"):
        OptEqConv2d(2, 3, (5, 5), backward_solver="anderson", backward_options={"fused": True})
