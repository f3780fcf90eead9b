"""The new proximal activations: closed-form f against the generic numerical construction
(f = phi^* - |.|^2/2 from the inverse of sigma), and the generic constructor's input checks."""

import math

import pytest
import torch

from proxnets.equilibrium.prox import (
    PROX_ACTIVATIONS,
    IncreasingProx,
    LeakyReLUProx,
    SigmoidProx,
    SoftsignProx,
    TanhProx,
    get_activation,
)

CLOSED = [
    (TanhProx(), torch.tanh),
    (SigmoidProx(), lambda v: torch.sigmoid(v) - 0.5),
    (SoftsignProx(), lambda v: v / (1 + v.abs())),
    (LeakyReLUProx(0.2), lambda v: torch.where(v >= 0, v, 0.2 * v)),
]


@pytest.mark.parametrize("closed,sigma", CLOSED, ids=[type(c).__name__ for c, _ in CLOSED])
def test_closed_form_f_equals_the_numerical_f_from_the_inverse(closed, sigma):
    generic = IncreasingProx(sigma, name="generic", bracket=40.0)
    v = torch.linspace(-6, 6, 49, dtype=torch.float64)
    z = closed.prox(v).reshape(-1, 1)  # points inside the range, one per sample
    assert torch.allclose(generic.prox(v), closed.prox(v))
    assert torch.allclose(generic.value(z), closed.value(z), atol=1e-8, rtol=1e-8)


def test_closed_forms_at_known_points():
    one = torch.ones(1, 1, dtype=torch.float64)
    assert math.isclose(float(TanhProx().value(one)), math.log(2) - 0.5, rel_tol=1e-12)  # f(1) = log 2 - 1/2
    assert math.isclose(float(SigmoidProx().value(0.5 * one)), math.log(2) - 0.125, rel_tol=1e-12)
    assert torch.isinf(SoftsignProx().value(one))[0]
    assert float(LeakyReLUProx(0.5).value(-one)) == 0.5  # (1/a - 1) z^2 / 2 = 1/2
    for act in (TanhProx(), SigmoidProx(), SoftsignProx()):
        assert torch.isinf(act.value(3 * one))[0]


@pytest.mark.parametrize("name", ["leaky_relu", "tanh", "sigmoid", "softsign"])
def test_registered_and_prox_of_zero_is_zero(name):
    act = get_activation(name)
    assert name in PROX_ACTIVATIONS
    assert float(act.prox(torch.zeros(1, 1))) == 0.0
    act.with_l1(0.1)  # an L1 prior composes (prox_f(0) = 0)


@pytest.mark.parametrize("name", ["leaky_relu", "tanh", "sigmoid", "softsign"])
def test_derivative_at_output_equals_derivative(name):
    act = get_activation(name)
    v = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    assert torch.allclose(act.derivative_at_output(act.prox(v)), act.derivative(v))


def test_generic_constructor_rejects_slope_above_one_and_decreasing():
    with pytest.raises(ValueError, match="sigma: expected a non-decreasing function with slope <= 1"):
        IncreasingProx(lambda v: 2 * torch.tanh(v))
    with pytest.raises(ValueError, match="sigma: expected a non-decreasing function"):
        IncreasingProx(lambda v: -torch.tanh(v))
    with pytest.raises(ValueError, match="slope: expected"):
        LeakyReLUProx(1.5)
