"""The update's faster paths give the same numbers as the reference ones (each test has a broken variant that fails)."""

import math

import torch
from pmp_closures import full_batch_steps

from proxnets.pmp import BSQH, LinearizedHamiltonianRule, SparseRegularizer
from proxnets.pmp.regularizers import nonzero_count
from proxnets.pmp.sparsity import sparsity_param_groups


def test_nonzero_count_is_count_nonzero_with_nan_inf_and_signed_zeros():
    w = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -1e-45, 1.0, 0.0])
    assert int(nonzero_count(w)) == int(torch.count_nonzero(w)) == 4
    broken = lambda v: (v > 0).sum()  # noqa: E731  (misses negatives and NaN)
    assert int(broken(w)) != int(torch.count_nonzero(w))


def test_rule_into_the_parameter_equals_the_rule_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    rule = LinearizedHamiltonianRule()
    for reg in (SparseRegularizer(beta=1.0, lam2=1e-3, normalize="layer", bound=1.0), SparseRegularizer(lam1=0.01),
                SparseRegularizer(structure="filter", lam2=0.1)):
        w_k, grad = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
        for rho in (0.0, 0.5):
            ref = rule(w_k, grad, 0.7, rho, reg)
            out = torch.empty_like(w_k)
            assert torch.equal(rule.into(out, w_k, grad, 0.7, rho, reg), ref)
            z = torch.add(w_k, grad, alpha=-0.5 / 0.7)
            assert torch.equal(rule.into(torch.empty_like(w_k), w_k, grad, 0.7, rho, reg, z=z), ref)
            if rho:  # broken: a point from the wrong eps is detected
                bad = rule.into(torch.empty_like(w_k), w_k, grad, 0.7, rho, reg, z=torch.add(w_k, grad, alpha=-0.5))
                assert not torch.equal(bad, ref)


def _run(set_to_none: bool, keep: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))

    class Opt(BSQH):
        def zero_grad(self, set_to_none=True):  # keep=False: the broken variant, torch's zero_grad in the trial
            return super().zero_grad(set_to_none) if keep else torch.optim.Optimizer.zero_grad(self, set_to_none)

    opt = Opt(sparsity_param_groups(model, 0.01), eps=1e-3, eta=1e-4, eps_rule="sigma-zeta", sigma=10.0)

    full_batch_steps(model, opt, x, y, 3, set_to_none=set_to_none)
    return [p.detach().clone() for p in model.parameters()], opt


def test_a_retried_trial_uses_the_sweeps_gradient_whatever_the_closures_zero_grad():
    ref, opt = _run(True, True)
    assert opt.run_state["rejected"] > 0  # eps 1e-3: a huge first step, rejected and retried
    got, _ = _run(False, True)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    broken, _ = _run(False, False)  # the trial's zero_grad(set_to_none=False) zeroes the gradient in place
    assert not all(torch.equal(a, b) for a, b in zip(ref, broken))
