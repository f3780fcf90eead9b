"""bSQH: sufficient decrease, zeros, adjoints, eps rules, errors, state."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from proxnets.data import load_dataset
from proxnets.pmp import (
    BSQH,
    AdjointRecorder,
    CurvatureEps,
    EpsExplodedWarning,
    SigmaZetaEps,
    SparseRegularizer,
    export_sparse,
    freeze_sparsity,
    sparsity_param_groups,
)


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # (B, 4, 8, 8)
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 4, 4, 4)
        nn.Flatten(),  # (B, 64)
        nn.Linear(64, 16),  # (B, 16)
        nn.Tanh(),
        nn.Linear(16, 10),  # (B, 10)
    )


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits", seed=0)
    return ds.x_train[:400].double(), ds.y_train[:400]


def full_batch_closure(model, opt, x, y):
    def closure(backward=True):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss

    return closure


def objective(model, x, y, rho):
    """J = CE + rho * (number of nonzero conv/linear weights), evaluated independently."""
    with torch.no_grad():
        nnz = sum(int((m.weight != 0).sum()) for m in model if isinstance(m, (nn.Conv2d, nn.Linear)))
        return float(F.cross_entropy(model(x), y)) + rho * nnz


@pytest.mark.parametrize("eps_rule", ["sigma-zeta", "curvature"])
def test_full_batch_accepted_iterations_decrease_J_by_eta_tau(digits, eps_rule):
    x, y = digits
    model = tiny_cnn().double()
    rho, eta = 1e-4, 1e-3
    opt = BSQH(sparsity_param_groups(model, rho), eps=0.5, eta=eta, eps_rule=eps_rule)
    closure = full_batch_closure(model, opt, x, y)
    n_accepted = 0
    for _ in range(25):
        before = objective(model, x, y, rho)
        w_before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure)
        after = objective(model, x, y, rho)
        tau = sum(float(((p.detach() - w) ** 2).sum()) for p, w in zip(model.parameters(), w_before))
        rec = opt.history[-1]
        assert rec["tau"] == pytest.approx(tau, rel=1e-9, abs=1e-15)
        if rec["accepted"] and tau > 0:
            n_accepted += 1
            assert after - before <= -eta * tau + 1e-12
            assert rec["augmented_gain"] >= -1e-12  # u_k is feasible: the maximizer gains at least 0
        else:
            assert after == before  # a failed iteration leaves the weights unchanged
    assert n_accepted >= 10
    assert opt.history[-1]["J_after"] < opt.history[0]["J_before"]


def test_adjoints_are_minus_loss_gradients_wrt_layer_outputs(digits):
    x, y = digits
    x, y = x[:32], y[:32]
    model = tiny_cnn().double()
    with AdjointRecorder(model) as rec:
        assert rec.layers == ["0", "4", "6"]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        # final adjoint: p_L = -dPhi/dx_L = -(softmax - onehot) / B for the batch-mean cross-entropy
        logits = rec.states["6"]
        expected = -(torch.softmax(logits, 1) - F.one_hot(y, 10).double()) / len(y)
        assert torch.allclose(rec.adjoints["6"], expected, atol=1e-12)
        # every layer: p_{l+1} = -d(loss of the rest of the network)/d x_{l+1}, computed independently
        for i in (0, 4):
            state = rec.states[str(i)].clone().requires_grad_(True)
            rest = F.cross_entropy(model[i + 1:](state), y)
            (grad,) = torch.autograd.grad(rest, state)
            assert torch.allclose(rec.adjoints[str(i)], -grad, atol=1e-12)
        # Hamiltonian (smooth part) is sum_l <p_{l+1}, x_{l+1}>
        h = sum(float((rec.adjoints[k] * rec.states[k]).sum()) for k in rec.layers)
        assert rec.hamiltonian() == pytest.approx(h)


def test_optimizer_reports_hamiltonian_with_recorder(digits):
    x, y = digits
    model = tiny_cnn().double()
    rec = AdjointRecorder(model)
    opt = BSQH(sparsity_param_groups(model, 1e-3), eps=1.0, recorder=rec)
    opt.step(full_batch_closure(model, opt, x, y))
    assert math.isfinite(opt.history[-1]["hamiltonian"])
    rec.remove()


def test_zeros_stay_zero_where_the_rule_says(digits):
    x, y = digits
    model = tiny_cnn().double()
    with torch.no_grad():  # zero half of the weights
        for p in model.parameters():
            p.mul_((torch.rand_like(p) > 0.5).double())
    rho, eps = 1e-3, 0.5
    opt = BSQH(sparsity_param_groups(model, rho), eps=eps, eta=1e-8, eps_rule=SigmaZetaEps(sigma=2.0),
               regularizer=SparseRegularizer())  # the plain L0 count: rho per nonzero weight
    w_k = {n: p.detach().clone() for n, p in model.named_parameters()}
    closure = full_batch_closure(model, opt, x, y)
    closure()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step(closure)
    rec = opt.history[-1]
    assert rec["accepted"] and rec["trials"] >= 1
    eps_used = eps * 2.0 ** (rec["trials"] - 1)
    for name, p in model.named_parameters():
        z = w_k[name] - grads[name] / (2 * eps_used)
        if name.endswith("weight"):  # L0 rule: zero iff |z| <= sqrt(rho / eps)
            must_be_zero = z.abs() <= math.sqrt(rho / eps_used)
        else:  # biases are not regularized: a plain gradient step
            must_be_zero = z == 0
        assert torch.all(p[must_be_zero] == 0)
        assert torch.all(p[~must_be_zero] != 0)
        assert torch.allclose(p[~must_be_zero], z[~must_be_zero])
        # a zero weight whose gradient is below the threshold stays exactly zero
        stay = (w_k[name] == 0) & must_be_zero
        assert torch.all(p[stay] == 0)


def test_sparsity_increases_with_rho(digits):
    x, y = digits
    fractions = []
    for rho in [0.0, 3e-4, 3e-3, 3e-2]:
        model = tiny_cnn().double()
        opt = BSQH(sparsity_param_groups(model, rho), eps=0.5, eta=1e-4, eps_rule="curvature")
        closure = full_batch_closure(model, opt, x, y)
        for _ in range(15):
            opt.step(closure)
        fractions.append(opt.sparsity()["fraction"])
    assert fractions[0] == 0.0
    assert all(b > a for a, b in zip(fractions, fractions[1:])), fractions


def test_curvature_rule_recovers_from_a_bad_eps_in_one_trial():
    # L(u) = (k/2)|u|^2: the curvature along any step is k, so f* is exact
    k = 10.0

    def run(rule):
        u = nn.Parameter(torch.ones(5, dtype=torch.float64))
        opt = BSQH([u], eps=0.1, eta=1e-4, eps_rule=rule)  # 37x too small

        def closure(backward=True):
            opt.zero_grad()
            loss = 0.5 * k * (u * u).sum()
            if backward:
                loss.backward()
            return loss

        opt.step(closure)
        return opt.history[-1], opt

    rec_c, opt_c = run(CurvatureEps(safety=1.5))
    rec_p, _ = run(SigmaZetaEps())
    assert rec_c["accepted"] and rec_c["trials"] == 2
    assert rec_c["curvature"] == pytest.approx(k)
    assert rec_p["accepted"] and rec_p["trials"] > 20


def test_eps_explosion_stops_with_a_message():
    u = nn.Parameter(torch.ones(3))
    opt = BSQH([u], eps=1.0, eps_max=100.0, sigma=2.0)

    def closure(backward=True):  # every trial point looks worse than u_k
        opt.zero_grad()
        loss = (u * u).sum() * (1.0 if backward else 0.0) + (0.0 if backward else 10.0)
        if backward:
            loss.backward()
        return loss

    with pytest.warns(EpsExplodedWarning, match="eps rose to"):
        opt.step(closure)
    info = opt.info()
    assert info.stopped and "eps_max" in info.message
    assert torch.equal(u.detach(), torch.ones(3))
    opt.step(closure)  # a stopped run no longer changes the weights
    assert torch.equal(u.detach(), torch.ones(3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(eps=0.0), "eps: expected"),
        (dict(eps=-1.0), "eps: expected"),
        (dict(sigma=1.0), "sigma: expected"),
        (dict(zeta=1.0), "zeta: expected"),
        (dict(zeta=0.0), "zeta: expected"),
        (dict(rho=-1e-3), "rho: expected"),
        (dict(eta=0.0), "eta: expected"),
        (dict(eps_rule="magic"), "eps_rule: expected one of"),
        (dict(max_trials=0), "max_trials: expected"),
    ],
)
def test_invalid_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BSQH([nn.Parameter(torch.ones(2))], **kwargs)


def test_unsupported_parameters_and_closures():
    with pytest.raises(TypeError, match="params: expected real floating-point"):
        BSQH([nn.Parameter(torch.ones(2, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="rho: expected"):
        BSQH([dict(params=[nn.Parameter(torch.ones(2))], rho=-1.0)])
    opt = BSQH([nn.Parameter(torch.ones(2))])
    with pytest.raises(TypeError, match="closure: expected"):
        opt.step()
    with pytest.raises(TypeError, match="closure: expected"):
        opt.step(lambda: torch.tensor(0.0))
    with pytest.raises(TypeError, match="regularizer: expected"):
        BSQH([nn.Parameter(torch.ones(2))], regularizer="L0")


def test_state_dict_round_trip(digits):
    x, y = digits

    def make():
        model = tiny_cnn().double()
        opt = BSQH(sparsity_param_groups(model, 1e-3), eps=0.5, eps_rule="curvature",
                   regularizer=SparseRegularizer(lam2=1e-2))
        return model, opt

    model, opt = make()
    closure = full_batch_closure(model, opt, x, y)
    for _ in range(3):
        opt.step(closure)
    sd = opt.state_dict()
    assert sd["bsqh"]["iteration"] == 3
    model2, opt2 = make()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    assert opt2.run_state == opt.run_state
    assert opt2.param_groups[0]["regularizer"] == SparseRegularizer(lam2=1e-2)
    opt.step(closure)
    opt2.step(full_batch_closure(model2, opt2, x, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_frozen_masks_keep_zeros_under_adam(digits):
    x, y = digits
    model = tiny_cnn().double()
    opt = BSQH(sparsity_param_groups(model, 3e-3), eps=0.5, eps_rule="curvature")
    closure = full_batch_closure(model, opt, x, y)
    for _ in range(5):
        opt.step(closure)
    zero = {i: (m.weight == 0).clone() for i, m in enumerate(model) if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert sum(int(z.sum()) for z in zero.values()) > 0
    freeze_sparsity(model)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        adam.zero_grad()
        F.cross_entropy(model(x), y).backward()
        adam.step()
    for i, z in zero.items():
        assert torch.all(model[i].weight[z] == 0)
    state = export_sparse(model)  # masks made permanent: a plain state dict with the same zeros
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    for i, z in zero.items():
        assert torch.all(state[f"{i}.weight"][z] == 0)
