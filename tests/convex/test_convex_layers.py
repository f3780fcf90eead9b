"""Layer-wise training (CCNN's Algorithm 2) for DCCNN through the loop CCNN uses."""

import numpy as np
import pytest
import torch

from proxnets.convex import CCNN, DCCNN, certificate, to_torch
from proxnets.data import load_dataset

# 8x8 digits, 3x3 patches, no pooling: layer 1 sees a 6x6 grid, layer 2 a 4x4 grid of layer-1 filter maps
SMALL = dict(patch_size=3, n_features=16, pool_size=1, lam=1e-2, max_iter=25, tol=1e-2, on_nonconvergence="ignore")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", n_train=200, n_test=150)


@pytest.fixture(scope="module")
def two_layers(digits):
    return DCCNN(**SMALL, n_layers=2, n_filters=4).fit(digits.x_train, digits.y_train)


def test_two_layer_dccnn_fits_and_beats_chance(two_layers, digits):
    est = two_layers
    assert len(est.featurizers_) == len(est.traces_) == len(est.duals_) == len(est.recoveries_) == 2
    # layer 2 is trained on layer 1's recovered filter maps: its input has n_filters channels on layer 1's grid
    assert est.featurizers_[0].filters.shape[1] == 4
    assert est.featurizers_[1].input_shape == (4, 6, 6)
    assert est.recoveries_[0].filters is est.featurizers_[0].filters
    assert est.trace_ is est.traces_[-1] and est.dual_ is est.duals_[-1]
    assert est.score(digits.x_test, digits.y_test) > 0.5  # 10 classes: chance 0.1


def test_two_layer_dccnn_exports_the_same_cnn(two_layers, digits):
    net = to_torch(two_layers)
    with torch.no_grad():
        out = net(digits.x_test).double().numpy()
    ref = two_layers.class_scores(digits.x_test)
    assert np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_two_layer_certificate_is_the_top_layers_gap(two_layers, digits):
    certs = {c.name: c for c in certificate(two_layers)}
    top = two_layers.traces_[-1]
    gap = certs["relative_duality_gap"]
    assert gap.details["primal"] == top.primal[-1] and gap.details["dual"] == top.dual[-1]
    # every layer's own trace obeys weak duality (each layer is a convex problem solved to a certified gap)
    for tr in two_layers.traces_:
        assert min(tr.primal) >= max(tr.dual)
    # the recomputed gap is a one-layer property: a clear error, not a wrong number
    with pytest.raises(ValueError, match="model: expected a one-layer model"):
        certificate(two_layers, digits.x_train, digits.y_train)


def test_lower_layers_default_to_16_filters(digits):
    est = DCCNN(**{**SMALL, "max_iter": 8}, n_layers=2).fit(digits.x_train[:100], digits.y_train[:100])
    assert est.featurizers_[0].filters.shape[1] == 16 and est.featurizers_[1].input_shape[0] == 16


@pytest.mark.parametrize("cls", [CCNN, DCCNN])
@pytest.mark.parametrize("bad, err, msg", [(0, ValueError, "n_layers: expected an integer >= 1, got 0"),
                                            (1.5, TypeError, "n_layers: expected an integer, got 1.5")])
def test_bad_n_layers(cls, bad, err, msg, digits):
    with pytest.raises(err, match=msg):
        cls(**SMALL, n_layers=bad).fit(digits.x_train[:50], digits.y_train[:50])


def test_exact_mode_is_one_layer_only(digits):
    est = DCCNN(loss="hinge", feature_map="exact", patch_size=3, n_layers=2)
    with pytest.raises(ValueError, match="n_layers: expected 1 with feature_map='exact', got 2"):
        est.fit(digits.x_train[:50], digits.y_train[:50])
