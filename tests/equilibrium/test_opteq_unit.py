"""The unit layer u -> W^T sigma(W u + b): its two variable forms are one convex problem, and a
feed-forward network decomposes into unit layers with the output unchanged (float64)."""

import pytest
import torch
from torch import nn

from proxnets.equilibrium.models import dense_matrix
from proxnets.equilibrium.unit import UnitOptEq, conjugate_potential, decompose
from proxnets.equilibrium.prox import get_activation


def _unit(act, form="h", seed=0):
    torch.manual_seed(seed)
    m = UnitOptEq(5, 7, 9, form=form, activation=act, tol=1e-12, max_iter=5000, policy="raise").double().eval()
    with torch.no_grad():
        m.W.parametrizations.weight.original.mul_(5.0)  # the norm bound 0.97 is active
    return m


@pytest.mark.parametrize("act", ["relu", "tanh", "leaky_relu"])
def test_u_and_h_forms_give_the_same_equilibrium_output_and_optimal_value(act):
    m = _unit(act)
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m.form = "h"
        u_h = m(x)
        m.form = "u"
        u_u = m(x)
        inj, w = m.injection(x), m.W.weight
        h_star = m.activation.prox(m.apply_wt(u_u, w) + inj)  # h* = sigma(W u* + b)
        assert torch.allclose(u_h, u_u, atol=1e-9)  # the same network output u* = W^T h*
        p, g = m.objective_u(u_u, x), m.objective(h_star, x)
        assert torch.allclose(p, g, atol=1e-9, rtol=1e-9)  # min P = min G
        # each is a minimizer of its own objective: random perturbations never decrease it
        gen = torch.Generator().manual_seed(2)
        for _ in range(20):
            d = 1e-3 * torch.randn(u_u.shape, generator=gen, dtype=torch.float64)
            assert (m.objective_u(u_u + d, x) >= p - 1e-12).all()
            hd = m.activation.prox(h_star + 1e-3 * torch.randn(h_star.shape, generator=gen, dtype=torch.float64))
            assert (m.objective(hd, x) >= g - 1e-12).all()


def test_both_forms_train_with_the_same_gradient():
    m = _unit("relu")
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for form in ("h", "u"):
        m.form = form
        loss = m(x).sin().sum()
        grads[form] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(m.parameters()))])
    assert torch.allclose(grads["h"], grads["u"], rtol=1e-6, atol=1e-9)


def _nets():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5), nn.Sigmoid(),
                          nn.Linear(5, 3))
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                         nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(36, 4), nn.Softsign(), nn.Linear(4, 3))
    return [(dense.double(), (6,)), (conv.double(), (2, 6, 6))]


@pytest.mark.parametrize("net,in_shape", _nets(), ids=["dense", "conv"])
def test_decomposition_keeps_the_output_and_every_unit_is_a_prox(net, in_shape):
    chain = decompose(net, in_shape)
    x = torch.randn(5, *in_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(chain(x), net(x), atol=1e-12, rtol=1e-12)
    for unit in chain.units:
        # |W|_2 < 1: exact SVD of the unit weight's dense matrix
        def apply(u, unit=unit):
            return unit.pre(u) - unit.bias(unit.pre(u))
        W = dense_matrix(apply, (unit.n + unit.m,))
        assert float(torch.linalg.matrix_norm(W, 2)) < 1.0
        # unit = grad of the convex potential phi (autograd), and nonexpansive: a prox (Moreau)
        u = torch.randn(6, unit.n + unit.m, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        u.requires_grad_()
        grad = torch.autograd.grad(unit.potential(u).sum(), u)[0]
        assert torch.allclose(unit(u), grad, atol=1e-8)
        v = u.detach() + 0.5 * torch.randn(u.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            assert ((unit(u) - unit(v)).norm(dim=1) <= (u - v).norm(dim=1) + 1e-12).all()


def test_conjugate_potential_of_relu_is_half_positive_part_squared():
    y = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(1, -1)
    assert torch.allclose(conjugate_potential(get_activation("relu"), y), 0.5 * torch.relu(y).pow(2).sum(1))


def test_decompose_rejects_a_non_prox_activation():
    with pytest.raises(ValueError, match="activation: expected nn.ReLU"):
        decompose(nn.Sequential(nn.Linear(3, 3), nn.GELU()), (3,))
    with pytest.raises(TypeError, match=r"seq\[0\]: expected nn.Linear"):
        decompose(nn.Sequential(nn.ReLU()), (3,))
