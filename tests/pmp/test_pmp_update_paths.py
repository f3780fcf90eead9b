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


def _terms_one_by_one(reg, w):
    """(L0 price, |w|_1, |w|^2) term by term: the definition."""
    zero = w.new_zeros(())
    if not reg.beta:
        l0 = zero
    elif reg.structure == "filter":
        g = w.reshape(w.shape[0], -1) if w.dim() else w.reshape(1, 1)
        l0 = reg.l0_weight(w) * g.shape[1] * (g != 0).any(1).sum().to(w.dtype)
    else:
        l0 = reg.l0_weight(w) * torch.count_nonzero(w).to(w.dtype)
    return torch.stack([l0, w.abs().sum() if reg.lam1 else zero, (w * w).sum() if reg.lam2 else zero])


def test_sparse_terms_equal_the_terms_one_by_one_bit_for_bit():
    from proxnets.pmp.regularizers import sparse_terms

    g = torch.Generator().manual_seed(0)
    regs = [SparseRegularizer(beta=1.0, lam2=1e-3, normalize="group", count=977), SparseRegularizer(beta=0.3, lam1=0.01),
            SparseRegularizer(beta=1.0, structure="filter", lam2=0.1, normalize="layer"), SparseRegularizer(beta=0.0),
            SparseRegularizer(beta=2.0, lam1=0.5, lam2=0.25, normalize="layer")]
    shapes = [(120, 7), (16, 6, 5, 5), (6, 1, 5, 5), (10,), (84,)]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        ws = []
        for shape in shapes:
            w = torch.randn(shape, generator=g).to(dtype)
            w[torch.rand(shape, generator=g) < 0.6] = 0.0
            ws.append(w)
        ws[2][1] = 0.0  # a zero filter
        ref = torch.stack([_terms_one_by_one(r, w) for r, w in zip(regs, ws)])
        for order in (list(range(5)), [4, 3, 2, 1, 0], [0, 3]):
            rs, vs, want = [regs[i] for i in order], [ws[i] for i in order], ref[order]
            assert torch.equal(sparse_terms(rs, vs).view(torch.int16 if dtype == torch.bfloat16 else want.dtype),
                               want.view(torch.int16 if dtype == torch.bfloat16 else want.dtype))
            counts = torch.stack([torch.count_nonzero(w).to(torch.int32) for w in vs])
            assert torch.equal(sparse_terms(rs, vs, counts), want)
        # all rows priced alike (the optimizer's common case: one column each)
        same = [regs[0]] * 3
        assert torch.equal(sparse_terms(same, ws[:3]), torch.stack([_terms_one_by_one(regs[0], w) for w in ws[:3]]))
        assert all(torch.equal(r.terms(w), t) for r, w, t in zip(regs, ws, ref))
    mixed = [torch.randn(5, generator=g), torch.randn(3, generator=g).double()]
    assert torch.equal(sparse_terms(regs[:2], mixed), torch.stack([_terms_one_by_one(r, w).double()
                                                                  for r, w in zip(regs[:2], mixed)]))
    # broken: a count that misses negative weights is detected
    bad = torch.stack([reg.l0_weight(w) * (w > 0).sum().to(w.dtype) for reg, w in zip(regs[:1], ws[:1])])
    assert not torch.equal(bad, sparse_terms(regs[:1], ws[:1])[:, 0])


def test_sparse_terms_names_bad_input():
    import pytest

    from proxnets.pmp.regularizers import sparse_terms

    with pytest.raises(ValueError, match="regs: expected one regularizer per tensor"):
        sparse_terms([SparseRegularizer()], [torch.ones(2), torch.ones(3)])
    with pytest.raises(TypeError, match="ws: expected real floating-point tensors"):
        sparse_terms([SparseRegularizer()], [torch.ones(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="counts: expected one nonzero count per tensor"):
        sparse_terms([SparseRegularizer()], [torch.ones(2)], torch.ones(2, dtype=torch.int32))


def test_order_pair_keeps_signed_zeros_and_values_bit_for_bit():
    from proxnets.pmp.optimizer import order_pair

    # one sign of zero per tensor (a -0.0 and a +0.0 are equal: which one a maximum returns is not a property)
    for s in (torch.tensor([0.0, 0.5, -1.0, 0.25, 0.0, 2.0, -3.0]), torch.tensor([-0.0, 0.5, -1.0, 0.25, -0.0, 2.0])):
        _check_signs(order_pair, s)


def _check_signs(order_pair, s):
    for k in range(1, len(s)):
        lo = torch.kthvalue(s, len(s) - k).values
        above = s[s > lo]
        ref = (float(lo), float(above.min()) if above.numel() else math.inf)
        for guess in (-0.5, 0.1, 0.3, -2.0, 1.0, 0.0):
            got = order_pair(s, k, guess)
            assert [math.copysign(1.0, v) for v in got] == [math.copysign(1.0, v) for v in ref] and got == ref, (k, guess)
