"""Cayley-transform orthogonal block convolutions (``NonExpansiveBlock(weight_param="cayley")``): the operator is
orthogonal (dense SVD), its adjoint is exact, the rigorous Gram bound is >= the true norm, gradients flow, the step at
h nu = 2 preserves gradient norms, and a classifier built on them is never beaten by the strong attack inside its
certified radius."""

import pytest
import torch
import torch.nn.functional as F

from proxnets.stable import ClassifierConfig, NonExpansiveBlock, NonExpansiveClassifier, certified_radii, lipschitz_bound, pgd_l2
from proxnets.stable.cayley import cayley_apply, cayley_symbol, unitary_symbol_bound


def _dense(q: torch.Tensor, c: int, h: int, w: int, adjoint: bool = False) -> torch.Tensor:
    """The matrix of ``cayley_apply(., q)`` on ``R^{c h w}``, applied in float64 to the basis."""
    n = c * h * w
    basis = torch.eye(n, dtype=torch.float64).reshape(n, c, h, w)
    return cayley_apply(basis, q.to(torch.complex128), adjoint=adjoint).reshape(n, n).T


@pytest.mark.parametrize("c,h,w", [(2, 5, 6), (3, 4, 5), (2, 3, 3), (1, 6, 4), (4, 4, 4)])
def test_cayley_convolution_is_orthogonal_with_an_exact_adjoint_and_a_sound_bound(c, h, w):
    torch.manual_seed(c * 100 + h * 10 + w)
    v = torch.randn(c, c, 3, 3, dtype=torch.float64)
    q = cayley_symbol(v, (h, w))
    a = _dense(q, c, h, w)
    s = torch.linalg.svdvals(a)
    # float64: every singular value is 1 to round-off (odd and even sizes: the self-conjugate columns are exact)
    assert float((s - 1).abs().max()) < 1e-12
    assert torch.allclose(_dense(q, c, h, w, adjoint=True), a.T, atol=1e-14, rtol=0)  # A^T is the adjoint
    x = torch.randn(2, c, h, w, dtype=torch.float64)  # a circular convolution: commutes with circular shifts
    assert torch.allclose(cayley_apply(torch.roll(x, (1, 2), (2, 3)), q), torch.roll(cayley_apply(x, q), (1, 2), (2, 3)), atol=1e-13)
    # float32 symbol: orthogonal to round-off only; the rigorous bound is >= the dense norm and tight
    q32 = cayley_symbol(v.float(), (h, w))
    s32 = torch.linalg.svdvals(_dense(q32, c, h, w))
    nb = unitary_symbol_bound(q32)
    assert nb.rigorous and nb.value >= float(s32.max()) and nb.value < 1 + 1e-5
    assert float(s32.min()) > 1 - 1e-5
    assert unitary_symbol_bound(q).value - 1 < 1e-13


def test_bound_is_not_fooled_by_a_non_unitary_symbol_and_refuses_non_finite():
    torch.manual_seed(0)
    q = cayley_symbol(torch.randn(2, 2, 3, 3, dtype=torch.float64), (4, 5)).clone()
    q[1, 1] *= 1.5  # one frequency (and its mirror, not stored) stretched: the norm is 1.5
    s = torch.linalg.svdvals(_dense(q, 2, 4, 5))
    assert float(s.max()) == pytest.approx(1.5, rel=1e-12)
    assert unitary_symbol_bound(q).value >= float(s.max())
    q[0, 0, 0, 0] = float("nan")
    nb = unitary_symbol_bound(q)
    assert not nb.rigorous and nb.value == float("inf")


def test_zero_kernel_gives_the_identity_and_bad_shapes_are_refused():
    q = cayley_symbol(torch.zeros(3, 3, 3, 3), (5, 5))
    x = torch.randn(2, 3, 5, 5)
    assert torch.allclose(cayley_apply(x, q), x, atol=1e-6)
    with pytest.raises(ValueError, match="weight: expected a square kernel"):
        cayley_symbol(torch.zeros(4, 3, 3, 3), (5, 5))
    with pytest.raises(ValueError, match="hw: expected an image at least as large"):
        cayley_symbol(torch.zeros(3, 3, 3, 3), (2, 5))
    with pytest.raises(ValueError, match="weight_param: expected a convolution with features == channels"):
        NonExpansiveBlock((3, 5, 5), 6, weight_param="cayley")
    with pytest.raises(ValueError, match="norm_size: expected 'input'"):
        NonExpansiveBlock((3, 5, 5), weight_param="cayley", norm_size="any")
    with pytest.raises(ValueError, match="block_features_ratio: expected 1"):
        ClassifierConfig(block_weight="cayley", block_features_ratio=2).validate()


def test_cayley_block_gradients_flow_and_match_finite_differences():
    torch.manual_seed(1)
    b = NonExpansiveBlock((2, 4, 4), weight_param="cayley", schedule="fixed", activation="softplus").double()
    with torch.no_grad():
        b.bias.normal_()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    b.train()
    b(x).sin().sum().backward()  # a loss that depends on A (|b(x)| alone would not, b(x) being near-isometric)
    g = b.weight.grad
    assert g is not None and bool(torch.isfinite(g).all()) and float(g.norm()) > 1e-3
    # d loss / d weight against central differences (the step size h is read from the bound, not differentiated: it
    # moves by round-off only, since |A| = 1 for every kernel)
    d = torch.randn_like(b.weight)
    with torch.no_grad():
        w0 = b.weight.clone()
        vals = []
        for t in (1e-5, -1e-5):
            b.weight.copy_(w0 + t * d)
            vals.append(float(b(x).sin().sum()))
        b.weight.copy_(w0)
    assert (vals[0] - vals[1]) / 2e-5 == pytest.approx(float((g * d).sum()), rel=1e-5)


def test_cayley_step_at_h_nu_2_is_certified_and_preserves_gradient_norms():
    # theory: with A orthogonal and ReLU, the Jacobian I - 2 A^T D A = A^T (I - 2 D) A is orthogonal
    torch.manual_seed(2)
    b = NonExpansiveBlock((2, 4, 5), weight_param="cayley", schedule="fixed", activation="relu").double()
    with torch.no_grad():
        b.bias.normal_()
    b.eval()
    c = b.norm_condition()
    assert c["rigorous"] and c["method"] == "cayley gram" and 2.0 * (1 - 1e-5) <= c["h_nu"] <= 2.0
    L = lipschitz_bound(b)
    assert L.rigorous and float(L) == 1.0
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: b(z[None])[0], x).reshape(40, 40)
    s = torch.linalg.svdvals(jac)
    assert float(s.max()) <= 1 + 1e-9 and float(s.min()) >= 1 - 1e-5
    # the same block with a free kernel at h nu = 2 contracts some directions (what the Cayley block removes)
    free = NonExpansiveBlock((2, 4, 5), schedule="fixed", activation="relu", train_norm="bound").double().eval()
    jf = torch.autograd.functional.jacobian(lambda z: free(z[None])[0], x).reshape(40, 40)
    assert float(torch.linalg.svdvals(jf).min()) < 0.9


def test_cayley_classifier_radius_is_never_beaten_by_the_strong_attack():
    torch.manual_seed(4)
    cfg = ClassifierConfig(in_channels=1, image_size=8, num_classes=2, width=4, stages=1, blocks_per_stage=2, head="flatten",
                           glue="orthogonal", block_weight="cayley", schedule="fixed")
    model = NonExpansiveClassifier(cfg)
    x = torch.rand(48, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()  # top half brighter
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = F.cross_entropy(4.0 * model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    L = lipschitz_bound(model)
    assert L.rigorous and float(L) <= 1 + 1e-5
    r = certified_radii(model, x, y, lipschitz=L)
    top = torch.argsort(r, descending=True)[:4]  # the largest radii: the attack has room to move
    assert float(r[top[-1]]) > 0.02  # training made radii worth attacking
    gen = torch.Generator().manual_seed(0)
    for i in top.tolist():  # restarts alternate the cross-entropy and the logit-margin objectives
        adv = pgd_l2(model, x[i:i + 1], y[i:i + 1], float(r[i]) * 0.999, steps=100, restarts=2, loss="alternate",
                     generator=gen, box=None)
        assert float((adv - x[i:i + 1]).norm()) <= float(r[i]) * (1 + 1e-6)
        assert int(model(adv).argmax(1)) == int(y[i]), (i, float(r[i]))


def test_negative_bias_init_starts_the_relu_cayley_step_at_the_identity():
    # theory: with ReLU, z = A x + b <= 0 everywhere makes the step x - h A^T relu(z) = x exactly
    torch.manual_seed(5)
    b = NonExpansiveBlock((3, 5, 5), weight_param="cayley", schedule="fixed", activation="relu", bias_init=-0.5).eval()
    assert torch.equal(b.bias.detach(), torch.full((3,), -0.5))
    x = 0.05 * torch.randn(4, 3, 5, 5)  # |(A x)_i| <= |x| < 0.5: every coordinate inactive
    assert float(x.flatten(1).norm(dim=1).max()) < 0.5
    assert torch.equal(b(x), x)
    far = b(10 * x)  # large inputs activate coordinates: not the identity, still 1-Lipschitz
    assert not torch.allclose(far, 10 * x)
    with pytest.raises(ValueError, match="bias_init"):
        NonExpansiveBlock((3, 5, 5), bias_init=float("nan"))


def test_cayley_apply_and_bound_name_bad_input():
    """A symbol of the wrong size or kind is refused, naming ``q``; a non-4-d input names ``x``."""
    from proxnets.stable.cayley import cayley_apply, cayley_symbol, unitary_symbol_bound

    q = cayley_symbol(torch.randn(3, 3, 3, 3, dtype=torch.float64), (6, 6))
    with pytest.raises(ValueError, match="q: expected the symbol of a 3-channel 6x8"):
        cayley_apply(torch.randn(2, 3, 6, 8, dtype=torch.float64), q)
    with pytest.raises(ValueError, match="x:"):
        cayley_apply(torch.randn(3, 6, 6, dtype=torch.float64), q)
    with pytest.raises(ValueError, match="q: expected a complex tensor"):
        unitary_symbol_bound(q.real)
