"""Colour and TV-inside-PnP restoration, tested as theory.

- vectorial (colour) TV: equal to the channel-wise TV for one channel; ``TV_v(u, u, u) = sqrt 3 TV(u)``, hence the ROF
  solution for a grey image repeated in three channels is the grey solution at ``lam / sqrt 3`` in each channel;
  its duality-gap certificate bounds the distance to an independent tight solve, from any warm start;
- the TV prox is firmly non-expansive (a proximal map) up to its certified inexactness;
- PnP-DRS / ADMM with the TV prox: on denoising their fixed point is the ROF solution at ``lam / gamma``; on deblurring
  the output minimizes ``gamma/2 |A x - y|^2 + lam TV(x)``; inner solves that miss their certificate are reported;
- the opponent-colour map keeps the averagedness of the grey denoiser (the identity of its proof holds exactly, no
  tested pair asks for a larger constant).
"""

import math

import pytest
import torch

from proxnets.stable import AveragedDenoiser, Blur, DenoiserConfig, Denoising, gaussian_kernel
from proxnets.stable.pnp import pnp_admm, pnp_drs
from proxnets.stable.restore import OPPONENT, channelwise, opponent_colour
from proxnets.stable.tv import TVProx, _solve, total_variation, tv_denoise


def _image(c: int, h: int = 10, w: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(1, c, h, w, dtype=torch.float64)
    base[..., h // 3 :, w // 2 :] = 1.0  # a shared edge
    return base + 0.2 * torch.randn(base.shape, generator=g, dtype=torch.float64)


def test_vectorial_tv_one_channel_and_repeated_channels():
    u = _image(1)
    assert torch.allclose(total_variation(u, vectorial=True), total_variation(u), rtol=0, atol=1e-12)
    uuu = u.repeat(1, 3, 1, 1)
    assert torch.allclose(total_variation(uuu, vectorial=True), math.sqrt(3) * total_variation(u), rtol=1e-12)
    x = _image(3, seed=1)
    assert float(total_variation(x, vectorial=True)) < float(total_variation(x))  # |.|_F <= sum of the channels' norms


def test_vectorial_rof_of_repeated_grey_is_grey_rof_at_lam_over_sqrt3():
    # P_v(u,u,u) = 3 (1/2 |x - u|^2 + lam / sqrt 3 TV(x)): the minimizer repeats the grey one at lam / sqrt 3
    u, lam, tol = _image(1, 6, 7), 0.3, 1e-4
    xv, iv = tv_denoise(u.repeat(1, 3, 1, 1), lam, tol=tol, max_iter=20000, vectorial=True, policy="raise")
    xg, ig = tv_denoise(u, lam / math.sqrt(3), tol=tol, max_iter=20000, policy="raise")
    # both within their certified distances of the exact minimizers (which are equal per channel)
    bound = iv.abs_residuals[-1] + math.sqrt(3) * ig.abs_residuals[-1]
    assert float((xv - xg.repeat(1, 3, 1, 1)).norm()) <= bound
    # and lam is not lam: the channel-wise solve at lam is a different image
    xc, ic = tv_denoise(u.repeat(1, 3, 1, 1), lam, tol=tol, max_iter=20000, policy="raise")
    assert float((xc - xv).norm()) > 10 * (bound + ic.abs_residuals[-1])


@pytest.mark.parametrize("start", ["zero", "random"])
def test_vectorial_certificate_bounds_the_distance_from_any_start(start):
    y, lam = _image(3, 7, 9, seed=2), 0.25
    ref, iref = tv_denoise(y, lam, tol=1e-4, max_iter=20000, vectorial=True, policy="raise")
    g = torch.Generator().manual_seed(3)
    p0 = None if start == "zero" else 5 * torch.randn(1, 3, 2, 7, 9, generator=g, dtype=torch.float64)
    bounds = []
    for it in (20, 60, 200):
        x, _, info = _solve(y, lam, tol=0.0, max_iter=it, check_every=10, vectorial=True, p0=p0)
        assert not info.converged and info.stop_reason == "max_iter"  # tol 0 is never met
        dist = float((x - ref).norm())
        assert dist <= info.abs_residuals[-1] + iref.abs_residuals[-1]  # the gap's bound is a bound
        bounds.append(info.abs_residuals[-1])
    assert bounds[-1] < bounds[0]  # and it tightens as the iteration proceeds


def test_tv_prox_is_firmly_nonexpansive_up_to_its_certificate():
    prox = TVProx(0.2, tol=1e-3, max_iter=20000, warm_start=False)
    g = torch.Generator().manual_seed(4)
    for k in range(6):
        a = _image(3, 6, 6, seed=10 + k)
        b = a + (0.5 if k % 2 else 0.05) * torch.randn(a.shape, generator=g, dtype=torch.float64)
        pa = prox(a)
        ea = prox.last_info.abs_residuals[-1]  # within its certified distance of the exact prox
        pb = prox(b)
        eb = prox.last_info.abs_residuals[-1]
        d, e = (pa - pb).flatten(), (a - b).flatten()
        # exact: |Pa - Pb|^2 <= <Pa - Pb, a - b>; slack for the inexact solves (Cauchy-Schwarz, |err| <= ea + eb)
        err = ea + eb
        slack = err * (2 * float(d.norm()) + err + float(e.norm()))
        assert float(d @ d) <= float(d @ e) + slack
    assert prox.inner_unconverged == 0 and prox.calls == 12


@pytest.mark.parametrize("algo", [pnp_drs, pnp_admm])
def test_pnp_with_tv_prox_on_denoising_is_rof_at_lam_over_gamma(algo):
    y, lam, gamma = _image(1, 8, 8, seed=5), 0.3, 2.0
    ref, iref = tv_denoise(y, lam / gamma, tol=1e-3, max_iter=50000, policy="raise")
    prox = TVProx(lam, tol=1e-3, max_iter=50000)
    x, info = algo(y, Denoising(), prox, gamma=gamma, max_iter=1000, tol=1e-4, policy="raise")
    assert info.converged and info.inner_unconverged == 0
    assert float((x - ref).norm()) <= 1e-2 * float(ref.norm())
    # and the weight is lam / gamma, not lam
    other, _ = tv_denoise(y, lam, tol=1e-4, max_iter=50000, policy="raise")
    assert float((x - other).norm()) > 0.05 * float(ref.norm())


@pytest.mark.slow  # ~20 s on a loaded core
def test_pnp_drs_with_tv_prox_minimizes_the_deblurring_objective():
    g = torch.Generator().manual_seed(6)
    clean = _image(1, 10, 10, seed=7)
    physics = Blur(gaussian_kernel(5, 1.0).double(), "circular")
    y = physics.A(clean) + 0.01 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    lam, gamma = 0.05, 5.0
    x, info = pnp_drs(y, physics, TVProx(lam, tol=1e-3, max_iter=50000), gamma=gamma, max_iter=2000, tol=1e-4, policy="raise")
    assert info.converged and info.inner_unconverged == 0

    def objective(v):
        return float(gamma / 2 * (physics.A(v) - y).pow(2).sum() + lam * total_variation(v).sum())

    f = objective(x)
    for scale in (3e-2, 1e-1):  # convex: no perturbation does better than the minimizer
        for _ in range(5):
            assert f <= objective(x + scale * torch.randn(x.shape, generator=g, dtype=torch.float64))
    assert f < objective(y) and f < objective(clean)


def test_pnp_reports_inner_tv_solves_that_missed_their_certificate():
    y = _image(1, 12, 12, seed=8)
    physics = Blur(gaussian_kernel(5, 1.0).double(), "circular")
    starved = TVProx(0.1, tol=1e-9, max_iter=3)  # 3 iterations cannot certify 1e-9
    _, info = pnp_drs(y, physics, starved, gamma=5.0, max_iter=10, tol=1e-12, policy="ignore")
    assert info.inner_unconverged == starved.calls == 10
    fine = TVProx(0.1, tol=1e-3, max_iter=20000)
    _, info = pnp_drs(y, physics, fine, gamma=5.0, max_iter=10, tol=1e-12, policy="ignore")
    assert info.inner_unconverged == 0 and fine.calls == 10


def _pair_alpha(T, x, y):
    # smallest alpha with |Tx - Ty|^2 <= |x - y|^2 - (1 - alpha)/alpha |(I-T)x - (I-T)y|^2, per pair
    u = (x - y).flatten(1)
    w = u - (T(x) - T(y)).flatten(1)
    uw, ww = (u * w).sum(1), w.pow(2).sum(1)
    return torch.where(uw > 0, ww / (2 * uw).clamp_min(1e-30), torch.full_like(uw, math.inf))


def test_opponent_colour_keeps_the_averagedness_of_the_grey_denoiser():
    assert torch.allclose(OPPONENT @ OPPONENT.T, torch.eye(3, dtype=torch.float64), atol=1e-15)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(opponent_colour(lambda v: v)(x), x, atol=1e-6)  # D = I gives T = I
    torch.manual_seed(0)
    den = AveragedDenoiser(DenoiserConfig.firm(channels=1, image_size=8, width=4, depth=2)).eval()
    with torch.no_grad():  # random weights, biases too: a non-trivial firmly non-expansive D
        for b in den.blocks:
            b.weight.mul_(3.0)
            b.bias.normal_(0, 0.5)
    alpha = den.averagedness("rigorous")
    assert alpha <= 0.5 + 1e-9
    g = torch.Generator().manual_seed(10)
    worst = 0.0
    with torch.no_grad():
        for scale in (1e-2, 1e-1, 1.0):
            xs = torch.rand(8, 3, 8, 8, generator=g, dtype=torch.float64)
            ys = xs + scale * torch.randn(xs.shape, generator=g, dtype=torch.float64)
            den64 = den.double()
            worst = max(worst, float(_pair_alpha(opponent_colour(den64), xs, ys).max()))
            # the proof's identity: |T x - T y|^2 = sum_c s_c^2 |D u_c - D v_c|^2
            q = OPPONENT
            s = torch.tensor([3**0.5, 1.0, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
            t = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64).view(1, 3, 1, 1)
            u = torch.einsum("dc,bchw->bdhw", q, xs) / s + t
            v = torch.einsum("dc,bchw->bdhw", q, ys) / s + t
            lhs = (opponent_colour(den64)(xs) - opponent_colour(den64)(ys)).pow(2).sum()
            rhs = ((channelwise(den64, 3)(u) - channelwise(den64, 3)(v)) * s).pow(2).sum()
            assert torch.allclose(lhs, rhs, rtol=1e-10)
    assert worst <= alpha + 1e-9
