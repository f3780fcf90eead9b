"""The operator-norm parametrization keeps |W|_2 <= target for the convolution operator."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from proxnets.equilibrium.layers import OptEqConv2d
from proxnets.equilibrium.parametrize import operator_norm_bound, refresh_operator_norm, weight_operator
from proxnets.utils.threads import intra_op_threads
from proxnets.operators import operator_matrix

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def single_thread():
    with intra_op_threads(1):
        yield


def dense_norm(module, in_shape=None):
    """|A_W|_2 from the dense matrix of the operator the module applies."""
    op = weight_operator(module, module.weight.detach(), in_shape)
    return float(torch.linalg.matrix_norm(operator_matrix(op), 2))


@pytest.mark.parametrize("stride,padding", [(1, 1), (1, 0), (2, 1)])
def test_conv_operator_norm_below_target(stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, bias=False).double()
    with torch.no_grad():
        conv.weight.mul_(5.0)
    in_shape = (3, 7, 7)
    before = dense_norm(conv, in_shape)
    assert before > 1.0
    operator_norm_bound(conv, target=0.5, in_shape=in_shape)
    after = dense_norm(conv, in_shape)
    assert after <= 0.5 * (1 + 1e-4)  # power iteration approaches the norm from below
    assert after >= 0.5 * (1 - 1e-3)  # scaled to the bound, not far below it
    # the norm of the reshaped kernel is a different quantity: bounding it would not bound the operator
    kernel_norm = float(torch.linalg.matrix_norm(conv.weight.detach().reshape(4, -1), 2))
    assert abs(kernel_norm - after) > 1e-2


def test_dense_norm_below_target_and_small_weights_untouched():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=False).double()
    with torch.no_grad():
        lin.weight.mul_(10.0)
    operator_norm_bound(lin, target=0.9)
    assert dense_norm(lin) <= 0.9 * (1 + 1e-4)
    small = nn.Linear(6, 5, bias=False).double()
    with torch.no_grad():
        small.weight.mul_(0.01)
    v = small.weight.detach().clone()
    operator_norm_bound(small, target=0.9)
    assert torch.equal(small.weight, v)


def test_bound_kept_during_training():
    torch.manual_seed(0)
    layer = OptEqConv2d(2, 4, (6, 6), target_norm=0.97, max_iter=200, tol=1e-5, policy="ignore").double().train()
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    x = torch.randn(8, 2, 6, 6, dtype=torch.float64)
    for _ in range(15):
        opt.zero_grad()
        (layer(x) - 1).pow(2).mean().backward()
        opt.step()
        # one warm-started power iteration per step tracks the norm of the moving weight
        assert dense_norm(layer.W, (4, 6, 6)) <= 0.97 * (1 + 1e-2)
    refresh_operator_norm(layer.W)
    layer.eval()
    assert dense_norm(layer.W, (4, 6, 6)) <= 0.97 * (1 + 1e-4)
    assert layer.operator_norm() <= 0.97


def test_register_remove_round_trip_is_invisible():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    operator_norm_bound(conv, target=0.8, in_shape=(2, 5, 5))
    conv.eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    y = conv(x)
    parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
    assert torch.allclose(conv(x), y)
    assert not parametrize.is_parametrized(conv)


def test_state_dict_carries_the_power_iteration_vector():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    operator_norm_bound(conv, target=0.8, in_shape=(2, 5, 5))
    assert "parametrizations.weight.0.norm.estimator.v" in conv.state_dict()  # the shared constraint keeps its norm in .norm


def test_errors():
    with pytest.raises(ValueError, match=r"in_shape: expected \(C=2, H, W\)"):
        operator_norm_bound(nn.Conv2d(2, 3, 3), target=0.5)
    with pytest.raises(ValueError, match=r"in_shape: expected \(C=2, H, W\)"):
        operator_norm_bound(nn.Conv2d(2, 3, 3), target=0.5, in_shape=(3, 5, 5))
    with pytest.raises(ValueError, match="target: expected"):
        operator_norm_bound(nn.Linear(2, 3), target=0.0)
    with pytest.raises(TypeError, match="module: expected an nn.Linear or nn.Conv2d"):
        operator_norm_bound(nn.Conv1d(2, 3, 3), target=0.5)
    with pytest.raises(ValueError, match="name: expected"):
        operator_norm_bound(nn.Linear(2, 3), "weights", target=0.5)
    with pytest.raises(ValueError, match="module: expected a module with a parametrized"):
        refresh_operator_norm(nn.Linear(2, 3))
