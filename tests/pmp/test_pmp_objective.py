"""The well-posed objective: normalized L0 + L2 on a box, kappa, augmented gain, target density."""

import math

import pytest
from pmp_closures import full_batch_steps
import torch
from torch import nn

from proxnets.data import load_dataset
from proxnets.pmp import BSQH, DecreaseAudit, LeNet5, SparseRegularizer, certificate, penalty, sparsity_param_groups
from proxnets.pmp.optimizer import DEFAULT_REGULARIZER


@pytest.fixture(scope="module")
def mnist300():
    ds = load_dataset("mnist5k", seed=0).subset(300, 10, seed=0)
    return ds.x_train, ds.y_train


_full_batch = full_batch_steps


def test_without_the_eps_floor_the_default_objective_does_not_collapse_but_the_plain_count_does(mnist300):
    x, y = mnist300
    runs = {}
    # no step cap (eps_min 1e-6), the curvature rule: J's minimizer decides where bSQH goes
    for name, rho, reg in (("default", 1.0, None), ("plain L0 count", 1e-3, SparseRegularizer())):
        torch.manual_seed(0)
        model = LeNet5()
        opt = BSQH(sparsity_param_groups(model, rho), eps=1.0, eps_min=1e-6, eta=1e-3, eps_rule="curvature",
                   regularizer=reg, audit=DecreaseAudit(full_batch=True))
        _full_batch(model, opt, x, y, 25)
        certs = {c.name: c for c in certificate(model, optimizer=opt)}
        assert certs["sufficient_decrease"].holds  # both decrease their own J correctly
        runs[name] = (1.0 - opt.sparsity()["fraction"], opt.history[-1]["loss_after"])
    density, ce = runs["default"]
    assert density > 0.3 and ce < 0.8 * math.log(10), runs  # a classifier, not the zero network
    density, ce = runs["plain L0 count"]
    assert density < 0.02 and ce > 0.95 * math.log(10), runs  # the L0 price drove it to (almost) zero


def test_normalized_l0_value_prox_and_audit_penalty_agree():
    w = torch.tensor([0.0, 0.5, -0.2, 0.0])
    layer = SparseRegularizer(normalize="layer")
    assert float(layer.value(w)) == pytest.approx(2 / 4)
    group = SparseRegularizer(normalize="group", count=10, lam2=2.0)
    assert float(group.value(w)) == pytest.approx(2 / 10 + 0.5 * 2.0 * (0.25 + 0.04))
    with pytest.raises(ValueError, match="count: expected"):
        SparseRegularizer(normalize="group").value(w)
    with pytest.raises(ValueError, match="normalize: expected"):
        SparseRegularizer(normalize="global")
    # the optimizer fills in its group's weight count; the audit's own count uses it
    p = nn.Parameter(torch.tensor([1.0, 0.0, 0.5]))
    opt = BSQH([p], rho=0.3)
    reg = opt.param_groups[0]["regularizer"]
    assert reg.count == 3 and reg.normalize == DEFAULT_REGULARIZER.normalize == "group"
    assert penalty(opt)[0] == pytest.approx(opt.regularization(), rel=1e-6)


@pytest.mark.parametrize("lam1,lam2", [(0.0, 0.0), (0.3, 1.0)])
def test_box_prox_is_the_constrained_1d_maximizer(lam1, lam2):
    gen = torch.Generator().manual_seed(3)
    bound = 0.4
    reg = SparseRegularizer(beta=0.5, lam1=lam1, lam2=lam2, bound=bound)
    z = torch.randn(200, generator=gen, dtype=torch.float64)
    t = 0.2
    w = reg.prox(z, t)
    assert float(w.abs().max()) <= bound
    grid = torch.cat([torch.linspace(-bound, bound, 40001, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    for i in range(len(z)):
        f = 0.5 * (grid - z[i]) ** 2 + t * (reg.beta * (grid != 0) + lam1 * grid.abs() + 0.5 * lam2 * grid**2)
        wi = w[i:i + 1]
        fw = 0.5 * (wi - z[i]) ** 2 + t * (reg.beta * (wi != 0) + lam1 * wi.abs() + 0.5 * lam2 * wi**2)
        assert float(fw) <= float(f.min()) + 1e-7


def test_default_kappa_marks_convergence_and_keeps_u_k():
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = BSQH([p], rho=0.0)
    assert opt.kappa > 0

    def closure(backward=True):  # gradient 1e-6: the step has tau ~ 1e-13 < kappa
        opt.zero_grad(set_to_none=True)
        loss = 1e-6 * p.sum()
        if backward:
            loss.backward()
        return loss.detach()

    opt.step(closure)
    assert opt.info().converged and torch.equal(p.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))


def test_augmented_gain_uses_the_eps_the_rule_used():
    # quadratic loss: the closed-form step with eps/lr, gain G = -<g, d>; augmentation (eps/lr) tau
    p = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = BSQH([dict(params=[p], lr=0.5)], rho=0.0, eps=2.0, eta=1e-6)

    def closure(backward=True):
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * (p * p).sum()
        if backward:
            loss.backward()
        return loss.detach()

    opt.step(closure)
    rec = opt.history[-1]
    eps_used = 2.0 / 0.5
    d = -torch.tensor([1.0, 2.0]) / (2 * eps_used)
    gain = float((torch.tensor([1.0, 2.0]) * -d).sum())
    assert rec["augmented_gain"] == pytest.approx(gain - eps_used * float((d * d).sum()), rel=1e-9)


def test_target_density_sets_rho_so_that_exactly_that_density_is_kept(mnist300):
    x, y = mnist300
    torch.manual_seed(0)
    model = LeNet5()
    opt = BSQH(sparsity_param_groups(model, 1.0), eps=2.0, eps_min=1.0, eta=1e-4, eps_rule="curvature",
               target_density=0.2, density_ramp=6, audit=DecreaseAudit(full_batch=True))
    n = opt.sparsity()["regularized"]
    _full_batch(model, opt, x, y, 12)
    targets = []
    for k, rec in enumerate(opt.history):
        if rec["accepted"]:  # every accepted step keeps round(d_k N) weights (ties aside)
            d_k = 0.2 + 0.8 * (1 - k / 6) ** 3 if k < 6 else 0.2
            targets.append(d_k)
            assert abs((n - rec["zeros"]) - round(d_k * n)) <= 2, (k, n - rec["zeros"], d_k * n)
    assert targets and targets[-1] == 0.2
    assert opt.param_groups[0]["rho"] > 0.0 and opt.param_groups[1]["rho"] == 0.0  # biases stay unregularized
    certs = {c.name: c for c in certificate(model, optimizer=opt)}
    # each step is checked under its own rho, recomputed by the audit
    assert certs["sufficient_decrease"].holds and certs["records_agree"].holds
    with pytest.raises(ValueError, match="regularizer: expected a SparseRegularizer with lam1 = 0"):
        BSQH(sparsity_param_groups(model, 1.0), target_density=0.2, regularizer=SparseRegularizer(lam1=0.1))
