"""The per-weight Hamiltonian maximization is exact: brute force on random instances."""

import math

import pytest
import torch

from proxnets.pmp import LinearizedHamiltonianRule, SparseRegularizer, augmented_hamiltonian_1d, soft_threshold


@pytest.mark.parametrize("lam1,lam2", [(0.0, 0.0), (0.5, 0.0), (0.0, 2.0), (0.3, 1.0)])
def test_rule_equals_brute_force_1d_maximizer(lam1, lam2):
    gen = torch.Generator().manual_seed(0)
    rule = LinearizedHamiltonianRule()
    for trial in range(40):
        reg = SparseRegularizer(beta=float(torch.rand(1, generator=gen)) * 2, lam1=lam1, lam2=lam2)
        eps = float(torch.rand(1, generator=gen)) * 3 + 0.05
        rho = float(torch.rand(1, generator=gen)) * 0.5
        w_k = torch.randn(8, generator=gen, dtype=torch.float64)
        w_k[:2] = 0.0  # include weights that are already zero
        grad = torch.randn(8, generator=gen, dtype=torch.float64) * 2
        w = rule(w_k, grad, eps, rho, reg)
        for i in range(8):
            # brute force: a fine grid covering 0 and the unregularized maximizer (every maximizer
            # of the regularized problem lies between them), plus the point 0 itself
            free = float(w_k[i] - grad[i] / (2 * eps))
            lo, hi = min(0.0, free) - 0.5, max(0.0, free) + 0.5
            grid = torch.cat([torch.linspace(lo, hi, 20001, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
            step = (hi - lo) / 20000
            values = (-grad[i] * (grid - w_k[i]) - rho * (reg.beta * (grid != 0) + lam1 * grid.abs()
                      + 0.5 * lam2 * grid**2) - eps * (grid - w_k[i]) ** 2)
            best = float(values.max())
            ours = float(augmented_hamiltonian_1d(w[i:i + 1], w_k[i:i + 1], -grad[i:i + 1], eps, rho, reg))
            assert ours >= best - 1e-6, (trial, i, ours, best)
            arg = float(grid[values.argmax()])
            # the maximizer is unique unless the zero and nonzero branches tie
            assert abs(float(w[i]) - arg) <= 2 * step or abs(best - float(values[-1])) < 1e-5


def test_pure_l0_is_hard_thresholding_of_a_gradient_step():
    gen = torch.Generator().manual_seed(1)
    w_k, g = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    eps, rho = 2.0, 0.1
    w = LinearizedHamiltonianRule()(w_k, g, eps, rho, SparseRegularizer())
    z = w_k - g / (2 * eps)
    expected = torch.where(z.abs() > math.sqrt(rho / eps), z, torch.zeros_like(z))
    assert torch.equal(w, expected)
    assert (w == 0).sum() > 0  # exact zeros, not small values


def test_l1_only_is_soft_thresholding():
    z = torch.linspace(-2, 2, 41)
    reg = SparseRegularizer(beta=0.0, lam1=1.0)
    assert torch.allclose(reg.prox(z, 0.5), soft_threshold(z, 0.5))


def test_regularizer_value_and_validation():
    reg = SparseRegularizer(beta=2.0, lam1=0.5, lam2=4.0)
    w = torch.tensor([0.0, 1.0, -2.0])
    assert float(reg.value(w)) == pytest.approx(2 * 2 + 0.5 * 3 + 0.5 * 4 * 5)
    with pytest.raises(ValueError, match="beta: expected"):
        SparseRegularizer(beta=-1.0)
