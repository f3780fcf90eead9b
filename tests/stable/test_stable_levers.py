"""The certified-accuracy levers: Bjorck-orthonormal glue, the Lipschitz-margin loss, the stronger PGD
(margin objective, early exit), and the half-grid Fourier bound the training rule uses."""

import math

import pytest
import torch
import torch.nn.functional as F

from proxnets.norm_bounds import fourier_norm_bound
from proxnets.stable import (
    ClassifierConfig, NonExpansiveClassifier, certified_radii, empirical_lipschitz, lipschitz_bound, lipschitz_margin_loss,
    orthogonal_conv1x1, orthogonal_linear, pgd_l2,
)
from proxnets.stable.glue import BjorckOrthogonal


@pytest.mark.parametrize("shape", [(10, 300), (16, 8), (8, 8), (3, 1)])
def test_bjorck_keeps_every_singular_value_at_most_one_and_pushes_them_to_one(shape):
    # theory: s -> (3 s - s^3) / 2 maps [0, 1] into [0, 1] and increases, so no iterate passes 1 and all rise to 1
    torch.manual_seed(0)
    v = torch.randn(*shape, dtype=torch.float64) * torch.logspace(-2, 0, shape[1], dtype=torch.float64)  # spread spectrum
    for iters in (0, 1, 3, 8):
        s = torch.linalg.svdvals(BjorckOrthogonal(iters)(v))
        assert float(s.max()) <= 1 + 1e-12, (iters, float(s.max()))
    s = torch.linalg.svdvals(BjorckOrthogonal(30)(v))
    assert float(s.min()) > 1 - 1e-9
    # without the Frobenius scaling the same step diverges (a singular value above sqrt(3) grows): the scaling is needed
    w = 3.0 * v / torch.linalg.matrix_norm(v, 2)
    for _ in range(3):
        w = 1.5 * w - 0.5 * (w @ w.T @ w if w.shape[0] <= w.shape[1] else w @ (w.T @ w))
    assert float(torch.linalg.svdvals(w).max()) > 10


def test_orthogonal_layers_report_a_rigorous_norm_at_least_the_true_one():
    torch.manual_seed(1)
    for layer in (orthogonal_conv1x1(8, 16), orthogonal_linear(200, 10)):
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
        b = layer.lipschitz_constant()
        assert b.rigorous and float(b) >= float(torch.linalg.matrix_norm(w, 2))
        assert float(b) <= 1 + 1e-5


def test_orthogonal_conv1x1_norm_is_the_matrix_norm_at_any_size():
    torch.manual_seed(2)
    conv = orthogonal_conv1x1(4, 8, bias=False)
    x, y = torch.randn(3, 4, 5, 7), torch.randn(3, 4, 11, 2)
    for z in (x, y):  # an isometry on channels (8 >= 4 and orthonormal columns) at every size
        assert torch.allclose(conv(z).flatten(1).norm(dim=1), z.flatten(1).norm(dim=1), rtol=1e-4)


def test_orthogonal_classifier_is_certified_and_its_bound_is_never_beaten():
    torch.manual_seed(3)
    cfg = ClassifierConfig(in_channels=1, image_size=8, num_classes=3, width=4, stages=1, blocks_per_stage=1, head="flatten",
                           glue="orthogonal", max_steps=2)
    model = NonExpansiveClassifier(cfg)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "schedule_steps"):
                m.weight.mul_(2.0)  # the step rule must act
    model.eval()
    L = lipschitz_bound(model)
    assert L.rigorous and float(L) <= 1 + 1e-5
    emp, _ = empirical_lipschitz(model, torch.rand(6, 1, 8, 8), steps=30, lr=0.05, generator=torch.Generator().manual_seed(0))
    assert emp <= float(L) * (1 + 1e-4)


def test_margin_loss_is_cross_entropy_of_handicapped_scaled_logits():
    torch.manual_seed(4)
    z, y = torch.randn(7, 5), torch.randint(0, 5, (7,))
    model = lambda x: x  # noqa: E731  (the logits are the input)
    assert torch.allclose(lipschitz_margin_loss()(model, z, y), F.cross_entropy(z, y))
    m, tau = 0.7, 3.0
    shifted = z.clone()
    shifted[torch.arange(7), y] -= m
    assert torch.allclose(lipschitz_margin_loss(m, tau)(model, z, y), F.cross_entropy(tau * shifted, y))
    # the handicap only makes the loss larger: margins below m still cost
    assert float(lipschitz_margin_loss(m)(model, z, y)) > float(F.cross_entropy(z, y))
    with pytest.raises(ValueError, match="temperature"):
        lipschitz_margin_loss(0.1, 0.0)


def _tight_linear():
    # logits (w.x, -w.x): L = sqrt(2) |w|, margin 2 |w.x|, certified radius |w.x| / |w| = the distance to the boundary
    torch.manual_seed(5)
    w = torch.randn(16)
    lin = torch.nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([w, -w]))
    model = torch.nn.Sequential(torch.nn.Flatten(), lin).eval()
    x = 0.5 + 0.05 * torch.randn(12, 1, 4, 4)
    y = model(x).argmax(1)
    from proxnets.stable import LipschitzBound

    L = LipschitzBound(float(torch.linalg.matrix_norm(lin.weight.detach().double(), 2)) * (1 + 1e-9), True, "dense SVD")
    return model, x, y, certified_radii(model, x, y, lipschitz=L)


@pytest.mark.parametrize("loss", ["margin", "alternate"])
def test_pgd_objectives_flip_just_above_the_tight_radius_and_never_below(loss):
    model, x, y, r = _tight_linear()
    g = torch.Generator().manual_seed(0)
    above = torch.cat([pgd_l2(model, x[i : i + 1], y[i : i + 1], float(r[i]) * 1.01, steps=100, restarts=2, generator=g, loss=loss,
                              box=None) for i in range(len(x))])
    below = torch.cat([pgd_l2(model, x[i : i + 1], y[i : i + 1], float(r[i]) * 0.99, steps=100, restarts=2, generator=g, loss=loss,
                              box=None) for i in range(len(x))])
    with torch.no_grad():
        assert bool((model(above).argmax(1) != y).all())  # every radius is tight: just above it each prediction flips
        assert bool((model(below).argmax(1) == y).all())
    assert bool(((above - x).flatten(1).norm(dim=1) <= r * 1.01 * (1 + 1e-5)).all())


def test_pgd_returns_the_first_fooling_iterate_inside_the_ball():
    model, x, y, r = _tight_linear()
    eps = float(r.max()) * 1.5  # every image can be fooled
    adv = pgd_l2(model, x, y, eps, steps=50, restarts=1, box=None)
    with torch.no_grad():
        assert bool((model(adv).argmax(1) != y).all())
    assert bool(((adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all())
    with pytest.raises(ValueError, match="loss"):
        pgd_l2(model, x, y, eps, loss="hinge")


@pytest.mark.parametrize("size", [7, 8, 13])
def test_half_grid_fourier_bound_matches_the_full_grid(size):
    # real kernels: K(-omega) = conj(K(omega)); the rfft2 half grid sees every singular value of the full grid
    torch.manual_seed(size)
    w = torch.randn(5, 3, 3, 3)
    b = fourier_norm_bound(w, (3, size, size), 1)
    full = float(torch.linalg.matrix_norm(torch.fft.fft2(w.double(), s=(size + 2, size + 2)).permute(2, 3, 0, 1), ord=2).max())
    assert b.details["estimate"] == pytest.approx(full, rel=1e-12)
    assert b.value >= full
    assert math.isfinite(b.value) and b.rigorous


def test_bound_trained_block_evaluates_with_its_training_steps_and_certifies_them():
    from proxnets.stable import NonExpansiveBlock

    torch.manual_seed(6)
    block = NonExpansiveBlock((4, 6, 6), train_norm="bound", max_steps=2)
    with torch.no_grad():
        block.weight.mul_(1.8)  # the cap acts: h = 2 r / nu
    x = torch.randn(3, 4, 6, 6)
    block.train()
    y_train = block(x)
    block.eval()
    with torch.no_grad():
        y_eval = block(x)
    assert torch.allclose(y_train, y_eval, atol=1e-6)  # the network evaluated is the one trained
    c = block.norm_condition("rigorous")
    assert c["rigorous"] and c["method"] == "Fourier symbol"
    assert c["h_nu"] <= c["step_bound"] * (1 + 1e-9)
    # the bound is an upper bound of the exact norm (dense SVD of the 144 x 144 operator)
    from proxnets.norm_bounds import dense_norm_bound

    assert c["sigma"] >= dense_norm_bound(block.norm.operator(block.weight.detach().double())).details["estimate"]
    # the estimate mode reads nu from the power estimate (a lower value), with the same steps
    e = block.norm_condition("estimate")
    assert e["n"] == c["n"] and e["h_nu"] <= c["h_nu"] * (1 + 1e-6) and not e["rigorous"]


def test_maxmin_is_one_lipschitz_gradient_norm_preserving_and_sharp():
    # theory: per pair, (a, b) -> (max, min) is the identity or the swap: 1-Lipschitz, Jacobian a permutation (a.e.)
    from proxnets.stable import MaxMin

    torch.manual_seed(5)
    m = MaxMin()
    x, y = torch.randn(64, 6, 3, 3), torch.randn(64, 6, 3, 3)
    dist_in, dist_out = (x - y).flatten(1).norm(dim=1), (m(x) - m(y)).flatten(1).norm(dim=1)
    assert bool((dist_out <= dist_in * (1 + 1e-6)).all())
    near = x + 1e-4 * torch.randn_like(x)  # no pair re-sorted: the distance is kept, the bound 1 is attained
    ratio = (m(x) - m(near)).flatten(1).norm(dim=1) / (x - near).flatten(1).norm(dim=1)
    assert float(ratio.max()) > 1 - 1e-4
    assert float(lipschitz_bound(m)) == 1.0 and lipschitz_bound(m).rigorous
    x.requires_grad_(True)
    g = torch.randn(64, 6, 3, 3)
    (grad,) = torch.autograd.grad((m(x) * g).sum(), x)
    assert torch.allclose(grad.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1))  # gradient norm kept exactly
    assert not torch.allclose(m(x), x)  # and it is not the identity
    with pytest.raises(ValueError, match="even number of channels"):
        m(torch.randn(2, 3, 4, 4))


def test_maxmin_glue_classifier_is_certified_and_its_bound_is_never_beaten():
    torch.manual_seed(6)
    cfg = ClassifierConfig(in_channels=1, image_size=8, num_classes=3, width=4, stages=1, blocks_per_stage=1, head="flatten",
                           glue="orthogonal", glue_activation="maxmin", time=2.0, max_steps=2)
    model = NonExpansiveClassifier(cfg).eval()
    assert sum(type(m).__name__ == "MaxMin" for m in model.modules()) == 2  # after the lift and the transition
    L = lipschitz_bound(model)
    assert L.rigorous and float(L) <= 1 + 1e-5
    emp, _ = empirical_lipschitz(model, torch.rand(6, 1, 8, 8), steps=30, lr=0.05, generator=torch.Generator().manual_seed(0))
    assert emp <= float(L) * (1 + 1e-4)
    with pytest.raises(ValueError, match="width: expected an even width"):
        ClassifierConfig(width=5, glue_activation="maxmin").validate()
    with pytest.raises(ValueError, match="glue_activation"):
        ClassifierConfig(glue_activation="groupsort9").validate()


def test_bjorck_block_weight_is_row_orthonormal_and_the_block_stays_certified():
    # the parametrization changes A's spectrum, not the guarantee: the step rule uses the norm of the weight in use
    from proxnets.stable import NonExpansiveBlock

    torch.manual_seed(7)
    b = NonExpansiveBlock((4, 6, 6), weight_param="bjorck", max_steps=2, train_norm="bound").eval()
    s = torch.linalg.svdvals(b.weight.detach().reshape(4, -1).double())
    assert float(s.min()) > 1 - 1e-4 and float(s.max()) < 1 + 1e-4
    c = b.norm_condition()
    assert c["rigorous"] and c["h_nu"] <= 2.0 * (1 + 1e-9)
    L = lipschitz_bound(b)
    assert L.rigorous and float(L) == 1.0
    emp, _ = empirical_lipschitz(b, torch.randn(6, 4, 6, 6), steps=30, lr=0.05, generator=torch.Generator().manual_seed(0))
    assert emp <= 1 + 1e-4
    with pytest.raises(ValueError, match="weight_param"):
        NonExpansiveBlock((4, 6, 6), weight_param="householder")


def test_wide_blocks_and_maxmin_between_blocks_keep_parameters_and_certificate():
    from proxnets.stable import num_parameters

    base = dict(in_channels=1, image_size=8, num_classes=3, width=4, stages=1, head="flatten", glue="orthogonal")
    two = NonExpansiveClassifier(ClassifierConfig(**base, blocks_per_stage=2))
    one_wide = NonExpansiveClassifier(ClassifierConfig(**base, blocks_per_stage=1, block_features_ratio=2))
    assert num_parameters(two) == num_parameters(one_wide)  # c c k^2 + c per block, twice == c (2c) k^2 + 2c once
    model = NonExpansiveClassifier(ClassifierConfig(**base, blocks_per_stage=2, glue_activation="maxmin-all")).eval()
    assert sum(type(m).__name__ == "MaxMin" for m in model.modules()) == 4  # lift, 2 blocks, transition
    for m in (one_wide.eval(), model):
        L = lipschitz_bound(m)
        assert L.rigorous and float(L) <= 1 + 1e-5
