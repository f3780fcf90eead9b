"""The scikit-learn contract, input errors, recovery and the exported torch CNN."""


import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.utils.estimator_checks import check_estimator

from proxnets.convex import CCNN, DCCNN, to_torch
from proxnets.data import load_dataset
from proxnets.utils.convergence import NonConvergenceWarning

TABULAR = dict(patch_size=1, contrast_eps=None, zca_eps=None, pool_size=1, n_features=16, gamma=0.5, lam=1e-3,
               max_iter=100, on_nonconvergence="ignore")
IMAGES = dict(patch_size=3, n_features=32, pool_size=2, lam=1e-2, max_iter=60, tol=1e-2, on_nonconvergence="ignore")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", n_train=300, n_test=200)


@pytest.mark.parametrize("cls", [CCNN, DCCNN])
def test_sklearn_estimator_checks(cls):
    failed = [r for r in check_estimator(cls(**TABULAR), on_fail=None) if r["status"] == "failed"]
    assert not failed, [(r["check_name"], str(r["exception"])[:200]) for r in failed]


@pytest.mark.parametrize("cls", [CCNN, DCCNN])
def test_fit_predict_score_on_images(cls, digits):
    est = cls(**IMAGES).fit(digits.x_train, digits.y_train)  # torch tensors in
    proba = est.predict_proba(digits.x_test.numpy())  # numpy in
    assert np.allclose(proba.sum(1), 1)
    assert (est.predict(digits.x_test) == est.classes_[proba.argmax(1)]).all()
    assert est.score(digits.x_test, digits.y_test) > 0.8
    assert est.get_params()["lam"] == 1e-2 and est.n_iter_ == est.trace_.iterations


def test_cross_val_score_and_grid_search(digits):
    x, y = digits.x_train[:150].numpy(), digits.y_train[:150].numpy()
    scores = cross_val_score(CCNN(**{**IMAGES, "max_iter": 20}), x, y, cv=2)
    assert scores.shape == (2,) and (scores > 0.5).all()
    gs = GridSearchCV(DCCNN(**{**IMAGES, "max_iter": 15}), {"lam": [1e-2, 1e-1]}, cv=2).fit(x, y)
    assert gs.best_params_["lam"] in (1e-2, 1e-1)


@pytest.mark.parametrize("opts", [dict(), dict(feature_map="nystrom"), dict(kernel="inverse_poly", feature_map="nystrom"),
                                  dict(kernel="linear", feature_map="linear"), dict(padding=1, stride=2, pool_size=1),
                                  dict(n_layers=2, n_filters=4, pool_size=1)])
def test_exported_cnn_equals_estimator(opts, digits):
    cls = DCCNN if "n_layers" not in opts and "padding" not in opts else CCNN
    est = cls(**{**IMAGES, "max_iter": 15, **opts}).fit(digits.x_train, digits.y_train)
    net = to_torch(est)
    assert isinstance(net.layers[0].whiten, torch.nn.Conv2d) and isinstance(net.layers[-1].filters, torch.nn.Conv2d)
    with torch.no_grad():
        out = net(digits.x_test).double().numpy()
    ref = est.class_scores(digits.x_test)
    assert np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    # it is an ordinary module: gradients flow to the filters and the head
    net(digits.x_test[:4]).sum().backward()
    assert net.layers[-1].filters.weight.grad is not None and net.head.weight.grad is not None


def test_recovered_predictions_agree_with_dual(digits):
    est = DCCNN(**{**IMAGES, "max_iter": 200, "tol": 1e-3}).fit(digits.x_train, digits.y_train)
    rec = est.recovery_
    assert rec.agreement >= 0.98 and rec.tv < 0.05
    # recovery is a primal point of the same problem: within the dual's gap of the optimum
    assert rec.objective - est.trace_.dual[-1] <= est.trace_.gap + 2e-3


def test_fewer_filters_cost_objective(digits):
    objs = [DCCNN(**{**IMAGES, "max_iter": 60}, n_filters=r).fit(digits.x_train, digits.y_train).recovery_.objective
            for r in (1, 8)]
    assert objs[0] > objs[1]


def test_gap_not_closing_warns_with_the_gap(digits):
    with pytest.warns(NonConvergenceWarning, match=r"DCCNN dual solver \(duality gap; lam=0.01\) did not converge in 3 iterations \(last residual"):
        DCCNN(**{**IMAGES, "max_iter": 3, "on_nonconvergence": "warn"}).fit(digits.x_train, digits.y_train)


@pytest.mark.parametrize("cls", [CCNN, DCCNN])
def test_clear_errors(cls, digits):
    x, y = digits.x_train[:20], digits.y_train[:20]
    with pytest.raises(ValueError, match="y: expected 20 labels \\(one per sample of X\\), got '19 labels'"):
        cls(**IMAGES).fit(x, y[:19])
    with pytest.raises(ValueError, match="y: expected at least 2 classes"):
        cls(**IMAGES).fit(x, torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match="lam: expected a number in \\(0.0, inf\\], got -1"):
        cls(**{**IMAGES, "lam": -1}).fit(x, y)
    with pytest.raises(ValueError, match="patch_size: expected a window no larger than the \\(padded\\) image 8x8"):
        cls(**{**IMAGES, "patch_size": 9}).fit(x, y)
    with pytest.raises(ValueError, match="X: expected images \\(N, C, H, W\\), \\(N, H, W\\) or rows"):
        cls(**IMAGES).fit(np.zeros((20, 1, 1, 8, 8)), y)
    est = cls(**{**IMAGES, "max_iter": 2}).fit(x, y)
    with pytest.raises(ValueError, match="X: expected images of shape \\(N, 1, 8, 8\\) as in fit"):
        est.predict(torch.zeros(3, 1, 9, 9))
    if cls is CCNN:
        with pytest.raises(ValueError, match="radius: expected a number in \\(0.0, inf\\], got 0"):
            CCNN(**{**IMAGES, "radius": 0}).fit(x, y)


def test_constrained_ccnn_respects_radius(digits):
    est = CCNN(**{**IMAGES, "radius": 5.0}).fit(digits.x_train, digits.y_train)
    assert float(torch.linalg.svdvals(est.full_theta_).sum()) <= 5.0 + 1e-4
