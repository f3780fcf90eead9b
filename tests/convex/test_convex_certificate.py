"""The convex certificates can fail: a wrong-sign dual step fails the gap, an infeasible dual
value fails weak duality, and the CNN baseline's Lipschitz bound is a bound and can exceed 1."""

import pytest
import torch

from proxnets.convex import DCCNN, certificate
from proxnets.convex.dual import solve_dual
from proxnets.convex.models import SmallCNN
from proxnets.convex.sources import CachedFeatures
from proxnets.stable.norms import fourier_upper_bound

N, P, D, K = 60, 3, 6, 3


def _problem():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % K
    z = torch.randn(N, P, D, generator=g, dtype=torch.float64)
    z[:, 0, :K] += 1.5 * torch.nn.functional.one_hot(y, K).double()
    return CachedFeatures(z, chunk=16), y


def _by_name(certs):
    return {c.name: c for c in certs}


def test_gap_certificate_holds_for_the_solver_and_fails_for_a_wrong_sign_dual_step():
    src, y = _problem()
    _, good = solve_dual(src, y, K, 0.05, max_iter=1500, tol=0.0, on_nonconvergence="ignore")
    c = _by_name(certificate(good, tol=1e-3))
    assert c["relative_duality_gap"].holds and c["relative_duality_gap"].rigorous
    assert c["weak_duality"].holds
    _, bad = solve_dual(src, y, K, 0.05, max_iter=1500, tol=0.0, on_nonconvergence="ignore", step_sign=-1.0)
    c = _by_name(certificate(bad, tol=1e-3))
    assert not c["relative_duality_gap"].holds  # the bound stays valid, the gap does not close
    assert c["weak_duality"].holds


def test_an_infeasible_dual_value_breaks_weak_duality():
    src, y = _problem()
    _, bad = solve_dual(src, y, K, 0.05, max_iter=50, tol=0.0, on_nonconvergence="ignore", feasible_dual=False)
    assert not _by_name(certificate(bad))["weak_duality"].holds


@pytest.fixture(scope="module")
def fitted():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(80, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    m = DCCNN(patch_size=3, n_features=16, pool_size=2, lam=0.02, max_iter=400, tol=0.0, chunk=32,
              on_nonconvergence="ignore").fit(x, y)
    return m, x, y


def test_recomputed_gap_matches_the_trace_and_a_corrupted_dual_iterate_fails(fitted):
    m, x, y = fitted
    trace = _by_name(certificate(m))["relative_duality_gap"].value
    recomputed = _by_name(certificate(m, x, y))
    assert recomputed["relative_duality_gap"].value == pytest.approx(trace, rel=1e-3, abs=1e-6)
    assert recomputed["relative_duality_gap_model"].value > 0  # the recovered W H against the same dual bound
    p = m.dual_.p.clone()
    try:
        m.dual_.p.copy_(torch.full_like(p, 0.5))  # corrupt the dual iterate: uniform rows
        corrupted = _by_name(certificate(m, x, y, tol=1e-3))["relative_duality_gap"]
    finally:
        m.dual_.p.copy_(p)
    assert not corrupted.holds and corrupted.value > 10 * max(trace, 1e-3)


def test_lipschitz_bound_is_a_bound_and_fails_once_scaled():
    torch.manual_seed(0)
    model = SmallCNN((1, 12, 12), 4, width=3, patch_size=3, pool_size=2).double()
    cert = certificate(model, torch.rand(2, 1, 12, 12))[0]
    assert cert.rigorous and cert.name == "lipschitz"
    # exact conv norm <= the Fourier upper bound; empirical ratios <= the bound
    assert cert.details["conv"] <= float(fourier_upper_bound(model.conv.weight.detach(), (1, 12, 12))) + 1e-9
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(64, 1, 12, 12, generator=g, dtype=torch.float64), torch.rand(64, 1, 12, 12, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ratio = ((model(a) - model(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)).max()
    assert float(ratio) <= cert.value
    with torch.no_grad():
        model.head.weight.mul_(10.0 / cert.value)  # a trained baseline: nothing keeps it non-expansive
    scaled = certificate(model, torch.rand(2, 1, 12, 12))[0]
    assert not scaled.holds and scaled.value == pytest.approx(10.0, rel=1e-9)
    big = SmallCNN((1, 40, 40), 2, width=2, patch_size=3).double()
    assert "Fourier" in certificate(big, torch.rand(1, 1, 40, 40))[0].method


def test_certificate_errors(fitted):
    m, x, y = fitted
    with pytest.raises(ValueError, match="y: expected"):
        certificate(m, x)
    with pytest.raises(ValueError, match="model: expected"):
        certificate(object())
    with pytest.raises(ValueError, match="model: expected a fitted"):
        certificate(DCCNN())
