"""bSQH trains a sparse CNN on real MNIST images (mnist5k) through the shared engine."""

import pytest
import torch

from proxnets.data import load_dataset
from proxnets.pmp import LeNet5, sparsity_report
from proxnets.pmp.training import MODELS, train_bsqh


def _train(n_train, epochs, target_density, finetune_epochs=0):
    ds = load_dataset("mnist5k", seed=0).subset(n_train, 1000, seed=0)
    torch.manual_seed(0)
    r = train_bsqh(LeNet5(), ds, 1.0, epochs=epochs, schedule="cosine", finetune_epochs=finetune_epochs,
                   target_density=target_density)
    return ds, r


def test_small_cnn_reaches_accuracy_with_70_percent_zeros():
    ds, r = _train(2000, 8, 0.2)
    assert 1.0 - r["density"] >= 0.70
    assert r["test_acc"] >= 0.80
    info = r["optimizer"].info()
    assert not info.stopped and info.acceptance_ratio > 0.5
    # the diagnostics of every iteration
    rec = r["optimizer"].history[-1]
    for key in ("J_before", "J_after", "accepted", "eps", "tau", "sparsity", "zeros", "hamiltonian_gain"):
        assert key in rec
    # the report counts the remaining weights and multiply-adds exactly
    rep = sparsity_report(r["model"], ds.input_shape)
    nnz = sum(int((m.weight != 0).sum()) for m in r["model"].modules() if hasattr(m, "weight"))
    assert rep["total"]["nonzero"] == nnz
    conv1 = rep["layers"][0]
    assert conv1["macs_sparse"] == conv1["nonzero"] * 28 * 28


@pytest.mark.slow
def test_lenet5_full_mnist5k_accuracy_with_70_percent_zeros():
    _, r = _train(4000, 15, 0.2, finetune_epochs=2)
    assert 1.0 - r["density"] >= 0.70
    assert r["test_acc"] >= 0.90


def test_models_registry_builds_a_trainable():
    t = MODELS["smallcnn-bsqh"]((1, 28, 28), 10, rho=0.5)
    opt = t.optimizer(t.model.parameters())
    assert opt.param_groups[0]["rho"] == 0.5 and opt.param_groups[1]["rho"] == 0.0
    assert t.model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
