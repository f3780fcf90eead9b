"""The equilibrium minimizes G; solvers behave as the theory says; one common test per registry entry."""

import warnings

import pytest
import torch

from proxnets.equilibrium.layers import OptEq, OptEqConv2d
from proxnets.equilibrium.prox import PROX_ACTIVATIONS, UserProx, get_activation
from proxnets.utils.threads import intra_op_threads
from proxnets.equilibrium.solvers import ADJOINT_SOLVERS, SOLVERS, EquilibriumInfo, halpern, solve
from proxnets.utils.convergence import NonConvergenceError, NonConvergenceWarning

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def single_thread():
    with intra_op_threads(1):
        yield


def _quadratic_user():
    return UserProx(lambda z: 0.25 * z.reshape(z.shape[0], -1).pow(2).sum(1), lambda v: v / 1.5, name="quad")


ACTIVATION_SPECS = [(name, get_activation(name)) for name in sorted(PROX_ACTIVATIONS)] + [("user", _quadratic_user())]
SOLVER_ITERS = {"fixed_point": 2000, "accelerated": 2000, "anderson": 500, "safeguarded_anderson": 500, "halpern": 20000}


def dense_layer(activation, solver="anderson", target=0.9, seed=0, **kw):
    torch.manual_seed(seed)
    layer = OptEq(6, 12, width=10, activation=activation, target_norm=target, solver=solver, **kw).double().eval()
    with torch.no_grad():
        layer.W.parametrizations.weight.original.mul_(3.0)  # make the norm bound active
    return layer


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("act_name,act", ACTIVATION_SPECS, ids=[n for n, _ in ACTIVATION_SPECS])
def test_common_every_solver_every_activation(solver, act_name, act):
    tol = 1e-3 if solver == "halpern" else 1e-9
    layer = dense_layer(act, solver=solver, tol=tol, max_iter=SOLVER_ITERS[solver], policy="raise")
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = layer(x)
    info = layer.last_info
    assert isinstance(info, EquilibriumInfo) and info.solver == solver
    assert info.converged and info.iterations == len(info.residuals) >= 1
    assert len(info.final_residual) == 5 and max(info.final_residual) <= tol
    assert z.shape == (5, 12) and torch.isfinite(z).all()
    # first-order optimality of G and minimality against perturbations
    assert layer.optimality_residual(z, x).max() <= tol
    with torch.no_grad():
        g_star = layer.objective(z, x)
        assert torch.isfinite(g_star).all()
        slack = 1e-3 if solver == "halpern" else 1e-8
        for scale in (1e-3, 1e-1, 1.0):
            d = scale * torch.randn(z.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(int(scale * 1000)))
            assert (g_star <= layer.objective(z + d, x) + slack * g_star.abs().clamp_min(1)).all()
            # for constrained f, also perturb inside the domain
            zd = act.prox(z + d)
            assert (g_star <= layer.objective(zd, x) + slack * g_star.abs().clamp_min(1)).all()


@pytest.mark.parametrize("solver,options", [("fixed_point", {}), ("accelerated", {"restart": "objective"})])
@pytest.mark.parametrize("act_name", ["relu", "soft_threshold", "box"])
def test_objective_non_increasing(solver, options, act_name):
    layer = OptEqConv2d(2, 4, (6, 6), activation=act_name, target_norm=0.97, solver=solver, solver_options=options,
                        tol=1e-10, max_iter=300, track_objective=True, policy="ignore").double().eval()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer(x)
    g = torch.tensor(layer.last_info.objectives)
    assert len(g) > 5
    assert (g[1:] <= g[:-1] + 1e-10 * g.abs().max()).all()


def test_accelerated_faster_than_plain_on_hard_problem():
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    its = {}
    for solver in ("fixed_point", "accelerated", "anderson"):
        torch.manual_seed(0)
        layer = OptEqConv2d(2, 4, (8, 8), activation="identity", target_norm=0.99, solver=solver, tol=1e-8,
                            max_iter=5000, policy="raise").double().eval()
        with torch.no_grad():
            layer.W.parametrizations.weight.original.mul_(10.0)
            layer(x)
        its[solver] = layer.last_info.iterations
    assert its["accelerated"] < its["fixed_point"] / 2
    assert its["anderson"] < its["fixed_point"] / 2


def _nonunique_problem(seed=0, n=8, k=3):
    """T(z) = P z + b with P an orthogonal projection (|W|_2 = 1, W = Q_k^T) and b orthogonal to range(P).

    Fix(T) = b + range(P); the point nearest an anchor a is b + P a.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    w = q[:, :k].T  # (k, n), W^T W = P
    p = w.T @ w
    b = (torch.eye(n, dtype=torch.float64) - p) @ torch.randn(n, generator=g, dtype=torch.float64)
    return w, p, b


def test_halpern_converges_to_fixed_point_nearest_anchor():
    w, p, b = _nonunique_problem()
    assert abs(torch.linalg.matrix_norm(w, 2) - 1) < 1e-12
    T = lambda z: z @ p + b  # noqa: E731  (identity activation, batch rows)
    anchors = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    z0 = torch.zeros(3, 8, dtype=torch.float64)  # start away from the anchors
    z, info = halpern(T, z0, anchor=anchors, tol=1e-4, max_iter=50000)
    assert info.converged
    nearest = anchors @ p + b
    assert torch.allclose(z, nearest, atol=2e-3)
    # the plain iteration from the same start reaches a different fixed point (b), not the nearest one
    zf, _ = solve("fixed_point", T, z0, tol=1e-10, max_iter=100)
    assert torch.allclose(zf, b.expand(3, -1), atol=1e-8)
    assert (zf - nearest).norm() > 0.5


def test_halpern_nearest_anchor_nonlinear_variational_inequality():
    # ReLU equilibria with |W|_2 = 1: b > 0 and range(P) orthogonal to b, so Fix(T) contains the
    # piece (b + range P) of the orthant: a convex set with many points. p = proj_Fix(a) iff
    # <a - p, q - p> <= 0 for all q in Fix.
    g = torch.Generator().manual_seed(1)
    n, k = 8, 3
    b = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    q_basis, _ = torch.linalg.qr(torch.cat([b[:, None], torch.randn(n, k, generator=g, dtype=torch.float64)], 1))
    w = q_basis[:, 1:].T  # (k, n): W^T W = P, range(P) orthogonal to b, |W|_2 = 1
    p = w.T @ w
    T = lambda z: torch.relu(z @ p + b)  # noqa: E731
    a = b + 0.8 * torch.randn(1, n, generator=g, dtype=torch.float64)
    z, info = halpern(T, a, tol=1e-5, max_iter=50000)
    assert info.converged
    others = []
    for s in range(20):
        z0 = b + torch.randn(1, n, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + s))
        q, qi = solve("fixed_point", T, z0, tol=1e-12, max_iter=5000)
        assert qi.converged
        others.append(q)
    q = torch.cat(others)
    assert (q - q[:1]).norm(dim=1).max() > 0.1  # the fixed points are not unique
    vi = ((a - z) * (q - z)).sum(1)
    assert (vi <= 1e-3).all()
    assert (a - z).norm() <= (a - q).norm(dim=1).min() + 1e-4


def test_warm_start_uses_previous_solution():
    layer = dense_layer("relu", warm_start=True, tol=1e-8, max_iter=500)
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        cold = layer.last_info.iterations
        layer(x)
    assert layer.last_info.iterations < cold


def test_nonconvergence_policy():
    layer = dense_layer("relu", solver="fixed_point", tol=1e-12, max_iter=2, policy="warn")
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.warns(NonConvergenceWarning, match="did not converge in 2 iterations"):
        with torch.no_grad():
            layer(x)
    assert not layer.last_info.converged
    layer.policy = "raise"
    with pytest.raises(NonConvergenceError):
        with torch.no_grad():
            layer(x)


def test_invalid_settings():
    with pytest.raises(ValueError, match="target_norm: expected a number in \\(0.0, 1.0\\)"):
        OptEq(3, 4, target_norm=1.0)
    with pytest.raises(ValueError, match="tol: expected"):
        OptEq(3, 4, tol=0.0)
    with pytest.raises(ValueError, match="solver: expected one of"):
        OptEq(3, 4, solver="broyden")
    with pytest.raises(ValueError, match="solver_options: expected options of 'anderson'"):
        OptEq(3, 4, solver="anderson", solver_options={"mm": 3})
    with pytest.raises(ValueError, match="backward: expected one of"):
        OptEq(3, 4, backward="ift")
    with pytest.raises(ValueError, match="x: expected shape"):
        OptEq(3, 4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="x: expected shape"):
        OptEqConv2d(1, 2, (5, 5))(torch.randn(2, 1, 6, 6))
    with pytest.raises(ValueError, match="z0: expected shape"):
        OptEq(3, 4)(torch.randn(2, 3), z0=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="restart: expected one of"):
        solve("accelerated", lambda z: z, torch.zeros(1, 2), restart="sometimes")
    with pytest.raises(ValueError, match="objective: expected"):
        solve("accelerated", lambda z: z, torch.zeros(1, 2), restart="objective")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OptEq(3, 4)  # valid settings raise nothing


def test_conjugate_gradient_solves_symmetric_affine_fixed_point():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 10, generator=g, dtype=torch.float64)
    m = 0.95 * (a + a.T) / torch.linalg.matrix_norm(a + a.T, 2)  # symmetric, |M|_2 = 0.95
    c = torch.randn(4, 10, generator=g, dtype=torch.float64)
    z, info = solve("conjugate_gradient", lambda z: z @ m + c, torch.zeros_like(c), tol=1e-12, max_iter=50,
                    registry=ADJOINT_SOLVERS)
    exact = torch.linalg.solve(torch.eye(10, dtype=torch.float64) - m, c.T).T
    assert info.converged and info.iterations <= 11  # CG: at most n + 1 checks in exact arithmetic
    assert torch.allclose(z, exact, atol=1e-10)
    with pytest.raises(ValueError, match="solver: expected one of"):
        solve("conjugate_gradient", lambda z: z, torch.zeros(1, 2))  # not a forward solver
