"""Regularized routing ``b <- (1 - lambda tau) b + lambda a``: its theorems as tests that can fail.

Mirror descent of step ``lambda`` on ``F = E + tau sum c log c`` (module docstring of
:mod:`proxnets.capsules.routing`):
- decrease: ``F(C_t) - F(C_t+1) >= (1/lambda - tau) KL(C_t+1||C_t) + (1/lambda) KL(C_t||C_t+1)`` at any ``tau``;
- above ``tau* = (3 sqrt 3 / 8) max_j sum_i |u_hat_ij|^2``: one fixed point whatever the start, reached at the
  linear rate of Lu, Freund & Nesterov (2018, Thm 3.1);
- no polarization: every coupling of every pass is at least ``exp(-2 max |u_hat| / tau) / (N + 1)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from proxnets.capsules import (
    CURVATURE_BOUND,
    CapsNet,
    DenseVotes,
    FactoredVotes,
    certificate,
    convexity_threshold,
    dynamic_routing,
    routing_certificates,
    small_config,
)


def _votes(scale: float, seed: int = 0, B: int = 3, M: int = 20, N: int = 5, D: int = 4) -> DenseVotes:
    g = torch.Generator().manual_seed(seed)
    return DenseVotes(scale * torch.randn(B, M, N, D, generator=g, dtype=torch.float64))


def _objective(votes: DenseVotes, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """F(C) = E(C) + tau sum c log c, straight from the definition (independent of the trace)."""
    from proxnets.capsules import routing_energy

    return routing_energy(votes, c) + tau * torch.special.xlogy(c, c).sum((1, 2))


def test_curvature_bound_is_the_max_of_the_hessian_of_g_of_the_length():
    # eigenvalues of the Hessian of g(|s|): 2n / (1 + n^2)^2 along s, n / (1 + n^2) across
    n = torch.linspace(1e-4, 50, 200_001, dtype=torch.float64)
    top = torch.maximum(2 * n / (1 + n * n) ** 2, n / (1 + n * n)).max()
    assert float(top) <= CURVATURE_BOUND + 1e-15 and float(top) > CURVATURE_BOUND - 1e-9
    # and the autograd Hessian of g(n(s)) at random points never exceeds it
    from proxnets.capsules.routing import _energy_of

    g = torch.Generator().manual_seed(1)
    for r in (0.05, 0.3, 1 / math.sqrt(3), 1.0, 3.0):
        s = torch.randn(6, generator=g, dtype=torch.float64)
        s = r * s / s.norm()
        h = torch.autograd.functional.hessian(lambda x: -_energy_of(x.view(1, 1, 6)).sum(), s)
        assert float(torch.linalg.eigvalsh(h).max()) <= CURVATURE_BOUND + 1e-12


def test_threshold_of_factored_votes_equals_dense():
    g = torch.Generator().manual_seed(2)
    fv = FactoredVotes(torch.randn(3, 30, 8, generator=g, dtype=torch.float64),
                       0.1 * torch.randn(6, 30, 8, 4, generator=g, dtype=torch.float64))
    assert torch.allclose(convexity_threshold(fv), convexity_threshold(DenseVotes(fv.dense())), rtol=1e-12)
    assert bool((fv.vote_max() >= fv.dense().norm(dim=-1).flatten(1).amax(-1) - 1e-12).all())


@pytest.mark.parametrize("scale", [1e-3, 1e-1, 1.0, 1e1, 1e3])
@pytest.mark.parametrize("tau_over_threshold,step_factor", [(0.05, 1.0), (1.5, 1.0), (3.0, 0.5)])
def test_objective_decreases_by_at_least_the_mirror_bound_at_any_tau(scale, tau_over_threshold, step_factor):
    votes = _votes(scale)
    tau = tau_over_threshold * float(convexity_threshold(votes).max())
    _, info = dynamic_routing(votes, 40, routing="regularized", tau=tau, step=step_factor / tau, trace=True)
    f = info.objective  # (T, B)
    decrease = f[:-1] - f[1:]
    tol = 1e-12 * (1 + f.abs().amax(0))
    assert bool((decrease >= info.decrease_bound[:-1] - tol).all())
    assert bool((info.decrease_bound[:-1] >= -tol).all())  # KLs are >= 0 up to rounding
    # the trace's objective is the definition's
    c = info.couplings
    assert torch.allclose(f[-1], _objective(votes, c, torch.full((3,), tau, dtype=torch.float64)), rtol=1e-10,
                          atol=1e-14)
    certs = {c.name: c for c in routing_certificates(votes, info)}
    for name in ("routing_couplings_feasible", "routing_energy_increase", "routing_kl_decrease",
                 "routing_min_coupling"):
        assert certs[name].holds, (name, certs[name].value)
    assert certs["routing_strictly_convex"].holds == (tau_over_threshold > 1)


@pytest.mark.parametrize("scale", [0.3, 3.0])
@pytest.mark.parametrize("tau", ["auto", 1.5])
def test_above_the_threshold_one_fixed_point_reached_at_the_linear_rate(scale, tau):
    """Five random starts reach the same couplings; F(C_k) - F* <= mu KL(C*||C_0) / ((tau/tau*)^k - 1)."""
    votes = _votes(scale, seed=3)
    threshold = convexity_threshold(votes)  # (B,)
    tau_value = tau if tau == "auto" else tau * float(threshold.max())
    _, ref = dynamic_routing(votes, 400, routing="regularized", tau=tau_value, trace=True)
    c_star, tau_b = ref.couplings, ref.tau
    f_star = ref.objective[-1]
    assert float(ref.kkt_gap[-2].max()) < 1e-10  # the fixed point C = softmax(a / tau)
    mu = tau_b - threshold
    assert bool((mu > 0).all())
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        init = 5 * torch.randn(votes.batch, votes.children, votes.parents, generator=g, dtype=torch.float64)
        _, info = dynamic_routing(votes, 120, routing="regularized", tau=tau_value, initial_logits=init, trace=True)
        assert float((info.couplings - c_star).abs().max()) < 1e-9
        c0 = torch.softmax(init, -1)
        kl0 = (c_star * (c_star.log() - c0.log())).sum((1, 2))  # (B,) D_h(C*, C_0)
        k = torch.arange(1, 60, dtype=torch.float64)[:, None]
        bound = mu * kl0 / ((tau_b / threshold) ** k - 1)  # (k, B)
        gap = info.objective[1:60] - f_star
        assert bool((gap <= bound + 1e-12 * (1 + f_star.abs())).all())


def test_below_the_threshold_standard_routing_has_several_fixed_points():
    """tau = 0 (the seed's routing): different starts polarize to different vertices -- the threshold matters."""
    votes = _votes(3.0, seed=5)
    g = torch.Generator().manual_seed(6)
    limits = []
    for _ in range(4):
        init = 5 * torch.randn(votes.batch, votes.children, votes.parents, generator=g, dtype=torch.float64)
        _, info = dynamic_routing(votes, 300, initial_logits=init)
        limits.append(info.couplings)
    assert max(float((a - limits[0]).abs().max()) for a in limits[1:]) > 0.5


@pytest.mark.parametrize("tau_over_threshold", [0.01, 0.3, 2.0])
def test_no_coupling_falls_below_the_floor_and_standard_routing_does(tau_over_threshold):
    votes = _votes(3.0, seed=7)
    tau = tau_over_threshold * float(convexity_threshold(votes).max())
    _, info = dynamic_routing(votes, 500, routing="regularized", tau=tau, trace=True)
    floor = -2 * votes.vote_max() / tau - math.log(votes.parents + 1)
    assert bool((info.min_log_coupling >= floor - 1e-9).all())
    _, std = dynamic_routing(votes, 500, trace=True)
    assert float(std.min_log_coupling[-1].min()) < float(floor.min()) - 1  # polarized below the floor


def test_anti_regularized_variant_fails_the_certificate():
    votes = _votes(1.0, seed=8)
    _, info = dynamic_routing(votes, 60, routing="regularized", trace=True, _broken="anti-regularized")
    certs = {c.name: c for c in routing_certificates(votes, info)}
    assert not certs["routing_min_coupling"].holds
    assert not certs["routing_kl_decrease"].holds


def test_gradcheck_regularized_routing_through_all_passes():
    g = torch.Generator().manual_seed(9)
    u_hat = (0.5 * torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)).requires_grad_()
    beta = (0.1 * torch.randn(3, 4, generator=g, dtype=torch.float64)).requires_grad_()
    assert gradcheck(lambda x, b: dynamic_routing(x, 4, routing="regularized", tau=0.7, bias=b)[0], (u_hat, beta),
                     fast_mode=True)


def test_bias_keeps_the_energy_concave_and_the_step_a_mirror_step():
    """With s_j = sum_i c_ij u_hat_ij + beta_j the standard certificate still holds (scales 1e-2..1e2)."""
    for scale in (1e-2, 1.0, 1e2):
        votes = _votes(scale, seed=10)
        beta = scale * torch.randn(votes.parents, votes.dim, dtype=torch.float64)
        _, info = dynamic_routing(votes, 30, bias=beta, trace=True)
        assert all(c.holds for c in routing_certificates(votes, info, bias=beta)), scale


def test_capsnet_with_regularized_routing_is_certified():
    torch.manual_seed(0)
    model = CapsNet(small_config(conv_channels=8, primary_channels=2, decoder_hidden=(16,), routing="regularized"))
    with torch.no_grad():
        model.classes.weight.mul_(30)  # votes long enough for routing to move
    x = torch.rand(4, 1, 28, 28)
    certs = {c.name: c for c in certificate(model, x, kkt_passes=200)}
    assert {"routing_strictly_convex", "routing_min_coupling"} <= set(certs)
    assert all(c.holds for c in certs.values()), [(c.name, c.value) for c in certs.values() if not c.holds]
    model.classes.broken = "anti-regularized"
    assert not all(c.holds for c in certificate(model, x))
