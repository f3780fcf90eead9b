"""The frontier's design: held-out test images never trained on, extra seeds only at the operating target."""

import torch

from proxnets.data import load_dataset
from proxnets.pmp.experiments import _by_rho, _carve_validation, _frontier_rows, operating_rho, with_held_out


def _rows(t: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in t}


def test_held_out_images_are_training_images_outside_the_subset():
    full = load_dataset("mnist5k", seed=0)
    plain = full.subset(600, 300, seed=3)
    ds = with_held_out(full, 600, 300, 500, seed=3)
    assert torch.equal(ds.x_train, plain.x_train) and torch.equal(ds.x_test[:300], plain.x_test)
    assert len(ds.x_test) == 800 and len(ds.y_test) == 800
    extra = _rows(ds.x_test[300:])
    part, (xv, _) = _carve_validation(ds, 3)
    assert not extra & _rows(ds.x_train) and not extra & _rows(xv) and not extra & _rows(part.x_train)
    assert extra <= _rows(full.x_train)  # from the training split, labels carried along
    idx = {r: i for i, r in enumerate(r.numpy().tobytes() for r in full.x_train)}
    got = torch.stack([full.y_train[idx[r.numpy().tobytes()]] for r in ds.x_test[300:]])
    assert torch.equal(got, ds.y_test[300:])
    assert torch.equal(with_held_out(full, 600, 300, 0, seed=3).x_test, plain.x_test)  # none asked: unchanged


def test_extra_seeds_count_only_at_the_operating_target():
    pts = [dict(seed=s, rho=r, density=r, val_acc=0.9 + 0.01 * (r == 0.2), test_acc=0.9) for s in (0, 1) for r in (0.4, 0.2)]
    pts.append(dict(seed=2, rho=0.4, density=0.4, val_acc=1.0, test_acc=0.5, extra=True))  # must not move the choice
    assert operating_rho(pts, [0.4, 0.2], 0.5) == 0.2
    assert _by_rho(pts, 0.4, "test_acc") == [0.9, 0.9]
    assert _by_rho(pts, 0.4, "test_acc", extra=True) == [0.9, 0.9, 0.5]
    fr = dict(bsqh=pts, prune=[], iht=[], adam_dense=[])
    rows = _frontier_rows(fr, [0.4, 0.2], 0.2)
    assert rows[0][3] == 0.9  # the grid's mean over its own seeds
    assert not any("seeds" in str(r[0]) for r in rows)  # no extra seed at the operating target: no extra row
    pts.append(dict(seed=2, rho=0.2, density=0.2, val_acc=0.5, test_acc=0.6, extra=True))
    rows = _frontier_rows(fr, [0.4, 0.2], 0.2)
    extra = [r for r in rows if r[0] == "bSQH (3 seeds)"]
    assert len(extra) == 1 and abs(extra[0][3] - 0.8) < 1e-9 and rows[0][3] == 0.9
