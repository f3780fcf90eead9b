"""TV-L2 (ROF) denoising baseline: its duality-gap certificate and its solver conventions."""

import math

import pytest
import torch

from proxnets.stable.tv import tv_denoise, tv_divergence, tv_dual_gap, tv_gradient, total_variation


def test_divergence_is_negative_adjoint_of_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    p = torch.randn(2, 3, 2, 5, 7, generator=g, dtype=torch.float64)
    assert abs(float((tv_gradient(x) * p).sum() + (x * tv_divergence(p)).sum())) < 1e-12


def test_constant_image_has_zero_tv_and_is_its_own_solution():
    y = torch.full((2, 1, 8, 9), 0.37)
    assert torch.equal(total_variation(y), torch.zeros(2))
    x, info = tv_denoise(y, 0.5, tol=1e-6)
    assert info.converged and info.stop_reason == "tol"
    assert torch.allclose(x, y, atol=1e-7)


def test_two_pixel_image_matches_closed_form():
    # 1x2 image: TV = |x2 - x1|; the solution moves both pixels lam towards each other, or meets at the mean
    for a, b, lam in ((0.9, 0.1, 0.1), (0.9, 0.1, 0.5), (0.2, 0.3, 0.01)):
        y = torch.tensor([[[[a, b]]]], dtype=torch.float64)
        x, info = tv_denoise(y, lam, tol=1e-6, max_iter=20000)
        s = math.copysign(1.0, b - a)
        want = (a + s * lam, b - s * lam) if abs(b - a) > 2 * lam else ((a + b) / 2,) * 2
        assert info.converged
        assert torch.allclose(x.flatten(), torch.tensor(want, dtype=torch.float64), atol=1e-6)


def _fista_dual(y: torch.Tensor, lam: float, iters: int):
    """A different algorithm: FISTA on the dual, min 1/2 |y + div p|^2 over |p| <= lam, step 1/8 (Beck & Teboulle 2009)."""
    p = q = torch.zeros(*y.shape[:2], 2, *y.shape[2:], dtype=torch.float64)
    t = 1.0
    for _ in range(iters):
        p_new = q + tv_gradient(y + tv_divergence(q)) / 8.0
        p_new = p_new * (lam / torch.linalg.vector_norm(p_new, dim=2, keepdim=True).clamp_min(lam))
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        q, p, t = p_new + (t - 1) / t_new * (p_new - p), p_new, t_new
    return y + tv_divergence(p), p


def test_tiny_case_matches_independent_high_precision_solve_and_the_bound_holds():
    y = torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam = 0.15
    ref, p_ref = _fista_dual(y, lam, 20000)
    ref_dist = tv_dual_gap(ref, p_ref, y, lam).clamp_min(0).mul(2).sqrt()  # |ref - x*|, by the same weak duality
    assert float(ref_dist.max()) < 1e-5
    x, info = tv_denoise(y, lam, tol=1e-4, max_iter=100000)
    assert info.converged
    err = torch.linalg.vector_norm((x - ref).flatten(1), dim=1)
    # the certificate: |x - x*| <= sqrt(2 gap) = final_residual * |x|, so |x - ref| <= that + |ref - x*|
    bound = torch.tensor(info.final_residual, dtype=torch.float64) * torch.linalg.vector_norm(x.flatten(1), dim=1)
    assert (err <= bound + ref_dist + 1e-12).all()
    assert float(err.max()) < 1e-3


def test_gap_is_nonnegative_and_falls_below_tol():
    g = torch.Generator().manual_seed(2)
    y = torch.rand(3, 1, 16, 16, generator=g)
    lam = 0.1
    # for arbitrary (x, p) the gap is an upper bound, hence nonnegative
    for _ in range(5):
        x = torch.rand(3, 1, 16, 16, generator=g)
        p = torch.randn(3, 1, 2, 16, 16, generator=g)
        assert (tv_dual_gap(x, p, y, lam) >= 0).all()
    x, info = tv_denoise(y, lam, tol=1e-3)
    assert info.converged and info.residuals[-1] <= 1e-3
    assert all(r >= 0 for r in info.residuals) and all(d >= 0 for d in info.abs_residuals)
    assert info.objectives[-1] <= info.objectives[0] + 1e-9


def test_capped_iterations_are_not_converged():
    y = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with pytest.warns(Warning):
        _, info = tv_denoise(y, 0.2, tol=1e-8, max_iter=20)
    assert not info.converged and info.stop_reason == "max_iter" and not info.diverged
    assert info.residuals[-1] > 1e-8


def test_zero_weight_returns_the_input():
    y = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    x, info = tv_denoise(y, 0.0)
    assert info.converged and torch.allclose(x, y, atol=1e-7)


def test_nonfinite_input_is_refused():
    y = torch.rand(1, 1, 4, 4)
    y[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="y"):
        tv_denoise(y, 0.1)
