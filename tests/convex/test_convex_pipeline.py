"""Patch pipeline, kernels and feature maps, nuclear-norm projection and prox."""

import itertools

import numpy as np
import pytest
import torch

from proxnets.convex.kernels import (
    NystromFeatures,
    RandomFourierFeatures,
    kernel_matrix,
    kernel_matvec,
    make_feature_map,
)
from proxnets.convex.nuclear import project_l1_ball, project_nuclear_ball, singular_value_threshold
from proxnets.convex.patches import contrast_normalize, extract_patches, fit_zca, pool_features


def test_patches_are_the_image_windows():
    x = torch.arange(2 * 2 * 6 * 7, dtype=torch.float32).reshape(2, 2, 6, 7)
    p = extract_patches(x, (3, 2), stride=2, padding=1)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    grid_w = (7 + 2 - 2) // 2 + 1
    for n, (i, j) in itertools.product(range(2), [(0, 0), (1, 2), (2, 3)]):
        window = xp[n, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 2].reshape(-1)
        assert torch.equal(p[n, i * grid_w + j], window)


def test_patch_larger_than_image_is_an_error():
    with pytest.raises(ValueError, match="patch_size: expected a window no larger than the \\(padded\\) image 4x4"):
        extract_patches(torch.zeros(1, 1, 4, 4), 5)


def test_contrast_normalization_centers_and_scales():
    x = torch.randn(100, 25, dtype=torch.float64) * 3 + 2
    c = contrast_normalize(x, eps=0.1)
    assert torch.allclose(c.mean(-1), torch.zeros(100, dtype=torch.float64), atol=1e-12)
    nrm = (x - x.mean(-1, keepdim=True)).norm(dim=-1)
    assert torch.allclose(c.norm(dim=-1), nrm / (nrm + 0.1))


def test_zca_whitens():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    x = torch.randn(20000, 6, generator=g, dtype=torch.float64) @ mix + 1.0
    z = fit_zca(x, eps=1e-9)
    w = z(x)
    cov = w.T @ w / (len(x) - 1)
    assert torch.allclose(cov, torch.eye(6, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(z.matrix, z.matrix.T)  # ZCA (not PCA): the symmetric whitening


def test_pooling_averages_windows():
    f = torch.randn(2, 4 * 6, 3)
    out = pool_features(f, (4, 6), 2, 2)
    maps = f.reshape(2, 4, 6, 3)
    assert torch.allclose(out[:, 1 * 3 + 2], maps[:, 2:4, 4:6].mean((1, 2)), atol=1e-6)


@pytest.mark.parametrize("name", ["rbf", "inverse_poly", "linear"])
def test_kernel_matrix_chunks_and_formula(name):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(37, 5, generator=g, dtype=torch.float64), dim=1) * 0.9
    y = torch.nn.functional.normalize(torch.randn(11, 5, generator=g, dtype=torch.float64), dim=1) * 0.9
    k = kernel_matrix(name, x, y, gamma=0.7, chunk=4)
    i, j = 5, 3
    ref = {"rbf": np.exp(-0.7 * float((x[i] - y[j]).pow(2).sum())), "inverse_poly": 1 / (2 - float(x[i] @ y[j])),
           "linear": float(x[i] @ y[j])}[name]
    assert abs(float(k[i, j]) - ref) < 1e-12
    assert torch.allclose(k, kernel_matrix(name, x, y, gamma=0.7, chunk=1000))
    v = torch.randn(11, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(kernel_matvec(name, x, y, v, gamma=0.7, chunk=3), k @ v)


def test_random_fourier_features_approximate_rbf():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64) * 0.5
    phi = RandomFourierFeatures(4, 20000, 0.5, generator=g).double()
    approx = phi(x) @ phi(x).T
    exact = kernel_matrix("rbf", x, x, gamma=0.5)
    err = (approx - exact).abs()
    assert float(err.mean()) < 0.01 and float(err.max()) < 0.05


@pytest.mark.parametrize("name", ["rbf", "inverse_poly"])
def test_nystrom_is_exact_on_landmarks_and_close_elsewhere(name):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(300, 3, generator=g, dtype=torch.float64), dim=1) * 0.9
    phi = NystromFeatures(x[:150], name, gamma=0.5)
    lm = phi(x[:150])
    assert torch.allclose(lm @ lm.T, kernel_matrix(name, x[:150], x[:150], gamma=0.5), atol=1e-6)
    rest = phi(x[150:])
    assert float((rest @ rest.T - kernel_matrix(name, x[150:], x[150:], gamma=0.5)).abs().max()) < 1e-2


def test_feature_map_errors():
    with pytest.raises(ValueError, match="feature_map: expected 'nystrom' for a kernel other than rbf"):
        make_feature_map("rff", "inverse_poly", 3, 10, 1.0)
    with pytest.raises(ValueError, match="kernel: expected one of"):
        make_feature_map("rff", "laplace", 3, 10, 1.0)


def _brute_l1_projection(x, radius):
    """Independent reference: bisection on the threshold theta of sign(x)(|x| - theta)_+."""
    if np.abs(x).sum() <= radius:
        return x
    lo, hi = 0.0, np.abs(x).max()
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(np.abs(x) - mid, 0).sum() > radius:
            lo = mid
        else:
            hi = mid
    return np.sign(x) * np.maximum(np.abs(x) - hi, 0)


def test_l1_projection_matches_bisection():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.normal(size=8) * 3
        r = float(rng.uniform(0.1, 5))
        ours = project_l1_ball(torch.tensor(x), r).numpy()
        assert np.allclose(ours, _brute_l1_projection(x, r), atol=1e-10)


def _random_nuclear_ball_point(rng, shape, radius):
    a = rng.normal(size=shape)
    return a * (radius * rng.uniform() / np.linalg.svd(a, compute_uv=False).sum())


def test_nuclear_projection_is_the_nearest_point():
    rng = np.random.default_rng(1)
    for _ in range(5):
        a = rng.normal(size=(4, 3)) * 2
        r = 1.5
        proj = project_nuclear_ball(torch.tensor(a), r).numpy()
        assert np.linalg.svd(proj, compute_uv=False).sum() <= r + 1e-9
        d0 = np.linalg.norm(a - proj)
        # variational inequality of the projection onto a convex set, and no sampled point is nearer
        for _ in range(2000):
            b = _random_nuclear_ball_point(rng, a.shape, r)
            assert np.sum((a - proj) * (b - proj)) <= 1e-9
            assert np.linalg.norm(a - b) >= d0 - 1e-9


def test_singular_value_threshold_is_the_prox():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5, 4))
    t = 0.8
    x = singular_value_threshold(torch.tensor(a), t).numpy()

    def obj(b):
        return t * np.linalg.svd(b, compute_uv=False).sum() + 0.5 * np.sum((b - a) ** 2)

    best = obj(x)
    for _ in range(3000):
        assert obj(x + rng.normal(size=a.shape) * rng.choice([1e-3, 1e-2, 1e-1])) >= best - 1e-12
