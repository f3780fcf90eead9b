"""The ``--full`` path of ``reproduce capsules``, run end to end on tiny standard-format files with a tiny budget.

Size full is for a GPU (the reference CapsNet, 30 epochs, full MNIST); here ``experiments.FULL`` is
overridden (1 step per model, tiny CapsNets) so that the code path -- dataset files, one model per routing
setting with reconstruction on and off, Sabour et al.'s Table 1 beside ours -- is exercised on a CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from proxnets.report.suite import SuiteContext


def _write_mnist(folder, n_train=60, n_test=30):
    from proxnets.data.files import write_idx

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)


@pytest.mark.slow  # ~10 s CPU, 80 s wall on the loaded 2-core machine: 26 tiny models
@pytest.mark.timeout(600)
def test_full_path_on_tiny_files_with_an_overridden_budget(tmp_path, monkeypatch):
    from proxnets.capsules import experiments

    _write_mnist(tmp_path / "data" / "mnist")
    tiny = dict(experiments.FULL, epochs=1, max_steps=1, batch_size=20, seeds=2, n_train=40, n_test=20,
                long_passes=5, long_samples=4, datasets=("mnist5k", "mnist"),
                model_overrides=dict(conv_channels=4, primary_channels=2, decoder_hidden=(16,)))
    monkeypatch.setattr(experiments, "FULL", tiny)
    ctx = SuiteContext(out_dir=tmp_path / "out", size="full", data_dir=tmp_path / "data", log=lambda m: None)
    result = experiments.run(ctx)
    assert set(result.metrics["accuracy"]) == {"mnist5k", "mnist"}
    table = result.metrics["paper_table1"]
    assert table["dataset"] == "mnist" and table["n_train"] == 40
    rows = table["rows"]
    assert len(rows) == 2 * len(experiments.TABLE_SETTINGS)  # every setting, reconstruction on and off
    assert rows["r=3, reconstruction on"]["paper_percent"] == 0.25
    assert rows["uniform, reconstruction off"]["paper_percent"] == 0.34
    assert all(0 <= r["error_percent"] <= 100 for r in rows.values())
    [t1] = [t for t in result.tables if t.title.startswith("Sabour et al. Table 1")]
    assert len(t1.rows) == 6 and t1.rows[2][3] == "0.25"
    # the models of the full path are the reference structure with the official defaults
    model, _ = experiments.train_setting(ctx, experiments._load(ctx, "mnist"), "regularized", 0,
                                         reconstruction=False)
    cfg = model.config
    assert (cfg.gradient, cfg.bias, cfg.margin_scale, cfg.routing, cfg.reconstruction) == (
        "all", True, 0.5, "regularized", False)


def test_missing_table_files_are_a_note_not_a_crash(tmp_path, monkeypatch):
    from proxnets.capsules import experiments

    monkeypatch.setattr(experiments, "FULL", dict(experiments.FULL, table_dataset="fashion-mnist"))
    ctx = SuiteContext(out_dir=tmp_path, size="full", data_dir=tmp_path, log=lambda m: None)
    from proxnets.report.suite import SuiteResult

    result = SuiteResult(method="capsules")
    experiments._paper_table(ctx, result, {})
    assert any("Table 1 (fashion-mnist): not available" in n for n in result.notes)
