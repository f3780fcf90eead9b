"""The seed's layer (map + activation/pooling): taped layers, the safeguard's guarantee, the optimizer."""


import pytest
from pmp_closures import full_batch_steps
import torch
import torch.nn.functional as F
from torch import nn

from proxnets.data import load_dataset
from proxnets.pmp import BSQH, DecreaseAudit, SparseRegularizer, certificate, sparsity_param_groups
from proxnets.pmp.layer_hamiltonian import LayerParam, LayerTape, augmented_layer_hamiltonian, maximize_layer


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits", seed=0)
    return ds.x_train[:200].double(), ds.y_train[:200]


def _tape(model, x, y):
    tape = LayerTape(model)
    tape.enabled = True
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    tape.enabled = False
    return tape


def test_tape_groups_map_with_its_activation_and_pooling(digits):
    x, y = digits
    model = tiny_cnn()
    layers = _tape(model, x, y).layers()
    assert [type(c.module).__name__ for c in layers] == ["Conv2d", "Linear", "Linear"]
    assert [[type(m).__name__ for m in c.post] for c in layers] == [["ReLU", "MaxPool2d", "Flatten"], ["Tanh"], []]
    # p_{l+1} is minus the gradient of the loss with respect to the layer's output after activation/pool
    state = model[:4](x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model[4:](state), y), state)
    assert torch.allclose(layers[0].p, -grad, atol=1e-12)
    assert torch.equal(layers[1].x, state.detach())


def _instances(model, x, y, eps, rho):
    """Every taped layer with random u_k perturbations: (call, params) pairs."""
    tape = _tape(model, x, y)
    out = []
    for c in tape.layers():
        params = [LayerParam(n, q.detach().clone(), q.grad.detach().clone(), eps, rho if n == "weight" else 0.0,
                             SparseRegularizer(normalize="layer", lam2=1e-2))
                  for n, q in c.module.named_parameters(recurse=False)]
        out.append((c, params))
    return out


@pytest.mark.parametrize("safeguard", [True, False])
def test_safeguard_guarantees_the_true_augmented_hamiltonian_does_not_decrease(digits, safeguard):
    x, y = digits
    worst = float("inf")
    for seed in range(4):
        model = tiny_cnn(seed)
        for eps in (0.005, 0.05, 0.5):  # small eps: long steps on which the linearization is poor
            for call, params in _instances(model, x, y, eps, rho=0.2):
                if not call.post:
                    continue
                start = augmented_layer_hamiltonian(call, params, [lp.w_k for lp in params])
                values, info = maximize_layer(call, params, steps=3, backtracks=3, safeguard=safeguard)
                end = augmented_layer_hamiltonian(call, params, values)
                worst = min(worst, end - start)
                if safeguard:
                    assert end >= start - 1e-12 * abs(start), (seed, eps, end, start)
                    assert info["H_end"] == pytest.approx(end, rel=1e-9, abs=1e-12)
    if not safeguard:  # without it the linearized steps do decrease the true H in some instance
        assert worst < 0


def test_map_plus_activation_bsqh_decreases_J_and_certifies(digits):
    x, y = digits
    results = {}
    for layer in ("map", "map+activation"):
        model = tiny_cnn()
        opt = BSQH(sparsity_param_groups(model, 0.5), eps=0.05, eta=1e-3, eps_min=1e-6, eps_rule="curvature",
                   layer=layer, model=model, audit=DecreaseAudit(full_batch=True))

        full_batch_steps(model, opt, x, y, 15)
        certs = {c.name: c for c in certificate(model, optimizer=opt)}
        assert certs["sufficient_decrease"].holds and certs["records_agree"].holds
        results[layer] = opt.history
    nl = results["map+activation"]
    stats = [h["layer_hamiltonian"] for h in nl if "layer_hamiltonian" in h]
    assert stats and all(s["H_gain"] >= 0 for s in stats)  # the safeguard's guarantee, summed over layers
    assert sum(s["inner_steps"] for s in stats) > len(stats)  # more than the one linearized step is taken
    assert nl[-1]["J_after"] < nl[0]["J_before"]


def test_map_plus_activation_needs_the_model():
    with pytest.raises(TypeError, match="model: expected"):
        BSQH([nn.Parameter(torch.ones(2))], layer="map+activation")
    with pytest.raises(ValueError, match="layer: expected"):
        BSQH([nn.Parameter(torch.ones(2))], layer="activation")
