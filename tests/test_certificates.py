"""The certificate protocol: the record type, and one certificate for every named model."""

import math

import pytest
import torch

from proxnets.certificates import Certificate, all_hold, compare
from proxnets.models import build_model, model_registry


def test_compare_rules():
    assert compare(0.5, "<=", 1.0) and not compare(1.5, "<=", 1.0) and compare(2, ">", 1)
    assert not compare(float("nan"), "<=", 1.0) and not compare(float("inf"), ">=", 0.0)
    assert not compare("text", "<=", 1.0)
    assert compare(True, "==", True) and not compare(False, "==", True)
    with pytest.raises(ValueError, match="op: expected one of"):
        compare(1.0, "~", 1.0)
    with pytest.raises(ValueError, match="boolean"):
        compare(True, "<=", 1.0)


def test_certificate_verdict_and_trust():
    c = Certificate("lipschitz", 1.02, 1.0, rigorous=True, method="exact SVD")
    assert not c.holds and "DOES NOT HOLD" in c.line()
    ok = Certificate("residual", 1e-6, 1e-4, rigorous=False, why="inner CG did not converge", method="fixed point")
    assert ok.holds and "not rigorous: inner CG" in ok.line()
    assert not all_hold([ok]) and all_hold([ok], rigorous=False) and not all_hold([])
    assert not Certificate("x", math.nan, 1.0).holds
    with pytest.raises(ValueError, match="why"):
        Certificate("x", 1.0, 1.0, rigorous=False)
    with pytest.raises(TypeError):
        Certificate("x", 1.0, 1.0, holds=True)


# the stable classifiers get a small input: their rigorous norms certify every convolution at its size
SHAPES = {"capsnet": (1, 28, 28), "capsnet-small": (1, 28, 28), "lenet5-bsqh": (1, 28, 28),
          "nonexpansive-classifier": (1, 8, 8), "resnet-classifier": (1, 8, 8)}


@pytest.mark.parametrize("name", sorted(model_registry()))
def test_every_named_model_reports_a_certificate(name):
    shape = SHAPES.get(name, (1, 16, 16))
    trainable = build_model(name, shape, 10)
    assert trainable.certificate is not None, f"{name} has no certificate"
    trainable.model.eval()
    certs = trainable.certificate(trainable.model, torch.rand(4, *shape))
    assert certs and all(isinstance(c, Certificate) for c in certs), certs
    for c in certs:
        assert c.name and (c.rigorous or c.why)
