"""The bSQH certificate recomputes J itself: a corrupted step or acceptance test makes it fail."""


import pytest
from pmp_closures import full_batch_steps
import torch
import torch.nn.functional as F
from torch import nn

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, fit
from proxnets.pmp import BSQH, DecreaseAudit, LinearizedHamiltonianRule, certificate, sparsity_param_groups
from proxnets.pmp.training import MODELS


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits", seed=0)
    return ds.x_train[:300], ds.y_train[:300]


class AlwaysAccept(BSQH):
    """The broken variant: no acceptance test."""

    def sufficient_decrease(self, j_new, j_k, tau):
        return True


class AscentRule(LinearizedHamiltonianRule):
    """The broken variant: the Hamiltonian step with the wrong sign (an ascent step on the loss)."""

    def __call__(self, w_k, grad, eps, rho, reg):
        return super().__call__(w_k, -grad, eps, rho, reg)


class ForgedRecords(BSQH):
    """Intact steps, but the recorded J_after is not the true one."""

    def _step(self, closure):
        out = super()._step(closure)
        self.history[-1]["J_after"] -= 0.5
        return out


def run_full_batch(opt_cls, x, y, iterations=15, rho=1e-3, eps=0.02, **kw):
    model = tiny_cnn()
    opt = opt_cls(sparsity_param_groups(model, rho), eps=eps, eta=1e-2, eps_min=1e-6,
                  audit=DecreaseAudit(full_batch=True), **kw)

    full_batch_steps(model, opt, x, y, iterations)
    return model, opt, {c.name: c for c in certificate(model, x, optimizer=opt)}


def test_intact_full_batch_run_holds_with_rejections(digits):
    model, opt, certs = run_full_batch(BSQH, *digits)
    assert opt.info().rejected > 0  # the acceptance test is exercised (eps0 is too small on purpose)
    dec = certs["sufficient_decrease"]
    assert dec.holds and dec.rigorous and dec.details["steps_that_moved"] >= 5
    assert certs["records_agree"].holds and certs["exact_zeros"].holds
    # the recomputation is independent of the optimizer's numbers, yet agrees with them
    assert certs["records_agree"].value <= 1e-6


def test_without_acceptance_test_the_certificate_fails(digits):
    _, opt, certs = run_full_batch(AlwaysAccept, *digits)
    assert opt.info().rejected == 0
    assert not certs["sufficient_decrease"].holds
    # the optimizer's own records agree with the recomputation: only the decrease is violated
    assert certs["records_agree"].holds


def test_ascent_step_that_is_always_accepted_fails(digits):
    _, _, certs = run_full_batch(AlwaysAccept, *digits, eps=1.0, rule=AscentRule())
    assert not certs["sufficient_decrease"].holds and certs["sufficient_decrease"].value > 0


def test_ascent_step_with_the_acceptance_test_is_rejected_and_the_certificate_holds(digits):
    _, opt, certs = run_full_batch(BSQH, *digits, iterations=4, eps=1.0, rule=AscentRule())
    # an ascent trial passes only when its L0 saving outweighs the loss increase: J still decreases
    assert opt.info().rejected > 10 * opt.info().accepted
    assert certs["sufficient_decrease"].holds


def test_forged_records_disagree(digits):
    _, _, certs = run_full_batch(ForgedRecords, *digits, iterations=5)
    assert certs["sufficient_decrease"].holds  # the steps themselves are intact
    assert not certs["records_agree"].holds


def test_without_audit_the_recorded_decrease_is_not_rigorous(digits):
    x, y = digits
    model = tiny_cnn()
    opt = BSQH(sparsity_param_groups(model, 1e-3), eps=1.0)
    opt.step(lambda backward=True: _loss(model, opt, x, y, backward))
    names = {c.name: c for c in certificate(model, x, optimizer=opt)}
    assert "sufficient_decrease" not in names
    assert not names["recorded_decrease"].rigorous and "cannot disagree" in names["recorded_decrease"].why


def _loss(model, opt, x, y, backward):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if backward:
        loss.backward()
    return loss.detach()


@pytest.mark.parametrize("name", ["smallcnn-bsqh", "lenet5-bsqh"])
def test_named_model_certifies_its_mini_batch_run(name):
    ds = load_dataset("mnist5k", seed=0).subset(192, 64, seed=0)
    t = MODELS[name](ds.input_shape, ds.num_classes, rho=1e-3)
    before = {c.name: c for c in t.certificate(t.model, ds.x_test[:4])}
    assert set(before) == {"exact_zeros"} and not before["exact_zeros"].rigorous
    fit(t.model, ds, TrainConfig(epochs=1, batch_size=64, progress=False), optimizer=t.optimizer(None),
        log=lambda s: None)
    certs = {c.name: c for c in t.certificate(t.model, ds.x_test[:4])}
    assert certs["sufficient_decrease"].holds and certs["sufficient_decrease"].details["steps"] == 3
    assert certs["records_agree"].holds and certs["exact_zeros"].holds and certs["exact_zeros"].rigorous
    # another model gets no certificate from this run
    other = MODELS[name](ds.input_shape, ds.num_classes)
    assert {c.name for c in t.certificate(other.model, ds.x_test[:4])} == {"exact_zeros"}
