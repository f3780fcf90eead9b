import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from proxnets import cli, models
from proxnets.certificates import Certificate
from proxnets.engine import TrainConfig, Trainable


def _finite_outputs(model, x):
    out = model(x)
    return [Certificate("finite_outputs", float(torch.isfinite(out).all()), 1.0, op="==", method="forward pass")]


def _tiny(input_shape, num_classes, hidden=16):
    c, h, w = input_shape  # not seeded here: the CLI seeds before building
    net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    return Trainable(net, config=TrainConfig(epochs=2, batch_size=128, lr=3e-3, progress=False),
                     certificate=_finite_outputs)


@pytest.fixture()
def registry(monkeypatch):
    monkeypatch.setattr(models, "model_registry", lambda: {"tiny-mlp": _tiny})


@pytest.mark.parametrize("cmd", [[], ["info"], ["train"], ["eval"], ["reproduce"], ["bench"], ["download"], ["denoise"], ["deblur"]])
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
    assert "certificate finite_outputs: 1 == 1 -> holds (rigorous, forward pass)" in res.output


def test_same_seed_same_weights(registry, tmp_path):
    from proxnets.utils.io import load_state

    states = []
    for name in ("a", "b", "c"):
        seed = "3" if name != "c" else "4"
        res = CliRunner().invoke(cli.main, ["train", "--model", "tiny-mlp", "--dataset", "digits", "--epochs", "1",
                                            "--seed", seed, "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        states.append(load_state(tmp_path / name / "model.pt"))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


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


def test_denoise_and_deblur_commands(tmp_path):
    from proxnets.data.images import natural_images, write_image
    from proxnets.stable import AveragedDenoiser, DenoiserConfig
    from proxnets.stable.restore import save_denoiser

    torch.manual_seed(0)
    model = AveragedDenoiser(DenoiserConfig(channels=1, image_size=32, width=4, depth=2, averaged_margin=0.1))
    save_denoiser(tmp_path / "den.pt", model)
    write_image(tmp_path / "in.png", natural_images(gray=True, names=("camera",))["camera"][:, :48, :48])
    res = CliRunner().invoke(cli.main, ["denoise", str(tmp_path / "in.png"), str(tmp_path / "out.png"),
                                        "--model", str(tmp_path / "den.pt"), "--add-noise", "0.1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.png").is_file() and "psnr_denoised" in res.output
    res = CliRunner().invoke(cli.main, ["deblur", str(tmp_path / "in.png"), str(tmp_path / "deb.png"),
                                        "--model", str(tmp_path / "den.pt"), "--simulate", "--max-iter", "30"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "deb.png").is_file() and "iterations" in res.output
    res = CliRunner().invoke(cli.main, ["denoise", str(tmp_path / "in.png"), str(tmp_path / "x.png"),
                                        "--model", str(tmp_path / "in.png")])
    assert res.exit_code != 0 and "checkpoint: expected a tensors-only file" in res.output
