"""Rigorous operator-norm bounds vs the dense SVD; power iteration is a lower estimate and restarts."""

import math

import pytest
import torch

from proxnets.norm_bounds import NormBound, cholesky_norm_bound, gram_iteration, norm_bound
from proxnets.operators import conv2d_operator, linear_operator, operator_matrix, power_iteration


def _exact(op) -> float:
    return float(torch.linalg.matrix_norm(operator_matrix(op, torch.float64), ord=2))


CONVS = [  # (C_out, C_in, k, size, stride, padding)
    (3, 2, 3, 7, 1, 1), (4, 3, 3, 6, 1, 0), (3, 3, 5, 8, 1, 2), (3, 2, 3, 7, 2, 1), (2, 2, 1, 5, 1, 0),
]


@pytest.mark.parametrize("co,ci,k,size,stride,padding", CONVS)
def test_every_rigorous_method_is_an_upper_bound_of_the_dense_svd(co, ci, k, size, stride, padding):
    g = torch.Generator().manual_seed(co * 7 + size)
    op = conv2d_operator(torch.randn(co, ci, k, k, generator=g), (ci, size, size), stride=stride, padding=padding)
    exact = _exact(op)
    methods = ["dense", "cholesky", "auto"] + (["fourier", "gram"] if stride == 1 else [])
    for method in methods:
        b = norm_bound(op, method=method)
        assert b.rigorous and b.value >= exact, (method, b.value, exact)
        if method in ("dense", "cholesky", "auto"):
            assert b.value <= exact * (1 + 1e-7), (method, b.value, exact)  # tight
    if stride != 1:
        with pytest.raises(ValueError, match="method: expected 'fourier' only for stride-1"):
            norm_bound(op, method="fourier")
    p = norm_bound(op, method="power")
    assert not p.rigorous and "lower estimate" in p.why and p.value <= exact * (1 + 1e-9)


def test_fourier_bound_is_loose_at_small_sizes_and_auto_is_tight():
    # the trap of the quick run: a circular-symbol bound well above the zero-padded operator's norm
    g = torch.Generator().manual_seed(3)
    op = conv2d_operator(torch.randn(4, 4, 3, 3, generator=g), (4, 5, 5), padding=1)
    exact = _exact(op)
    assert norm_bound(op, method="fourier").value > 1.02 * exact
    assert norm_bound(op).value <= exact * (1 + 1e-7)


def test_banded_cholesky_certificate_beyond_the_dense_size():
    g = torch.Generator().manual_seed(0)
    op = conv2d_operator(torch.randn(4, 4, 3, 3, generator=g), (4, 12, 12), padding=1)  # 576 columns
    exact = _exact(op)
    b = norm_bound(op, max_dense=100)
    assert b.rigorous and "banded Cholesky" in b.method and exact <= b.value <= exact * (1 + 1e-7)
    # a stalled estimate (the second singular value) does not fool the certificate
    s = torch.linalg.svdvals(operator_matrix(op, torch.float64))
    c = cholesky_norm_bound(op, estimate=float(s[1]))
    assert c.rigorous and c.value >= exact


def test_gram_iteration_converges_from_above():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(40, 25, generator=g, dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(m, ord=2))
    vals = [float(gram_iteration(m, t)) for t in range(12)]
    assert all(v >= exact * (1 - 1e-12) for v in vals)
    assert vals == sorted(vals, reverse=True) and vals[0] == pytest.approx(float(m.norm()))
    assert vals[-1] == pytest.approx(exact, rel=1e-6)
    b = norm_bound(m, method="gram")
    assert b.rigorous and b.value >= exact
    assert float(gram_iteration(torch.zeros(3, 3), 4)) == 0.0
    # batched over the Fourier symbol (complex matrices)
    sym = torch.randn(5, 3, 2, dtype=torch.complex128, generator=g)
    exact_sym = torch.linalg.matrix_norm(sym, ord=2)
    assert bool((gram_iteration(sym, 8) >= exact_sym * (1 - 1e-12)).all())


def test_power_iteration_zero_and_null_space_starts_are_rerandomized():
    m = torch.diag(torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64))
    op = linear_operator(m)
    for v0 in (torch.zeros(3, dtype=torch.float64), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)):
        sigma, _, info = power_iteration(op, v0, iterations=500, tol=1e-12, generator=torch.Generator().manual_seed(0))
        assert info.restarts >= 1 and float(sigma) == pytest.approx(3.0, rel=1e-6)
        assert info.lower_estimate


def test_norm_bound_record_and_errors():
    with pytest.raises(ValueError, match="why"):
        NormBound(1.0, False, "power iteration")
    with pytest.raises(ValueError, match="method: expected one of"):
        norm_bound(torch.eye(3), method="guess")
    with pytest.raises(ValueError, match=r"in_shape: expected \(C=2, H, W\)"):
        norm_bound(torch.nn.Conv2d(2, 3, 3))
    b = norm_bound(torch.nn.Conv2d(2, 3, 3, padding=1), (2, 6, 6))
    assert b.rigorous and math.isfinite(float(b))
