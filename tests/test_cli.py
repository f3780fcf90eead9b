import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from proxnets import cli, models
from proxnets.engine import TrainConfig, Trainable


def _tiny(input_shape, num_classes, hidden=16):
    torch.manual_seed(0)
    c, h, w = input_shape
    net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    return Trainable(net, config=TrainConfig(epochs=2, batch_size=128, lr=3e-3, progress=False))


@pytest.fixture()
def registry(monkeypatch):
    monkeypatch.setattr(models, "model_registry", lambda: {"tiny-mlp": _tiny})


@pytest.mark.parametrize("cmd", [[], ["info"], ["train"], ["eval"], ["reproduce"], ["bench"], ["download"]])
def test_every_command_has_useful_help(cmd):
    res = CliRunner().invoke(cli.main, cmd + ["--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and len(res.output.splitlines()) > 4


def test_info_lists_datasets():
    res = CliRunner().invoke(cli.main, ["info"])
    assert res.exit_code == 0, res.output
    assert "mnist5k" in res.output and "embedded" in res.output and "cifar10" in res.output


def test_train_resume_and_eval(registry, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--model", "tiny-mlp", "--dataset", "digits", "--out", str(run), "-o", "hidden=24"]
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 0, res.output
    meta = json.loads((run / "model.json").read_text())
    assert meta["options"] == {"hidden": 24} and meta["final"]["test_acc"] > 0.5
    res = CliRunner().invoke(cli.main, args + ["--resume", "--epochs", "3"])
    assert "resumed from" in res.output and "epoch 3" in res.output
    res = CliRunner().invoke(cli.main, ["eval", str(run)])
    assert res.exit_code == 0, res.output
    acc = float(res.output.split("accuracy")[1].split()[0])
    assert acc > 0.5


def test_cli_errors_are_clear(registry, tmp_path):
    res = CliRunner().invoke(cli.main, ["train", "--model", "nope", "--dataset", "digits", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "model: expected one of ['tiny-mlp'], got 'nope'" in res.output
    res = CliRunner().invoke(cli.main, ["train", "--model", "tiny-mlp", "--dataset", "mnist", "--data-dir",
                                        str(tmp_path), "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "train-images-idx3-ubyte.gz" in res.output
    res = CliRunner().invoke(cli.main, ["reproduce", "nonsense", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "method: expected one of" in res.output
    res = CliRunner().invoke(cli.main, ["eval", str(tmp_path)])
    assert res.exit_code != 0 and "model.json" in res.output
