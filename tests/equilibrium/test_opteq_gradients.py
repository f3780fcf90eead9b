"""Implicit gradients equal finite differences (float64) and unrolled gradients at convergence."""

import pytest
import torch

from proxnets.equilibrium.implicit import BackwardConfig, equilibrium
from proxnets.equilibrium.layers import OptEq, OptEqConv2d
from proxnets.utils.threads import intra_op_threads

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def single_thread():
    with intra_op_threads(1):
        yield


def _layer(kind, activation, backward="implicit", seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(activation=activation, target_norm=0.9, tol=1e-12, max_iter=2000, backward=backward,
                backward_tol=1e-12, backward_max_iter=2000, policy="raise", **kw)
    if kind == "dense":
        layer = OptEq(5, 9, width=7, **opts)
    else:
        layer = OptEqConv2d(2, 3, (5, 5), **opts)
    layer = layer.double().eval()  # eval: the power-iteration vector is frozen, the map deterministic
    with torch.no_grad():
        layer.W.parametrizations.weight.original.mul_(2.0)
    return layer


def _input(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 5) if kind == "dense" else (2, 2, 5, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _loss(layer, x, c):
    return (c * layer(x)).sum()


def _params(layer):
    return {
        "U.weight": layer.U.weight,
        "U.bias": layer.U.bias,
        "W.original": layer.W.parametrizations.weight.original,
    }


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("activation,backward_solver", [("relu", "anderson"), ("soft_threshold", "accelerated"),
                                                        ("identity", "fixed_point"), ("box", "conjugate_gradient"),
                                                        ("relu", "conjugate_gradient")])
def test_implicit_gradient_matches_finite_differences(kind, activation, backward_solver):
    layer = _layer(kind, activation, backward_solver=backward_solver)
    x = _input(kind).requires_grad_()
    with torch.no_grad():
        c = torch.randn(layer(x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert _fd_error(layer, x, c) <= 1e-6


def _fd_error(layer, x, c) -> float:
    """Largest ``|finite difference - implicit gradient| / max(1, |fd|)`` over 4 random coordinates of x and of
    every parameter (central differences, step 1e-6, float64); the backward must report convergence."""
    loss = _loss(layer, x, c)
    grads = torch.autograd.grad(loss, [x, *_params(layer).values()])
    assert layer.last_info.backward is not None and layer.last_info.backward.converged
    eps, worst = 1e-6, 0.0
    g = torch.Generator().manual_seed(3)
    for (name, tensor), grad in zip([("x", x), *_params(layer).items()], grads):
        flat = tensor.data.view(-1)
        for idx in torch.randint(0, flat.numel(), (4,), generator=g).tolist():
            old = flat[idx].item()
            with torch.no_grad():
                flat[idx] = old + eps
                up = _loss(layer, x, c).item()
                flat[idx] = old - eps
                down = _loss(layer, x, c).item()
                flat[idx] = old
            fd = (up - down) / (2 * eps)
            worst = max(worst, abs(fd - grad.view(-1)[idx].item()) / max(1.0, abs(fd)))
    return worst


def _broken_adjoint(layer, variant):
    """The layer with a broken symmetrized adjoint (:meth:`OptEqBase.adjoint_pre` given a wrong ``s``):
    ``"no-mask"`` drops the active set (``s = 1``: CG on ``I - W^T W``, SPD, so it converges, to the wrong
    point); ``"d-for-sqrt"`` uses ``d`` where ``sqrt(d)`` belongs (equal for a 0/1 derivative, wrong for tanh)."""
    base = type(layer)

    class Broken(base):
        def adjoint_pre(self, v, s, w):
            return base.adjoint_pre(self, v, torch.ones_like(s) if variant == "no-mask" else s * s, w)

    layer.__class__ = Broken
    return layer


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("activation,variant", [("relu", "no-mask"), ("tanh", "d-for-sqrt")])
def test_broken_symmetrized_adjoint_fails_the_gradient_check(kind, activation, variant):
    # the CG backward on the active-set system passes the finite-difference check; each broken variant converges
    # (CG reports it) and fails the same check by orders of magnitude
    x = _input(kind).requires_grad_()
    errors = {}
    for name in ("intact", variant):
        layer = _layer(kind, activation, backward_solver="conjugate_gradient")
        if name != "intact":
            layer = _broken_adjoint(layer, variant)
        with torch.no_grad():
            c = torch.randn(layer(x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        errors[name] = _fd_error(layer, x, c)
    assert errors["intact"] <= 1e-6, errors
    assert errors[variant] > 1e-3, errors


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_implicit_equals_unrolled_at_convergence(kind):
    x = _input(kind)
    grads = {}
    for backward in ("implicit", "unrolled"):
        layer = _layer(kind, "relu", backward=backward)
        loss = layer(x).pow(2).sum()
        grads[backward] = torch.autograd.grad(loss, list(_params(layer).values()))
    for gi, gu in zip(grads["implicit"], grads["unrolled"]):
        assert torch.allclose(gi, gu, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backward_solver", ["anderson", "accelerated", "fixed_point", "conjugate_gradient"])
def test_generic_adjoint_equals_symmetrized_adjoint(backward_solver):
    # autograd's J^T g with a generic solver gives the same gradient as the layer's symmetrized adjoint
    layer = _layer("dense", "soft_threshold", backward_solver=backward_solver)
    x = _input("dense")
    g_closed = torch.autograd.grad(layer(x).sin().sum(), layer.U.weight)[0]
    inj = layer.injection(x)
    w = layer.W.weight
    z, _ = equilibrium(layer.fixed_point_map(inj, w), torch.zeros_like(inj), tol=1e-12, max_iter=2000,
                       backward=BackwardConfig(tol=1e-12, max_iter=2000), policy="raise")
    g_auto = torch.autograd.grad(z.sin().sum(), layer.U.weight)[0]
    assert torch.allclose(g_closed, g_auto, rtol=1e-8, atol=1e-10)


def test_phantom_gradient_is_a_descent_direction():
    layer = _layer("dense", "relu", backward="phantom")
    x = _input("dense")
    g_ph = torch.autograd.grad(layer(x).pow(2).sum(), layer.U.weight)[0]
    exact = _layer("dense", "relu")
    g_ex = torch.autograd.grad(exact(x).pow(2).sum(), exact.U.weight)[0]
    cos = (g_ph * g_ex).sum() / (g_ph.norm() * g_ex.norm())
    assert cos > 0.5


def test_generic_adjoint_refuses_accelerated():
    with pytest.raises(ValueError, match="backward_solver: expected one of"):
        x = torch.randn(2, 3, requires_grad=True)
        equilibrium(lambda z: 0.5 * torch.tanh(z + x), torch.zeros(2, 3), backward=BackwardConfig(solver="accelerated"))
