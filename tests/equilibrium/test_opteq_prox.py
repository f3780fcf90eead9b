"""Every proximal activation is the prox of the convex f it reports."""

import pytest
import torch

from proxnets.equilibrium.prox import (
    PROX_ACTIVATIONS,
    BoxClamp,
    IncreasingProx,
    ReLUProx,
    UserProx,
    get_activation,
    soft_threshold,
)


def _user_quadratic(c=0.5):
    # f(z) = c/2 z^2, prox(v) = v / (1 + c)
    return UserProx(
        lambda z: 0.5 * c * z.reshape(z.shape[0], -1).pow(2).sum(1),
        lambda v: v / (1 + c),
        lambda v: torch.full_like(v, 1 / (1 + c)),
        name="quadratic",
    )


def all_activations():
    acts = [get_activation(name) for name in sorted(PROX_ACTIVATIONS)]
    acts += [_user_quadratic(), BoxClamp(-0.5, 2.0), get_activation("relu").with_l1(0.3),
             get_activation("box").with_l1(0.2), get_activation("soft_threshold", lam=0.1).with_l1(0.2),
             get_activation("tanh").with_l1(0.1), get_activation("leaky_relu", slope=0.3),
             IncreasingProx(lambda v: 0.5 * torch.atan(v), name="atan/2")]
    return acts


ACTS = all_activations()
IDS = [repr(a) for a in ACTS]


@pytest.mark.parametrize("act", ACTS, ids=IDS)
def test_prox_is_the_argmin_on_a_grid(act):
    # prox_f(v) minimizes f(z) + 1/2 (z - v)^2: compare with brute force on a fine grid
    v = torch.linspace(-3, 3, 61, dtype=torch.float64)
    grid = torch.linspace(-5, 5, 20001, dtype=torch.float64)
    f_grid = act.value(grid.reshape(-1, 1))  # per-sample f of each scalar
    obj = f_grid.reshape(1, -1) + 0.5 * (grid.reshape(1, -1) - v.reshape(-1, 1)) ** 2
    brute = grid[obj.argmin(dim=1)]
    p = act.prox(v.reshape(-1, 1)).reshape(-1)
    assert torch.allclose(p, brute, atol=1e-3)


@pytest.mark.parametrize("act", ACTS, ids=IDS)
def test_prox_inequality_and_finite_value(act):
    # p = prox_f(v) iff <v - p, z - p> <= f(z) - f(p) for all z in dom f
    g = torch.Generator().manual_seed(0)
    v = 2 * torch.randn(64, 5, generator=g, dtype=torch.float64)
    p = act.prox(v)
    z = act.prox(2 * torch.randn(64, 5, generator=g, dtype=torch.float64))  # points of dom f
    lhs = ((v - p) * (z - p)).sum(1)
    rhs = act.value(z) - act.value(p)
    assert torch.isfinite(act.value(p)).all()
    assert (lhs <= rhs + 1e-10).all()


@pytest.mark.parametrize("act", ACTS, ids=IDS)
def test_derivative_matches_autograd(act):
    v = torch.randn(32, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    v.requires_grad_()
    auto = torch.autograd.grad(act.prox(v).sum(), v)[0]
    assert torch.allclose(act.derivative(v.detach()), auto)


def test_value_is_inf_outside_domain():
    assert torch.isinf(ReLUProx().value(torch.tensor([[1.0, -0.1]])))[0]
    assert torch.isinf(BoxClamp(0, 1).value(torch.tensor([[1.5]])))[0]


def test_l1_shifted_relu():
    act = ReLUProx().with_l1(0.5)
    v = torch.tensor([[-1.0, 0.2, 0.7, 2.0]])
    assert torch.allclose(act.prox(v), torch.relu(v - 0.5))
    assert torch.allclose(soft_threshold(v, 0.5), torch.tensor([[-0.5, 0.0, 0.2, 1.5]]))


def test_errors():
    with pytest.raises(ValueError, match="activation: expected one of"):
        get_activation("nope")
    with pytest.raises(ValueError, match="high: expected a number > low"):
        BoxClamp(1.0, 0.0)
    with pytest.raises(ValueError, match="lam: expected"):
        get_activation("soft_threshold", lam=-1.0)
    with pytest.raises(ValueError, match=r"prox_f\(0\) = 0"):
        BoxClamp(1.0, 2.0).with_l1(0.1)
    with pytest.raises(TypeError, match="prox_fn"):
        UserProx(lambda z: z, None)


@pytest.mark.parametrize("act", ACTS, ids=IDS)
def test_inplace_prox_equals_prox(act):
    v = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2
    assert torch.equal(act.prox_(v.clone()), act.prox(v))


@pytest.mark.parametrize("act", ACTS, ids=IDS)
def test_binary_derivative_flag_is_true_only_for_a_0_1_derivative(act):
    # the symmetrized adjoint skips sqrt(prox') when the flag is set: sound only if prox' is 0/1 everywhere;
    # an unflagged activation with a derivative must really have values strictly between 0 and 1 (else the
    # flag is missing), on the same samples
    v = torch.randn(64, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    d = act.derivative(v)
    if d is None:
        assert not act.binary_derivative
        return
    is_binary = bool(((d == 0) | (d == 1)).all())
    assert act.binary_derivative == is_binary, (act, d.unique()[:8])
    at_out = act.derivative_at_output(act.prox(v))
    if act.binary_derivative and at_out is not None:
        assert bool(((at_out == 0) | (at_out == 1)).all())
