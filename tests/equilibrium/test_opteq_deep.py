"""Deep OptEq: one joint equilibrium with one objective; its certificate's bounds are bounds."""

import pytest
import torch
from torch.nn.utils import parametrize

from proxnets.equilibrium.deep import DeepOptEq, DeepOptEqConv2d, SequentialOptEq, certify_equilibrium
from proxnets.equilibrium.unit import UnitOptEq
from proxnets.solvers import solve


def _deep(seed=0, scale=30.0):
    torch.manual_seed(seed)
    m = DeepOptEq(5, [6, 7, 4], tol=1e-12, max_iter=5000, policy="raise").double().eval()
    with torch.no_grad():
        m.W.parametrizations.weight.original.mul_(scale)  # the bound 0.97 is active
    return m


def _x(seed=1):
    return torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _deep_conv(batch=3):
    torch.manual_seed(0)
    m = DeepOptEqConv2d(2, [2, 3, 2], (5, 4), tol=1e-12, max_iter=5000, policy="raise").double().eval()
    with torch.no_grad():
        m.W.parametrizations.weight.original.mul_(30.0)  # the bound 0.97 is active
    m.train().eval()  # refresh the norm estimate after the rescaling
    return m, torch.randn(batch, 2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_joint_equilibrium_minimizes_the_joint_objective_with_feedback():
    m, x = _deep(), _x()
    with torch.no_grad():
        z = m.joint(x)
        inj, w = m.injection(x), m.W.weight
        g = m.objective(z, inj=inj, w=w)
        gen = torch.Generator().manual_seed(2)
        for _ in range(20):  # a minimizer: feasible perturbations never decrease G
            zd = m.activation.prox(z + 1e-3 * torch.randn(z.shape, generator=gen, dtype=torch.float64))
            assert (m.objective(zd, inj=inj, w=w) >= g - 1e-12).all()
        # one joint problem: the last layer's bias moves the first layer's state (feedback through W^T W)
        m.U.rest_bias[-4:] += 1.0
        z2 = m.joint(x)
        assert float((m.block(z2, 0) - m.block(z, 0)).abs().max()) > 1e-6
    w = m.W.weight.detach()
    assert float(w[:6, 6:].abs().max()) == 0.0 and float(w[13:, :6].abs().max()) == 0.0


def test_sequential_variant_has_no_feedback():
    torch.manual_seed(0)
    seq = SequentialOptEq(5, [6, 4], tol=1e-10, max_iter=2000).double().eval()
    x = _x()
    with torch.no_grad():
        first = seq[0](x)
        seq[1].U.bias += 1.0
        assert torch.equal(seq[0](x), first)


@pytest.mark.parametrize("joint", ["dense", "conv"])
def test_deep_implicit_gradient_equals_unrolled(joint):
    m, x = (_deep(), _x()) if joint == "dense" else _deep_conv(batch=2)
    grads = {}
    for mode in ("implicit", "unrolled"):
        m.backward_config.mode = mode
        m.backward_config.tol, m.backward_config.max_iter = 1e-12, 5000
        loss = m(x).sin().sum()
        grads[mode] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(m.parameters()))])
    assert torch.allclose(grads["implicit"], grads["unrolled"], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("make", [_deep, lambda: UnitOptEq(5, 7, 9).double().eval()], ids=["deep", "unit"])
def test_joint_certificate_holds_and_its_bounds_bound_the_truth(make):
    m, x = make(), _x()
    certs = {c.name: c for c in certify_equilibrium(m, x, tol=1e-4)}
    assert all(c.holds and c.rigorous for c in certs.values()), [c.line() for c in certs.values()]
    # the truth, from an independent float64 solve to 1e-13
    with torch.no_grad():
        inj, w = m.injection(x), m.W.weight
        T = m.fixed_point_map(inj, w)
        z_star, info = solve("fixed_point", T, torch.zeros_like(inj), tol=1e-14, max_iter=20000)
        assert info.converged
        z, _ = solve("anderson", T, torch.zeros_like(inj), tol=0.5e-4, max_iter=2000)  # the certificate's point
        y = T(z)
        true_dist = float(((z - z_star).norm(dim=1) / y.norm(dim=1)).max())
        G = lambda v: m.objective(v, inj=inj, w=w)  # noqa: E731
        true_gap = float(((G(y) - G(z_star)) / G(y).abs()).max())
    assert true_dist <= certs["distance_to_minimizer"].value
    assert true_gap <= certs["objective_gap"].value


class _Scale(torch.nn.Module):
    def forward(self, w):
        return 1.3 * w


@pytest.mark.parametrize("joint", ["dense", "conv"])
def test_joint_certificate_fails_past_the_norm_bound(joint):
    m, x = (_deep(), _x()) if joint == "dense" else _deep_conv()
    parametrize.register_parametrization(m.W, "weight", _Scale())  # |W|_2 = 1.26: G no longer convex
    certs = {c.name: c for c in certify_equilibrium(m, x, max_iter=50)}
    assert not certs["operator_norm"].holds
    assert not certs["distance_to_minimizer"].holds and not certs["objective_gap"].holds


def test_blockwise_products_equal_the_dense_masked_matrix():
    m, x = _deep(), _x()
    w = m.W.weight.detach()
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, w.shape[1], dtype=torch.float64, generator=gen)
    q = torch.randn(4, w.shape[1], dtype=torch.float64, generator=gen)
    assert torch.allclose(m.apply_w(z, w), z @ w.T, atol=1e-12)
    assert torch.allclose(m.apply_wt(z, w), z @ w, atol=1e-12)
    mask = m.W.parametrizations.weight[0].mask.double()
    dense = (z @ w.T).T @ q + (q @ w.T).T @ z
    assert torch.allclose(m.weight_grad(z, z @ w.T, q, w), dense * mask, atol=1e-12)
