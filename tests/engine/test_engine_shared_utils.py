import math

import pytest
import torch

from proxnets.engine.plotting import line_plot, multi_plot
from proxnets.operators import (OperatorNormEstimator, adjoint_test, conv2d_operator, linear_operator,
                                operator_matrix, power_iteration)
from proxnets.utils.convergence import IterInfo, NonConvergenceError, NonConvergenceWarning, handle_nonconvergence
from proxnets.utils.io import read_json, write_json
from proxnets.utils.validation import check_int, check_number, check_tensor


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (2, 0), (1, 0)])
def test_conv_operator_adjoint_and_norm_match_dense(stride, padding):
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    op = conv2d_operator(w, (3, 5, 5), stride=stride, padding=padding)
    assert adjoint_test(op) < 1e-12
    dense = operator_matrix(op)
    exact = float(torch.linalg.matrix_norm(dense, 2))
    sigma, v, info = power_iteration(op, iterations=2000, tol=1e-13)
    assert float(sigma) <= exact * (1 + 1e-9)  # |A v| never exceeds the norm
    assert float(sigma) == pytest.approx(exact, rel=5e-3)
    # the adjoint is the transpose of the dense matrix
    y = torch.randn(dense.shape[0], dtype=torch.float64)
    x_adj = op.adjoint(y.reshape((1, 4) + op.forward(torch.zeros(op.in_shape, dtype=torch.float64)).shape[2:]))
    assert torch.allclose(x_adj.reshape(-1), dense.T @ y, atol=1e-10)


def test_power_iteration_linear_and_warm_start():
    m = torch.diag(torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64))
    sigma, v, info = power_iteration(linear_operator(m), iterations=200, tol=1e-12)
    assert float(sigma) == pytest.approx(5.0, rel=1e-9) and info.converged
    _, _, info2 = power_iteration(linear_operator(m), v0=v, iterations=200, tol=1e-12)
    assert info2.iterations < info.iterations


def test_estimator_persistent_vector_and_gradient():
    w = torch.randn(2, 2, 3, 3, requires_grad=True)
    est = OperatorNormEstimator((1, 2, 6, 6), exact_iterations=300)
    exact = float(torch.linalg.matrix_norm(operator_matrix(conv2d_operator(w.detach().double(), (2, 6, 6))), 2))
    cheap = [float(est(conv2d_operator(w, (2, 6, 6)))) for _ in range(100)]
    assert cheap[-1] == pytest.approx(exact, rel=3e-2) and cheap[-1] >= cheap[0] - 1e-6
    s = est(conv2d_operator(w, (2, 6, 6)), mode="exact")
    s.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    with pytest.raises(ValueError, match="mode: expected one of"):
        est(conv2d_operator(w, (2, 6, 6)), mode="fast")


def test_validation_messages():
    with pytest.raises(ValueError, match=r"tol: expected a number in \(0.0, inf\], got -1"):
        check_number("tol", -1, low=0.0, low_inclusive=False)
    with pytest.raises(ValueError, match="finite"):
        check_number("eps", math.nan)
    with pytest.raises(TypeError, match="iterations: expected an integer, got 2.5"):
        check_int("iterations", 2.5)
    with pytest.raises(ValueError, match=r"votes: expected shape \(\*, 3\), got 'shape \(2, 4\)'"):
        check_tensor("votes", torch.zeros(2, 4), shape=(None, 3))
    with pytest.raises(ValueError, match="NaN"):
        check_tensor("x", torch.tensor([1.0, math.nan]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.complex64])
def test_check_tensor_finds_any_nan_or_inf_and_accepts_huge_finite_values(dtype):
    """The one-pass finiteness check (min and max) sees a NaN, +inf or -inf wherever it is, and finite values whose
    sum would overflow are still finite."""
    for bad in (math.nan, math.inf, -math.inf):
        for pos in (0, 17, 4095):
            x = torch.zeros(4096, dtype=dtype)
            x[pos] = bad
            with pytest.raises(ValueError, match="NaN or inf"):
                check_tensor("x", x.view(64, 64))
    big = torch.finfo(torch.float32 if dtype == torch.complex64 else dtype).max
    check_tensor("x", torch.full((1000,), big, dtype=dtype))
    check_tensor("x", torch.zeros(0, 3, dtype=dtype))


def test_nonconvergence_policy():
    info = IterInfo(iterations=5, converged=False, residuals=[1e-2])
    with pytest.warns(NonConvergenceWarning, match="solver did not converge in 5 iterations"):
        handle_nonconvergence(info, "warn", "solver")
    with pytest.raises(NonConvergenceError):
        handle_nonconvergence(info, "raise", "solver")
    handle_nonconvergence(IterInfo(1, True, [0.0]), "raise", "solver")


def test_plots_and_json_are_written_atomically(tmp_path):
    p = line_plot(tmp_path / "a.png", {"x": ([1, 2, 3], [3, 2, 1])}, xlabel="k", logy=True)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    multi_plot(tmp_path / "b.png", [dict(series={"a": ([0, 1], [0, 1])}), dict(series={"b": ([0, 1], [1, 0])}, kind="scatter")])
    write_json(tmp_path / "r.json", {"t": torch.tensor([1.0, 2.0]), "n": float("nan")})
    assert read_json(tmp_path / "r.json")["t"] == [1.0, 2.0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.png", "b.png", "r.json"]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
