"""The ``--full`` path of ``reproduce pmp``, end to end on tiny standard-format files with a tiny budget.

Size full is meant for a GPU (LeNet-5 on full MNIST and Fashion-MNIST, 30 + 5 epochs, 3 seeds); here
``experiments.FULL`` is overridden so that the code path -- dataset files, the frontier on each dataset,
the time per epoch of mini-batch and full-batch bSQH -- runs on a CPU in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from proxnets.report.suite import SuiteContext


def _write(folder, seed, n_train=80, n_test=30):
    from proxnets.data.files import write_idx

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)


@pytest.mark.slow  # ~20 s CPU: two tiny frontiers, the mechanism at a tiny budget
@pytest.mark.timeout(600)
def test_full_path_on_tiny_files_with_an_overridden_budget(tmp_path, monkeypatch):
    from proxnets.pmp import experiments

    _write(tmp_path / "data" / "mnist", 0)
    _write(tmp_path / "data" / "fashion-mnist", 1)
    tiny = dict(experiments.FULL, seeds=2, epochs=1, finetune_epochs=1, densities=(0.4, 0.2), batch_size=16,
                target_acc=0.1, mechanism_images=40, mechanism_iterations=3, layer_images=16, layer_sweeps=2,
                timing_epochs=1, timing_iterations=2)
    monkeypatch.setattr(experiments, "FULL", tiny)
    monkeypatch.setattr(experiments, "SGD_LRS", (0.1,))  # L1 then prune: one lr, 2 + 1 probes
    monkeypatch.setattr(experiments, "L1_PROBES", 2)
    monkeypatch.setattr(experiments, "L1_SEED_PROBES", 1)
    ctx = SuiteContext(out_dir=tmp_path / "out", size="full", data_dir=tmp_path / "data", log=lambda m: None)
    result = experiments.run(ctx)
    full = result.metrics["full"]
    assert set(full) == {"mnist", "fashion-mnist"}
    for name in full:
        t = full[name]["timing"]
        assert t["n_train"] == 64 and len(t["mini_epoch_s"]) == 1 and len(t["full_iteration_s"]) >= 1
        assert all(v > 0 for v in t["mini_epoch_s"] + t["full_iteration_s"])
    fashion = full["fashion-mnist"]["frontier"]
    assert sorted({p["rho"] for p in fashion["bsqh"]}) == [0.2, 0.4] and len(fashion["bsqh"]) == 4
    assert len(fashion["prune"]) == 4  # Adam + pruning at every bSQH density and seed
    assert len(fashion["l1_prune"]) == 4  # L1 then prune likewise, at the bSQH densities
    assert all(abs(p["density"] - q["density"]) <= 1e-4 for p, q in zip(
        sorted(fashion["l1_prune"], key=lambda p: (p["seed"], p["rho"])),
        sorted(fashion["bsqh"], key=lambda p: (p["seed"], p["rho"]))))
    titles = [t.title for t in result.tables]
    assert any(t.startswith("Accuracy vs density (LeNet-5, fashion-mnist") for t in titles)
    assert any(t.startswith("Accuracy vs density (LeNet-5, mnist,") for t in titles)  # the claims' dataset
    assert sum(t.startswith("Time per epoch") for t in titles) == 2
    assert sum(t.startswith("Accuracy at equal density with 95% intervals") for t in titles) == 2
    assert result.metrics["n_test"] == 30 and result.metrics["n_train"] == 64
    assert not any("not available" in n for n in result.notes)
