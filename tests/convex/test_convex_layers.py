"""Layer-wise training (CCNN's Algorithm 2) for DCCNN through the loop CCNN uses."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from proxnets.convex import CCNN, DCCNN, certificate, to_torch
from proxnets.convex.kernels import kernel as named_kernel
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


# ---------------------------------------------------------------- exact-kernel mode, two layers
# digits 3 vs 8, 3x3 patches, 2x2 pooling with stride 1 (overlapping windows): layer 1 pools a 6x6 patch
# grid to 5x5 maps, layer 2 reads 3x3 patches of them (3x3 grid, pooled to 2x2)
EXACT2 = dict(loss="hinge", feature_map="exact", patch_size=3, pool_size=2, pool_stride=1, C=1.0, max_iter=6, tol=1e-3,
              on_nonconvergence="ignore", n_layers=2)


@pytest.fixture(scope="module")
def pair38(digits):
    tr, te = np.isin(digits.y_train, (3, 8)), np.isin(digits.y_test, (3, 8))
    return digits.x_train[tr][:40], digits.y_train[tr][:40], digits.x_test[te], digits.y_test[te]


@pytest.fixture(scope="module")
def exact2(pair38):
    x, y, _, _ = pair38
    return DCCNN(**EXACT2).fit(x, y)


def _dense_maps(layer, images: torch.Tensor) -> torch.Tensor:
    """Layer-1 maps from their definition, patch by patch: the response of filter l to patch z is
    sum_j b_j sum_a k(z, x_ja) (S phi_l)[a] / s (dense kernel values against every support patch),
    then average pooling of the response map with avg_pool2d: (N, R, P)."""
    kern = layer.kernel
    k = named_kernel(kern.kernel_name, kern.gamma)
    feat = kern.featurizer
    out = []
    for b in layer.binary:
        sup = torch.nonzero(b.weights != 0).flatten()
        xs = kern._patches_of(kern.train_images[sup])  # (s, J, d)
        back = kern.pool @ b.phi  # (J, r): phi_l on the patch grid
        coef = (b.weights[sup, None, None] * back[None]).reshape(-1, back.shape[1])  # (s J, r)
        z = kern._patches_of(images)  # (N, J, d)
        resp = k(z.reshape(-1, z.shape[-1]), xs.reshape(-1, xs.shape[-1])) @ coef / kern.scale  # (N J, r)
        resp = resp.reshape(images.shape[0], *feat.grid, -1).permute(0, 3, 1, 2)
        out.append(F.avg_pool2d(resp, feat.pool_size, stride=feat.pool_stride).flatten(2))
    return torch.cat(out, 1)


def test_exact_layer_maps_equal_the_dense_kernel_expansion(exact2, pair38):
    layer = exact2.layers_[0]
    x = torch.as_tensor(pair38[2][:6], dtype=torch.float32)
    maps = layer.maps(x)
    assert maps.shape == (6, sum(b.phi.shape[1] for b in layer.binary), 25) and maps.abs().max() > 0
    dense = _dense_maps(layer, x)
    assert torch.allclose(maps, dense, rtol=1e-9, atol=1e-12 * float(dense.abs().max()))
    # layer 2's training input is those maps for the chosen channels, on the 5x5 pooled grid
    nxt = layer.next_input(x)
    assert nxt.shape == (6, layer.filters.numel(), 5, 5)
    assert torch.equal(nxt.flatten(2), maps[:, layer.filters])
    assert exact2.layers_[1].kernel.featurizer.input_shape == (layer.filters.numel(), 5, 5)
    # lower layers keep the n_filters (default 16) filters of largest scale
    assert layer.filters.numel() == min(16, layer.scales.numel())


def test_exact_two_layers_predict_and_score(exact2, pair38):
    _, _, xt, yt = pair38
    assert set(np.unique(exact2.predict(xt))) <= {3, 8}
    assert exact2.score(xt, yt) > 0.8  # two classes: chance 0.5
    # the top layer predicts: scores are its kernel expansion on layer 1's maps
    top = exact2.layers_[1].scores(exact2.layers_[0].next_input(torch.as_tensor(xt[:5], dtype=torch.float32)))
    assert np.allclose(exact2.decision_function(xt[:5]), top[:, 0].numpy(), rtol=1e-12, atol=0)


def test_exact_two_layers_weak_duality_and_top_certificate(exact2):
    assert len(exact2.layer_traces_) == 2 and exact2.traces_ is exact2.layer_traces_[-1]
    for traces in exact2.layer_traces_:  # each layer is one convex problem per class: weak duality in each
        for tr in traces:
            assert all(p >= d for p, d in zip(tr.primal, tr.dual)) and min(tr.primal) >= max(tr.dual)
    certs = {c.name: c for c in certificate(exact2)}
    top = exact2.layer_traces_[-1][0]
    assert certs["relative_duality_gap[0]"].details["primal"] == top.primal[-1]
    assert certs["relative_duality_gap[0]"].details["dual"] == top.dual[-1]
    assert certs["weak_duality"].holds


def test_exact_two_layers_bad_input(exact2, pair38):
    with pytest.raises(ValueError, match="estimator: expected a model with a Conv2d form"):
        to_torch(exact2)
    with pytest.raises(ValueError, match=r"X: expected images of shape \(N, 1, 8, 8\)"):
        exact2.predict(np.zeros((2, 1, 7, 7), dtype=np.float32))
    x, y = pair38[0], pair38[1]
    with pytest.raises(ValueError, match="n_filters: expected an integer >= 1, got 0"):
        DCCNN(**EXACT2, n_filters=0).fit(x, y)
    # layer 1's maps are 2x2: layer 2 has no 3x3 patch of them
    with pytest.raises(ValueError, match=r"patch_size: expected a window no larger than the \(padded\) image 2x2"):
        DCCNN(**{**EXACT2, "pool_size": 3, "pool_stride": 3}).fit(x, y)
