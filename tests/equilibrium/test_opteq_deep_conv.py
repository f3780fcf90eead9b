"""Convolutional deep OptEq: one joint equilibrium of convolutional unit layers, tested as theory.

The joint fixed point satisfies the KKT conditions of the joint objective written with the *dense* matrix of
the joint operator (built column by column, independent of the convolutions the layer applies), so it is the
minimizer of that convex problem; the joint certificate's a-posteriori bounds bound the true distance and gap
to a long reference solve; and the bounds fail past the norm bound.
"""

import pytest
import torch
import torch.nn.functional as F

from proxnets.equilibrium import DeepOptEqConv2d, OptEqConv2d, certify_equilibrium
from proxnets.solvers import solve

SIZES, SPATIAL, IN = [2, 3, 2], (5, 4), 2


def _deep(seed=0, scale=30.0, tol=1e-12, **kw):
    torch.manual_seed(seed)
    m = DeepOptEqConv2d(IN, SIZES, SPATIAL, tol=tol, max_iter=5000, policy="raise", **kw).double().eval()
    with torch.no_grad():
        m.W.parametrizations.weight.original.mul_(scale)  # the bound 0.97 is active
        m.U.rest_bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(seed + 7))
    m.train().eval()  # refresh the norm estimate after the rescaling
    return m


def _x(seed=1, batch=3):
    return torch.randn(batch, IN, *SPATIAL, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _dense_w(m):
    """The matrix of ``z -> W z`` on the flattened state, one basis vector at a time (no conv algebra reused)."""
    n = sum(SIZES) * SPATIAL[0] * SPATIAL[1]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, sum(SIZES), *SPATIAL)
    with torch.no_grad():  # the full masked kernel, not the layer's blockwise products
        return F.conv2d(basis, m.W.weight, padding=m.kernel_size // 2).reshape(n, -1).T  # column j = W e_j


def test_joint_weight_is_block_lower_bidiagonal_and_under_its_bound():
    m = _deep()
    w = _dense_w(m).reshape(sum(SIZES), SPATIAL[0] * SPATIAL[1], sum(SIZES), -1)
    s = m.starts
    for l in range(len(SIZES)):
        for k in range(len(SIZES)):
            blk = w[s[l]:s[l + 1], :, s[k]:s[k + 1]].abs().max()
            assert (blk > 0) if k in (l, l - 1) else (blk == 0), (l, k)
    assert float(torch.linalg.matrix_norm(_dense_w(m), ord=2)) <= 0.97 * (1 + 1e-9)
    assert m.operator_norm() >= float(torch.linalg.matrix_norm(_dense_w(m), ord=2)) - 1e-12  # a rigorous upper bound


def test_joint_fixed_point_is_the_minimizer_of_the_joint_objective():
    m, x = _deep(), _x()
    with torch.no_grad():
        z = m.joint(x)
        assert m.last_info.converged
        inj = m.injection(x).reshape(x.shape[0], -1)
        wd = _dense_w(m)
        zf = z.reshape(x.shape[0], -1)
        # the objective the layer reports is the dense quadratic 1/2 z^T (I - W^T W) z - <inj, z> (f = 0 on z >= 0)
        dense_G = 0.5 * (zf * zf).sum(1) - 0.5 * ((zf @ wd.T) ** 2).sum(1) - (inj * zf).sum(1)
        assert torch.allclose(m.objective(z, inj=m.injection(x), w=m.W.weight), dense_G, rtol=1e-12, atol=1e-12)
        # KKT of min G over z >= 0 (G convex since |W|_2 < 1, so KKT <=> global minimizer):
        # z >= 0, grad >= 0, z_i grad_i = 0 with grad = (I - W^T W) z - inj
        grad = zf - (zf @ wd.T) @ wd - inj
        scale = float(inj.abs().max())
        assert float(zf.min()) >= 0.0
        assert float(grad.min()) >= -1e-9 * scale
        assert float((zf * grad).abs().max()) <= 1e-9 * scale ** 2
        assert int((zf > 0).sum()) > 0 and int((zf == 0).sum()) > 0  # both parts of the KKT are exercised
        # one joint problem: the last layer's bias moves the first layer's state (feedback through W^T W)
        m.U.rest_bias[-SIZES[-1]:] += 1.0
        z2 = m.joint(x)
        assert float((m.block(z2, 0) - m.block(z, 0)).abs().max()) > 1e-6


def test_joint_certificate_bounds_hold_against_a_long_reference_solve():
    m, x = _deep(tol=1e-3), _x()
    with torch.no_grad():
        z = m.joint(x)  # a loose equilibrium (tol 1e-3): the bounds have something to bound
        certs = {c.name: c for c in certify_equilibrium(m, x, z=z, tol=1e-3)}
        assert all(c.holds and c.rigorous for c in certs.values()), [c.line() for c in certs.values()]
        inj, w = m.injection(x), m.W.weight
        T = m.fixed_point_map(inj, w)
        z_star, info = solve("fixed_point", T, torch.zeros_like(inj), tol=1e-14, max_iter=20000)
        assert info.converged
        y = T(z.clone())
        bsz = z.shape[0]
        true_dist = float(((z - z_star).reshape(bsz, -1).norm(dim=1) / y.reshape(bsz, -1).norm(dim=1)).max())
        G = lambda v: m.objective(v, inj=inj, w=w)  # noqa: E731
        true_gap = float(((G(y) - G(z_star)) / G(y).abs()).max())
    assert 0 < true_dist <= certs["distance_to_minimizer"].value
    assert 0 <= true_gap <= certs["objective_gap"].value


@pytest.mark.parametrize("anchor", ["linear", "feedforward"])
def test_joint_selection_at_norm_1_is_the_minimizer_of_g_eps(anchor):
    # |W|_2 = 1 (bound active): the joint equilibria need not be unique; with eps > 0 the layer's fixed point is the
    # minimizer of G + eps/2 |z - a(x)|^2 over z >= 0, checked by KKT with the dense joint matrix
    eps = 0.05
    m, x = _deep(target_norm=1.0, eps=eps, anchor=anchor), _x()
    with torch.no_grad():
        assert float(torch.linalg.matrix_norm(_dense_w(m), ord=2)) == pytest.approx(1.0, abs=1e-9)
        z = m.joint(x)
        assert m.last_info.converged
        a = m.anchor_point(x).reshape(x.shape[0], -1)
        base = m.U(x).reshape(x.shape[0], -1)
        assert torch.allclose(m.injection(x).reshape(x.shape[0], -1), base + eps * a, atol=1e-12)
        wd, zf = _dense_w(m), z.reshape(x.shape[0], -1)
        grad = zf - (zf @ wd.T) @ wd - base + eps * (zf - a)  # gradient of G_eps on the quadratic part
        scale = float(base.abs().max() + eps * a.abs().max())
        assert float(zf.min()) >= 0.0 and float(grad.min()) >= -1e-9 * scale
        assert float((zf * grad).abs().max()) <= 1e-9 * scale ** 2
        assert int((zf > 0).sum()) > 0 and int((zf == 0).sum()) > 0
        certs = {c.name: c for c in certify_equilibrium(m, x, z=z, tol=1e-6)}
    assert certs["strong_convexity"].holds and certs["strong_convexity"].value == pytest.approx(eps, abs=1e-6)
    assert certs["distance_to_selected_equilibrium"].holds
    # without selection the same weight at |W|_2 = 1 has no strong convexity to certify
    with pytest.raises(ValueError, match="target_norm"):
        _deep(target_norm=1.0)


# past the norm bound the joint certificate fails, and implicit = unrolled gradients: tests/equilibrium/test_opteq_deep.py,
# for both joint layers


def test_one_layer_is_the_conv_layer_and_bad_channels_are_named():
    torch.manual_seed(0)
    deep = DeepOptEqConv2d(IN, [3], SPATIAL, tol=1e-10).double().eval()
    single = OptEqConv2d(IN, 3, SPATIAL, tol=1e-10).double().eval()
    with torch.no_grad():
        single.U.weight.copy_(deep.U.first.weight)
        single.U.bias.copy_(deep.U.first.bias)
        single.W.parametrizations.weight.original.copy_(deep.W.parametrizations.weight.original)
    single.train().eval()
    x = _x()
    with torch.no_grad():
        assert torch.allclose(deep(x), single(x), atol=1e-9)
    with pytest.raises(ValueError, match="channels"):
        DeepOptEqConv2d(IN, [], SPATIAL)


def test_blockwise_products_equal_the_masked_convolution():
    m = _deep()
    w = m.W.weight.detach()
    gen = torch.Generator().manual_seed(3)
    z, q = (torch.randn(2, sum(SIZES), *SPATIAL, dtype=torch.float64, generator=gen) for _ in range(2))
    assert torch.allclose(m.apply_w(z, w), F.conv2d(z, w, padding=1), atol=1e-12)
    assert torch.allclose(m.apply_wt(z, w), F.conv_transpose2d(z, w, padding=1), atol=1e-12)
    wz, wq = F.conv2d(z, w, padding=1), F.conv2d(q, w, padding=1)
    full = (torch.nn.grad.conv2d_weight(q, w.shape, wz, padding=1) + torch.nn.grad.conv2d_weight(z, w.shape, wq, padding=1))
    mask = m.W.parametrizations.weight[0].mask.double()
    assert torch.allclose(m.weight_grad(z, wz, q, w), full * mask, atol=1e-12)
