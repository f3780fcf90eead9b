"""Adjoint identities of every operator of the package, and power iteration vs dense SVD."""

import pytest
import torch

from proxnets.operators import LinearOperator, adjoint_test, operator_matrix, power_iteration
from proxnets.stable import Blur, ChannelSelect, NonExpansiveBlock, ScaledAvgPool2d, ZeroChannelPad, gaussian_kernel, motion_kernel
from proxnets.stable.norms import OperatorNorm, fourier_upper_bound, layer_operator


def _dense_norm(op: LinearOperator) -> float:
    return float(torch.linalg.matrix_norm(operator_matrix(op).double(), ord=2))


@pytest.mark.parametrize("boundary", ["circular", "valid"])
@pytest.mark.parametrize("kernel", ["gaussian", "motion"])
def test_stable_blur_adjoint_and_norm(boundary, kernel):
    k = gaussian_kernel(5, 1.2) if kernel == "gaussian" else motion_kernel(5, angle=30.0)
    assert abs(float(k.sum()) - 1) < 1e-6 and float(k.min()) >= 0
    blur = Blur(k, boundary)
    op = blur.operator((2, 9, 11))
    assert adjoint_test(op, generator=torch.Generator().manual_seed(1)) < 1e-6
    exact = _dense_norm(op)
    assert blur.norm((2, 9, 11)) == pytest.approx(exact, rel=2e-3)
    assert blur.norm((2, 9, 11)) >= exact * (1 - 1e-6)  # the certified side


def test_stable_circular_blur_is_diagonal_in_fourier():
    # circular blur commutes with shifts: A(roll x) = roll(A x)
    blur = Blur(motion_kernel(7, angle=45.0), "circular")
    x = torch.rand(1, 1, 16, 16)
    assert torch.allclose(blur.A(torch.roll(x, (3, -2), (2, 3))), torch.roll(blur.A(x), (3, -2), (2, 3)), atol=1e-6)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0), (2, 0)])
def test_stable_conv_norm_matches_dense_svd(stride, padding):
    w = torch.randn(3, 2, 3, 3)
    norm = OperatorNorm("conv2d", (2, 7, 7), stride=stride, padding=padding, exact_iterations=2000, tol=1e-10)
    op = layer_operator("conv2d", w, (2, 7, 7), stride, padding)
    assert adjoint_test(op) < 1e-6
    exact = _dense_norm(op)
    got = float(norm.exact(w))
    assert got >= exact * (1 - 1e-5)  # safety factor keeps the certified side
    assert got == pytest.approx(exact, rel=2e-3)
    # the norm of the operator is not that of the reshaped kernel
    sigma, _, _ = power_iteration(op, iterations=500, tol=1e-10)
    assert float(sigma) == pytest.approx(exact, rel=1e-4)


def test_stable_block_a_and_at_are_adjoint():
    for shape in [(3, 6, 6), (5,)]:
        block = NonExpansiveBlock(shape, features=4)
        x = torch.randn(1, *shape, dtype=torch.float64)
        block = block.double()
        z = torch.randn_like(block.apply_a(x))
        ax = block.apply_a(x) - block.bias.view(1, -1, *([1] * (x.ndim - 2)))  # bias-free A
        lhs = (ax * z).sum()
        rhs = (x * block.apply_at(z)).sum()
        assert float((lhs - rhs).abs().detach()) < 1e-9 * float((ax.norm() * z.norm()).detach())


def test_stable_glue_adjoints_and_norms():
    pad, sel = ZeroChannelPad(5), ChannelSelect(2)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    y = torch.randn(1, 5, 4, 4, dtype=torch.float64)
    assert float((pad(x) * y).sum() - (x * sel(y)).sum()).__abs__() < 1e-12
    assert torch.equal(sel(pad(x)), x)  # P^T P = I: the lift is an isometry
    pool = ScaledAvgPool2d(2)
    op = LinearOperator(lambda v: pool(v.reshape(1, 2, 4, 4)), None, (1, 2, 4, 4), torch.float64)
    assert _dense_norm(op) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("size,padding", [(5, 1), (6, 0), (8, 2)])
def test_stable_fourier_bound_is_an_upper_bound(size, padding):
    g = torch.Generator().manual_seed(size)
    w = torch.randn(3, 2, 3, 3, generator=g)
    exact = _dense_norm(layer_operator("conv2d", w, (2, size, size), 1, padding))
    upper = float(fourier_upper_bound(w, (2, size, size), padding))
    assert exact <= upper * (1 + 1e-6)
    assert upper <= 1.5 * exact  # and not vacuous
