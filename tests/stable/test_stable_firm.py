"""Size-independent norm bounds, the firmly non-expansive (Heun) denoiser inside DRS/ADMM without
relaxation, and the tightness of the certified radius under a strong attack."""

import math

import pytest
import torch
import torch.nn.functional as F

from proxnets.norm_bounds import dense_norm_bound, fourier_norm_bound
from proxnets.operators import LinearOperator
from proxnets.stable import AveragedDenoiser, Blur, DenoiserConfig, NonExpansiveBlock, motion_kernel, pnp_admm, pnp_drs
from proxnets.stable.certify import certified_radii, pgd_l2
from proxnets.stable.experiments import _empirical_averagedness
from proxnets.stable.lipschitz import LipschitzBound
from proxnets.stable.norms import symbol_sup_bound


def _dense_conv_norm(w: torch.Tensor, size: int, circular: bool) -> float:
    c = w.shape[1]
    eye = torch.eye(c * size * size, dtype=torch.float64).reshape(-1, c, size, size)
    if circular:
        cols = F.conv2d(F.pad(eye, (1, 1, 1, 1), mode="circular"), w.double())
    else:
        cols = F.conv2d(eye, w.double(), padding=1)
    return float(torch.linalg.matrix_norm(cols.reshape(len(eye), -1), ord=2))


def test_symbol_sup_bounds_every_size_and_both_boundaries():
    torch.manual_seed(0)
    w = torch.randn(3, 3, 3, 3)
    s = symbol_sup_bound(w)
    assert s.rigorous and s.method == "symbol sup (any size)"
    exact = [_dense_conv_norm(w, n, circ) for n in (3, 5, 8, 11) for circ in (False, True)]
    assert max(exact) <= s.value
    # and it is tight: within 3% (the Bernstein factor at grid 256 is 1.025) of the norm at a large size
    assert s.value <= 1.03 * fourier_norm_bound(w, (3, 200, 200), 1).value


def test_symbol_grid_max_alone_is_not_a_bound():
    # the Bernstein factor is needed: a coarse grid's max can miss the symbol's peak, and a size exceeds it
    torch.manual_seed(3)
    w = torch.randn(2, 2, 3, 3)
    coarse = fourier_norm_bound(w, (2, 4, 4), 0).value  # the symbol on a 4x4 grid only
    exact = max(_dense_conv_norm(w, n, circ) for n in (5, 7, 9, 11) for circ in (True, False))
    assert exact > coarse
    assert exact <= symbol_sup_bound(w, grid=4).value  # the grid is raised to keep the factor below 4/3, still a bound


def test_firm_denoiser_certified_half_averaged_at_any_size():
    torch.manual_seed(0)
    den = AveragedDenoiser(DenoiserConfig.firm(channels=1, width=4, depth=3, image_size=12)).double().eval()
    with torch.no_grad():
        for b in den.blocks:
            b.weight.mul_(1.7)  # as if training had grown |A|: the budget must act
    alpha = den.averagedness("rigorous")
    assert alpha <= 0.5
    for size in (12, 24):  # the training size and a larger one
        x = torch.rand(3, 1, size, size, dtype=torch.float64)
        assert _empirical_averagedness(den, x, seed=0, steps=10) <= alpha + 1e-9


def test_stiffness_budget_is_what_makes_the_stack_firm():
    # without the budget the same Heun stack is averaged but not firmly non-expansive: the budget is not decoration
    torch.manual_seed(0)
    cfg = DenoiserConfig.firm(channels=1, width=4, depth=3, image_size=12)
    free = AveragedDenoiser(DenoiserConfig(**{**cfg.__dict__, "stiffness_budget": None})).double().eval()
    assert 0.5 < free.averagedness("rigorous") < 1.0
    block = NonExpansiveBlock((2, 6, 6), method="heun", stiffness_budget=0.4, norm_size="any")
    with torch.no_grad():
        block.weight.mul_(3.0)
    c = block.eval().norm_condition("rigorous")
    assert c["n"] * c["h_nu"] <= 0.4 and c["h_nu"] <= 2.0


@pytest.mark.filterwarnings("ignore::proxnets.utils.convergence.NonConvergenceWarning")
def test_drs_and_admm_converge_with_the_unrelaxed_firm_denoiser():
    torch.manual_seed(0)
    den = AveragedDenoiser(DenoiserConfig.firm(channels=1, width=4, depth=2, image_size=16)).double().eval()
    assert den.averagedness() <= 0.5
    x_true = torch.rand(1, 1, 24, 24, dtype=torch.float64)  # not the size the config names: the certificate is any-size
    physics = Blur(motion_kernel(5, angle=20.0).double(), "circular")
    y = physics.A(x_true)
    for solver in (pnp_drs, pnp_admm):
        _, info = solver(y, physics, den, gamma=1.0, max_iter=400, tol=1e-6, x_true=x_true, with_ssim=False)
        r = info.abs_residuals
        assert info.converged, solver.__name__
        if solver is pnp_drs:  # DRS with a firmly non-expansive D is an averaged iteration: steps never grow
            assert all(b <= a * (1 + 1e-6) + 1e-12 for a, b in zip(r, r[1:]))


def test_pgd_flips_just_above_a_tight_certified_radius():
    # logits (w.x, -w.x): L = |W|_2 = sqrt(2) |w|, margin 2 |w.x|, radius |w.x| / |w| = the distance to the boundary
    torch.manual_seed(0)
    d = 16
    w = torch.randn(d)
    lin = torch.nn.Linear(d, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([w, -w]))
    model = torch.nn.Sequential(torch.nn.Flatten(), lin).eval()
    x = (0.5 + 0.01 * torch.randn(6, 1, 4, 4)).clamp(0, 1)
    y = model(x).argmax(1)
    L = LipschitzBound(math.sqrt(2) * float(w.norm()), True, "exact for this model")
    r = certified_radii(model, x, y, lipschitz=L)
    g = torch.Generator().manual_seed(0)
    above = pgd_l2(model, x, y, float(r.max()) * 1.01, steps=100, restarts=2, generator=g)
    below = pgd_l2(model, x, y, float(r.min()) * 0.99, steps=100, restarts=2, generator=g)
    with torch.no_grad():
        i = int(r.argmax())
        assert model(above[i : i + 1]).argmax(1) != y[i]  # just above its radius the prediction flips
        assert bool((model(below).argmax(1) == y).all())  # below every radius nothing flips (the certificate)
