"""The ``--full`` path of ``reproduce opteq``: CIFAR-10 at MON's 172K-parameter budget, MON's published 74.1%
beside ours. Size full is for a GPU; here ``experiments.FULL`` is overridden with a tiny budget and the
suite reads tiny CIFAR-10 binary files written by the test, so the code path (dataset files, every model,
the published-figure table with parameter counts) runs on a CPU."""

from __future__ import annotations

import numpy as np
import pytest

from proxnets.report.suite import SuiteContext


def _write_cifar(folder, per_batch=12, n_test=30):
    """``cifar-10-batches-bin``: records of 1 label byte + 3072 pixel bytes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(path, n):
        labels = (np.arange(n) % 10).astype(np.uint8)[:, None]
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        np.concatenate([labels, pixels], axis=1).tofile(path)

    for i in range(1, 6):
        write(folder / f"data_batch_{i}.bin", per_batch)
    write(folder / "test_batch.bin", n_test)


def test_full_widths_are_at_mons_parameter_budget():
    from proxnets.equilibrium import experiments
    from proxnets.equilibrium.models import MONClassifier, MONConfig, OptEqClassifier, OptEqConfig, count_parameters

    w, mw = experiments.FULL["width"], experiments.FULL["mon_width"]
    budget = experiments.MON_PUBLISHED["params"]
    opteq = count_parameters(OptEqClassifier((3, 32, 32), 10, OptEqConfig(stem_channels=w, channels=w)))
    mon = count_parameters(MONClassifier((3, 32, 32), 10, MONConfig(stem_channels=w, channels=mw)))
    for n in (opteq, mon):
        assert abs(n - budget) <= experiments.MON_BUDGET_TOL * budget, (opteq, mon)


@pytest.mark.slow  # every model and claim of the suite, tiny: ~30 s on the loaded machine
@pytest.mark.timeout(900)
def test_full_path_on_tiny_cifar_files(tmp_path, monkeypatch):
    from proxnets.equilibrium import experiments

    _write_cifar(tmp_path / "data" / "cifar10" / "cifar-10-batches-bin")
    tiny = dict(experiments.FULL, epochs=1, seeds=2, width=4, mon_width=3, n_val=10, n_cert=8, max_steps=1,
                l1_values=(0.1,))
    monkeypatch.setattr(experiments, "FULL", tiny)
    logged = []
    ctx = SuiteContext(out_dir=tmp_path / "out", size="full", data_dir=tmp_path / "data", log=logged.append)
    result = experiments.run(ctx)
    assert result.metrics["dataset"]["name"] == "cifar10"
    assert result.metrics["dataset"]["n_test"] == 30
    comp = result.metrics["mon_published_comparison"]
    assert comp["published"]["cifar10_accuracy"] == 0.741 and comp["published"]["params"] == 172_000
    assert {"OptEq", "MON"} <= set(comp["ours"]) and all(v["params"] > 0 for v in comp["ours"].values())
    [table] = [t for t in result.tables if t.title.startswith("CIFAR-10 at MON's parameter budget")]
    assert table.rows[-1][1] == 0.741 and table.rows[-1][3] == 172_000
    assert any("CIFAR-10: MON single conv" in m and "172000 parameters" in m for m in logged)
    # the DEQ baseline (TorchDEQ's Anderson, equal parameters) is part of the full path
    pytest.importorskip("torchdeq")
    [deq] = [c for c in result.claims if "DEQ" in c.claim]
    assert deq.falsified_by == "shuffled-labels" and deq.details["params"]["OptEq"] == deq.details["params"]["DEQ"]
