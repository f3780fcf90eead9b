"""The routing certificate: the seed's theorem checked on a model's votes, and the bugs it must catch."""

from __future__ import annotations

import math

import pytest
import torch

from proxnets.capsules import (
    BROKEN_VARIANTS,
    CapsNet,
    DenseVotes,
    FactoredVotes,
    certificate,
    dynamic_routing,
    energy_tolerance,
    routing_certificate,
    routing_certificates,
    routing_energy,
    small_config,
)

B, M, N, D = 3, 12, 5, 6
NAMES = ["routing_couplings_feasible", "routing_energy_increase", "routing_kl_decrease"]


def votes(scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DenseVotes(scale * torch.randn(B, M, N, D, generator=g, dtype=torch.float64))


def model_with_long_votes(seed=0, scale=30.0):
    """A small CapsNet whose votes are long enough for routing to move (an untrained one barely does)."""
    torch.manual_seed(seed)
    model = CapsNet(small_config(conv_channels=16, primary_channels=4))
    with torch.no_grad():
        model.classes.weight.mul_(scale)
    return model


@pytest.mark.parametrize("scale", [1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3])
@pytest.mark.parametrize("leaky", [False, True])
def test_intact_routing_holds_every_certificate_at_every_scale(scale, leaky):
    v = votes(scale, seed=1)
    _, info = dynamic_routing(v, 30, trace=True, leaky=leaky)
    certs = routing_certificates(v, info)
    assert [c.name for c in certs] == NAMES
    assert all(c.holds and c.rigorous for c in certs), [c.line() for c in certs]


def test_energy_decrease_is_at_least_the_symmetric_kl_computed_from_couplings():
    """The traced sym_kl equals KL(C'||C) + KL(C||C') from the couplings, and E drops by at least it."""
    v = votes(2.0, seed=2)
    _, info = dynamic_routing(v, 8, trace=True)
    for t in range(1, 7):
        c_t = dynamic_routing(v, t + 1)[1].couplings
        c_n = dynamic_routing(v, t + 2)[1].couplings
        direct = ((c_n - c_t) * (torch.log(c_n) - torch.log(c_t))).sum((1, 2))
        assert torch.allclose(info.sym_kl[t], direct, rtol=1e-9, atol=1e-14)
        assert bool((info.energy[t] - info.energy[t + 1] >= info.sym_kl[t] - energy_tolerance(v)).all())


def test_kkt_gap_is_the_frank_wolfe_gap_nonnegative_and_vanishes_on_long_runs():
    """G(C) = max over feasible C' of <grad E(C), C - C'> (grad E from autograd); ~0 at the limit."""
    v = votes(3.0, seed=3)
    _, info = dynamic_routing(v, 400, trace=True)
    gap = info.kkt_gap
    assert bool((gap >= -1e-12).all())
    assert float(gap[-1].max()) < 1e-6 * float(gap[0].min())
    for t in (0, 3):
        c = dynamic_routing(v, t + 1)[1].couplings.clone().requires_grad_()
        (grad,) = torch.autograd.grad(routing_energy(v, c).sum(), c)
        vertex = torch.nn.functional.one_hot((-grad).argmax(-1), N).double()  # the Frank-Wolfe vertex
        fw = (grad * (c - vertex)).sum((1, 2))
        assert torch.allclose(gap[t], fw, rtol=1e-9, atol=1e-14)


def test_kkt_certificate_of_a_long_run():
    model = model_with_long_votes(scale=100.0)  # long votes: routing reaches a vertex in a few hundred passes
    x = torch.rand(4, 1, 28, 28)
    certs = certificate(model, x, kkt_passes=400)
    kkt = certs[-1]
    assert kkt.name == "routing_kkt_gap" and not kkt.rigorous and kkt.why
    assert kkt.holds, kkt.line()


def test_certificate_of_a_model_holds_and_reports_every_pass():
    model = model_with_long_votes()
    certs = certificate(model, torch.rand(4, 1, 28, 28), passes=5)
    assert [c.name for c in certs] == NAMES
    assert all(c.holds and c.rigorous for c in certs), [c.line() for c in certs]
    per_pass = certs[1].details["per_pass_batch_mean"]
    assert len(per_pass["energy"]) == 5 and len(per_pass["kkt_gap"]) == 5
    assert all(b <= a for a, b in zip(per_pass["energy"], per_pass["energy"][1:]))
    assert model.training  # mode restored


@pytest.mark.parametrize(("variant", "fails"), [
    ("negative-update", {"routing_energy_increase", "routing_kl_decrease"}),
    ("softmax-over-children", {"routing_couplings_feasible"}),
])
def test_broken_routing_is_caught(variant, fails):
    assert variant in BROKEN_VARIANTS
    model = model_with_long_votes()
    model.classes.broken = variant
    certs = {c.name: c for c in certificate(model, torch.rand(4, 1, 28, 28), passes=5)}
    assert {n for n, c in certs.items() if not c.holds} == fails, [c.line() for c in certs.values()]


def test_non_finite_couplings_never_hold():
    v = votes(1.0)
    _, info = dynamic_routing(v, 4, trace=True)
    info.couplings[0, 0, 0] = math.nan
    assert not any(c.holds for c in routing_certificates(v, info) if c.name == "routing_couplings_feasible")
    info.energy[2, 1] = math.inf
    assert not any(c.holds for c in routing_certificates(v, info))


def test_certificate_needs_float64_traced_runs():
    v32 = DenseVotes(torch.randn(B, M, N, D))
    _, info = dynamic_routing(v32, 3, trace=True)
    with pytest.raises(ValueError, match="votes: expected float64"):
        routing_certificates(v32, info)
    _, info = dynamic_routing(votes(), 3)
    with pytest.raises(ValueError, match="info: expected the RoutingInfo of a traced run"):
        routing_certificates(votes(), info)
    with pytest.raises(ValueError, match="_broken: expected one of"):
        dynamic_routing(votes(), 3, _broken="other")


def test_vote_scale_bounds_the_votes():
    g = torch.Generator().manual_seed(4)
    u = torch.randn(B, M, 4, generator=g, dtype=torch.float64)
    w = torch.randn(N, M, 4, D, generator=g, dtype=torch.float64)
    fv = FactoredVotes(u, w)
    exact = DenseVotes(fv.dense()).vote_scale()
    assert bool((fv.vote_scale() >= exact).all()) and bool((fv.vote_scale() <= 3 * exact).all())


def test_old_summary_dict_still_works():
    cert = routing_certificate(model_with_long_votes(), torch.rand(4, 1, 28, 28), passes=5)
    assert cert["passes"] == 5 and cert["energy_non_increasing"]


def test_random_couplings_baseline():
    torch.manual_seed(0)
    model = CapsNet(small_config(conv_channels=16, primary_channels=4, couplings="random"))
    x = torch.rand(3, 1, 28, 28)
    v1, info = model(x)
    v2, _ = model(x)
    c = info.couplings
    assert torch.allclose(c.sum(-1), torch.ones(3, c.shape[1]))
    assert not torch.allclose(v1, v2)  # drawn afresh at every forward pass
    with pytest.raises(ValueError, match="couplings: expected one of"):
        CapsNet(small_config(couplings="learned"))
