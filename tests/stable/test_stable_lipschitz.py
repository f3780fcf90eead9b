"""Every block and every model: empirical Lipschitz <= certified bound <= 1 (+ tol); averagedness."""

import math
import warnings

import pytest
import torch

from proxnets.stable import (
    AveragedDenoiser, ClassifierConfig, DenoiserConfig, NonExpansiveBlock, NonExpansiveClassifier, NormConstraintWarning,
    ResNetBlock, ResNetClassifier, compose_averaged, empirical_lipschitz, lipschitz_bound, lipschitz_conv2d, lipschitz_linear,
)
from proxnets.stable.integrators import step_averagedness

TOL = 1e-4


def _grow(block, factor=3.0):
    """Push |A| above 1 so that the step rule has to act (more steps / smaller h)."""
    with torch.no_grad():
        block.weight.mul_(factor)
    return block


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
@pytest.mark.parametrize("schedule", ["adaptive", "fixed"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_stable_block_nonexpansive(method, schedule, activation):
    block = _grow(NonExpansiveBlock((2, 6, 6), features=4, method=method, schedule=schedule, activation=activation, time=2.0)).eval()
    bound = lipschitz_bound(block)
    x0 = torch.randn(8, 2, 6, 6)
    emp, info = empirical_lipschitz(block, x0, steps=40, generator=torch.Generator().manual_seed(0))
    assert emp <= bound + TOL <= 1 + 2 * TOL
    assert info.residuals == sorted(info.residuals)
    if schedule == "adaptive":  # |A| ~ 3: the step rule must have chosen several steps
        n, _, _ = block.schedule_steps(block.norm.exact(block.weight))
        assert n > 1


def test_stable_block_violating_step_rule_expands():
    # the same block with h*nu = 4.5 > 2: the bound fails and the search finds it
    block = NonExpansiveBlock((6,), features=6, activation="relu").double().eval()
    nu = float(block.norm.exact(block.weight)) ** 2
    f = lambda x: block.flow(x, 4.5 / nu, 1)  # noqa: E731
    emp, _ = empirical_lipschitz(f, torch.randn(16, 6, dtype=torch.float64), steps=200, lr=0.05)
    assert emp > 1.5


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_stable_averaged_block_inequality(method):
    block = _grow(NonExpansiveBlock((2, 5, 5), features=3, method=method, averaged_margin=0.2, time=1.5)).double().eval()
    alpha = block.averagedness()
    assert 0 < alpha < 1
    _assert_averaged(block, alpha, (2, 5, 5))


def test_stable_averagedness_algebra():
    # two Euler half-steps equal one full Euler step only for linear fields; the constants still compose
    assert compose_averaged([0.5, 0.5]) == pytest.approx(2 / 3)
    assert compose_averaged([0.3]) == pytest.approx(0.3)
    assert compose_averaged([0.3, 1.0]) == 1.0
    assert step_averagedness("euler", 1.0) == 0.5
    assert step_averagedness("heun", 1.0) == pytest.approx(1 / 3)
    assert math.isnan(step_averagedness("rk4", 1.0))
    # the inequality check itself can fail: a reflection is non-expansive but not averaged
    with pytest.raises(AssertionError):
        _assert_averaged(lambda x: -x, 0.99, (3,))


def test_stable_whole_models_certified():
    cfg = ClassifierConfig(in_channels=1, image_size=8, width=3, stages=2, blocks_per_stage=1, num_classes=4)
    model = NonExpansiveClassifier(cfg).eval()
    bound = lipschitz_bound(model)
    assert bound <= 1 + TOL
    emp, _ = empirical_lipschitz(model, torch.rand(8, 1, 8, 8), steps=60, lr=0.05)
    assert emp <= bound + TOL
    # rigorous mode: Fourier upper bounds instead of power iterations; slightly above 1 at small sizes
    upper = lipschitz_bound(model, "upper")
    assert emp <= upper + TOL and upper <= 1.2
    base = ResNetClassifier(cfg).eval()
    emp_b, _ = empirical_lipschitz(base, torch.rand(8, 1, 8, 8), steps=60, lr=0.05)
    assert emp_b <= lipschitz_bound(base) + TOL

    den = AveragedDenoiser(DenoiserConfig(channels=1, image_size=8, width=4, depth=3)).double().eval()
    for b in den.blocks:
        _grow(b, 2.0)
    assert lipschitz_bound(den) <= 1 + TOL and den.averagedness() < 1
    emp_d, _ = empirical_lipschitz(den, torch.rand(8, 1, 8, 8, dtype=torch.float64), steps=60, lr=0.05)
    assert emp_d <= 1 + TOL
    _assert_averaged(den, den.averagedness(), (1, 8, 8))


def _assert_averaged(f, alpha, shape):
    """|Tx - Ty|^2 <= |x - y|^2 - (1 - alpha)/alpha |(I - T)x - (I - T)y|^2 on random pairs at many scales."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, *shape, generator=g, dtype=torch.float64)
    y = x + torch.randn(64, *shape, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 64, dtype=torch.float64).view(-1, *[1] * len(shape))
    with torch.no_grad():
        tx, ty = f(x), f(y)
    d2 = (x - y).flatten(1).norm(dim=1) ** 2
    lhs = (tx - ty).flatten(1).norm(dim=1) ** 2
    rhs = d2 - (1 - alpha) / alpha * ((x - tx) - (y - ty)).flatten(1).norm(dim=1) ** 2
    assert bool((lhs <= rhs + 1e-9 * d2).all())


@pytest.mark.filterwarnings("ignore::proxnets.stable.NormConstraintWarning")  # weights overwritten by hand
def test_stable_resnet_bound_grows_and_is_attained():
    # x + A^T relu(A x) with |A| = 1 doubles along the top singular direction: 2^depth
    depth = 6
    blocks = []
    for _ in range(depth):
        b = ResNetBlock((4,), normalized=True, activation="relu")
        with torch.no_grad():
            b.a.parametrizations.weight.original.copy_(torch.eye(4))
            b.b.parametrizations.weight.original.copy_(torch.eye(4))
            b.a.bias.fill_(1.0)
            b.b.bias.zero_()
        blocks.append(b.eval())
    net = torch.nn.Sequential(*blocks)
    assert lipschitz_bound(net) == pytest.approx(2.0**depth, rel=1e-2)
    emp, _ = empirical_lipschitz(net, torch.rand(4, 4), steps=20)
    assert emp <= lipschitz_bound(net) * (1 + TOL)
    assert emp == pytest.approx(2.0**depth, rel=1e-2)  # attained up to the norms' safety factor 1.001


def test_stable_constrained_layers_and_unknown_modules():
    conv = lipschitz_conv2d(2, 3, 3, (5, 5), padding=1, stride=2)
    lin = lipschitz_linear(6, 4, rescale="clip")
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(10)
    for m, x in ((conv.eval(), torch.randn(4, 2, 5, 5)), (lin.eval(), torch.randn(4, 6))):
        bound = lipschitz_bound(m)
        assert bound <= 1 + TOL
        emp, _ = empirical_lipschitz(m, x, steps=50, lr=0.05)
        assert emp <= bound + TOL
    with pytest.raises(TypeError, match="model: expected a module with a certified Lipschitz constant"):
        lipschitz_bound(torch.nn.Conv2d(1, 1, 3))


def test_stable_cheap_estimate_warning():
    conv = lipschitz_conv2d(2, 3, 3, (6, 6), padding=1)
    conv.train()
    with torch.no_grad():  # a sudden weight change the one-step estimate cannot follow
        w = conv.parametrizations.weight.original
        w.copy_(torch.randn_like(w) * 5)
    conv(torch.randn(1, 2, 6, 6))
    conv.eval()
    with pytest.warns(NormConstraintWarning, match="cheap training estimate"):
        conv(torch.randn(1, 2, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv(torch.randn(1, 2, 6, 6))  # once per weight version


def test_stable_block_errors():
    with pytest.raises(ValueError, match="averaged_margin"):
        NonExpansiveBlock((2, 4, 4), averaged_margin=1.5)
    with pytest.raises(ValueError, match="method: expected 'euler' or 'heun'"):
        NonExpansiveBlock((2, 4, 4), averaged_margin=0.1, method="rk4")
    with pytest.raises(ValueError, match="method: expected one of"):
        NonExpansiveBlock((2, 4, 4), method="midpoint")
    with pytest.raises(ValueError, match="in_shape"):
        NonExpansiveBlock((2, 4))


# -- soundness traps (issue 11) ------------------------------------------------------------------
def _pairs_ratio_and_averaged(step, alpha, shape, n=256):
    """Brute force in float64: max |Tx - Ty| / |x - y| and whether the alpha-averaged inequality holds."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = x + torch.randn(n, *shape, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, n, dtype=torch.float64).view(-1, *[1] * len(shape))
    with torch.no_grad():
        tx, ty = step(x), step(y)
    d2 = (x - y).flatten(1).norm(dim=1) ** 2
    ratio = float(((tx - ty).flatten(1).norm(dim=1) ** 2 / d2).max().sqrt())
    if not math.isfinite(alpha) or not 0 < alpha < 1:
        return ratio, None
    lhs = (tx - ty).flatten(1).norm(dim=1) ** 2
    rhs = d2 - (1 - alpha) / alpha * ((x - tx) - (y - ty)).flatten(1).norm(dim=1) ** 2
    return ratio, bool((lhs <= rhs + 1e-10 * d2).all())


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
@pytest.mark.parametrize("h_nu", [0.5, 1.5, 2.0, 2.6])
def test_stable_step_averagedness_against_brute_force(method, h_nu):
    # a linear gradient field -A^T A x, nu = |A|^2: h nu is exactly the step's h nu
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    nu = float(torch.linalg.matrix_norm(A, ord=2)) ** 2
    field = lambda x: -(x @ A.T) @ A  # noqa: E731
    from proxnets.stable.integrators import RK_METHODS

    step = lambda x: RK_METHODS[method].step(field, x, h_nu / nu)  # noqa: E731
    alpha = step_averagedness(method, h_nu)
    ratio, averaged = _pairs_ratio_and_averaged(step, alpha, (5,))
    if h_nu > 2:
        assert alpha == math.inf  # not averaged, not even proved non-expansive
        if method != "rk4":  # Euler |1 - 2.6| = 1.6, Heun 1 - z + z^2/2 = 1.78: expansive. RK4 (0.755 here) is
            assert ratio > 1.0  # merely not certified outside its circle-contractivity region
    else:
        assert ratio <= 1 + 1e-9
        if method == "rk4":
            assert math.isnan(alpha)
        else:
            assert alpha <= (0.5 if method == "heun" else 1.0)
            assert averaged in (True, None)


def test_stable_heun_block_at_h_nu_2_6_is_not_certified():
    block = NonExpansiveBlock((6,), features=6, method="heun", activation="relu", schedule="fixed").double().eval()
    sigma = block.norm.exact(block.weight)
    # break the rule: the schedule believes |A| is 0.79x what it is, so h nu = 2 / 0.79^2 ~ 3.2 > 2
    with torch.no_grad():
        block.norm.exact_sigma.fill_(float(sigma) * 0.79)
    block.norm._exact_key = block.norm._key(block.weight)
    cond = block.norm_condition()
    assert cond["h_nu"] > 2.6 and cond["rigorous"]
    assert block.averagedness() == math.inf
    L = lipschitz_bound(block)
    assert L.rigorous and float(L) > 1
    from proxnets.stable import certificate

    certs = {c.name: c for c in certificate(torch.nn.Sequential(block))}
    assert not certs["lipschitz"].holds and not certs["norm_condition[0]"].holds


def test_stable_certified_radii_accept_only_rigorous_constants():
    from proxnets.stable import LipschitzBound, certified_radii

    cfg = ClassifierConfig(in_channels=1, image_size=8, width=3, stages=2, blocks_per_stage=1, num_classes=4)
    model = NonExpansiveClassifier(cfg).eval()
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 4, (5,))
    r = certified_radii(model, x, y)  # computes the rigorous bound
    assert r.shape == (5,)
    with pytest.raises(TypeError, match="lipschitz: expected a rigorous LipschitzBound"):
        certified_radii(model, x, y, lipschitz=1.0)
    with pytest.raises(ValueError, match="lipschitz: expected a rigorous Lipschitz bound"):
        certified_radii(model, x, y, lipschitz=lipschitz_bound(model, "estimate"))
    L = lipschitz_bound(model)
    assert isinstance(L, LipschitzBound) and L.rigorous
    with pytest.raises(TypeError):
        certified_radii(model, x, y, lipschitz=L * 1.0)  # arithmetic drops the proof


def test_stable_broken_models_report_holds_false():
    from proxnets.stable import certificate

    cfg = ClassifierConfig(in_channels=1, image_size=8, width=3, stages=1, blocks_per_stage=1, num_classes=4)
    model = NonExpansiveClassifier(cfg).eval()
    assert all(c.holds and c.rigorous for c in certificate(model, torch.rand(2, 1, 8, 8)))
    # a layer of norm 1.05: the constraint's bound scaled by hand
    head = model.layers[-1]
    from proxnets.constraints import find_constraint

    find_constraint(head).bound = 1.05
    head.parametrizations.weight.original.data.mul_(1.0)  # same weight: the cached estimate stays
    certs = {c.name: c for c in certificate(model)}
    assert not certs["lipschitz"].holds and certs["lipschitz"].rigorous
    assert certs[f"operator_norm[layers.{len(model.layers) - 1}]"].value > 1.04  # the 1.05 layer, measured


def test_stable_empirical_lipschitz_is_a_search_not_a_convergence():
    emp, info = empirical_lipschitz(lambda x: 2 * x, torch.randn(4, 3), steps=5)
    assert emp == pytest.approx(2.0, rel=1e-4) and not info.converged and info.lower_estimate
