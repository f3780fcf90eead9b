import json
import os

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


def _tiny_bsqh(input_shape, num_classes, rho: float = 1e-3, **options):
    """A tiny MLP trained by the real bSQH optimizer of proxnets.pmp (options go to BSQH)."""
    from proxnets.pmp.training import bsqh_optimizer

    c, h, w = input_shape
    net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 16), nn.ReLU(), nn.Linear(16, num_classes))
    return Trainable(net, config=TrainConfig(epochs=1, batch_size=256, progress=False), certificate=_finite_outputs,
                     optimizer=lambda params: bsqh_optimizer(net, rho, **options))


class _Fails:
    """A loss whose inner solver (policy="raise") stops converging at the n-th call."""

    def __init__(self, after: int):
        self.after, self.calls = after, 0

    def __call__(self, model, x, y):
        from proxnets.utils.convergence import NonConvergenceError

        self.calls += 1
        if self.calls > self.after:
            raise NonConvergenceError("fixed_point did not converge in 50 iterations (last residual 1.2e-01)")
        return nn.functional.cross_entropy(model(x), y)


def _tiny_failing(input_shape, num_classes):
    t = _tiny(input_shape, num_classes)
    t.loss_fn = _Fails(after=15)
    t.config = TrainConfig(epochs=3, batch_size=128, lr=3e-3, progress=False, checkpoint_every=4)
    return t


@pytest.fixture()
def registry(monkeypatch):
    monkeypatch.setattr(models, "model_registry",
                        lambda: {"tiny-mlp": _tiny, "tiny-bsqh": _tiny_bsqh, "tiny-failing": _tiny_failing})


def _train(out, *extra, model="tiny-mlp"):
    return CliRunner().invoke(cli.main, ["train", "--model", model, "--dataset", "digits", "--out", str(out), *extra])


def _one_line_error(res, *needles):
    assert res.exit_code != 0, res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output, res.output
    lines = [l for l in res.output.splitlines() if l.startswith("Error")]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


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
    res = _train(run, "-o", "hidden=24")
    assert res.exit_code == 0, res.output
    # one run directory: the config with the model's identity, metrics, one copy of the weights
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["name"] == "tiny-mlp" and config["model"]["options"] == {"hidden": 24}
    assert config["dataset"] == "digits" and config["train"]["seed"] == 0 and config["train"]["epochs"] == 2
    assert config["optimizer"]["name"] == "adam" and config["optimizer"]["lr"] == 3e-3
    res = _train(run, "-o", "hidden=24", "--resume", "--epochs", "3")
    _one_line_error(res, "epochs 2 -> 3", "--force")
    res = _train(run, "-o", "hidden=24", "--resume", "--epochs", "3", "--force")
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output and "epoch 3" in res.output
    assert json.loads((run / "config.json").read_text())["forced_changes"] == ["epochs 2 -> 3"]
    res = CliRunner().invoke(cli.main, ["eval", str(run)])
    assert res.exit_code == 0, res.output
    acc = float(res.output.split("accuracy")[1].split()[0])
    assert acc > 0.5
    assert "certificate finite_outputs: 1 == 1 -> holds (rigorous, forward pass)" in res.output


def test_resume_refuses_each_changed_setting(registry, tmp_path):
    run = tmp_path / "run"
    assert _train(run, "--epochs", "1", "--checkpoint-every", "3").exit_code == 0
    base = ["--epochs", "1", "--resume"]
    for extra, diff in [(["--batch-size", "64"], "batch_size 128 -> 64"), (["--lr", "0.01"], "lr 0.003 -> 0.01"),
                        (["--seed", "5"], "seed 0 -> 5"), (["-o", "hidden=8"], 'model options {} -> {"hidden": 8}')]:
        _one_line_error(_train(run, *base, *extra), "resume: expected the settings", diff)
    _one_line_error(_train(run, *base, model="tiny-bsqh"), 'model "tiny-mlp" -> "tiny-bsqh"')
    res = CliRunner().invoke(cli.main, ["train", "--model", "tiny-mlp", "--dataset", "mnist5k", "--out", str(run),
                                        *base])
    _one_line_error(res, 'dataset "digits" -> "mnist5k"')
    res = _train(run, *base)  # the same settings resume (nothing left to train)
    assert res.exit_code == 0 and "resumed from" in res.output, res.output


def test_train_refuses_a_directory_holding_a_run(registry, tmp_path):
    run = tmp_path / "run"
    assert _train(run, "--epochs", "1").exit_code == 0
    before = (run / "checkpoint.pt").read_bytes()
    _one_line_error(_train(run, "--epochs", "1", "--seed", "2"), "out: expected an empty run directory",
                    "checkpoint.pt", "--resume", "--force")
    assert (run / "checkpoint.pt").read_bytes() == before
    res = _train(run, "--epochs", "1", "--seed", "2", "--force")
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 2


def test_old_layout_is_a_clear_error(registry, tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"model": "tiny-mlp", "options": {}, "dataset": "digits"}))
    (tmp_path / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    _one_line_error(CliRunner().invoke(cli.main, ["eval", str(tmp_path)]), "proxnets <= 0.1", "retrain")
    _one_line_error(_train(tmp_path, "--resume"), "proxnets <= 0.1")


def test_same_seed_same_weights(registry, tmp_path):
    from proxnets.engine.checkpoint import load_checkpoint

    states = []
    for name in ("a", "b", "c"):
        seed = "3" if name != "c" else "4"
        res = _train(tmp_path / name, "--epochs", "1", "--seed", seed)
        assert res.exit_code == 0, res.output
        states.append(load_checkpoint(tmp_path / name / "checkpoint.pt")["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_bsqh_run_records_the_optimizer_that_ran(registry, tmp_path):
    res = _train(tmp_path / "r", model="tiny-bsqh")
    assert res.exit_code == 0, res.output
    opt = json.loads((tmp_path / "r" / "config.json").read_text())["optimizer"]
    assert opt["name"] == "bsqh" and opt["class"] == "proxnets.pmp.optimizer.BSQH"
    assert opt["lr"] == 1.0 and opt["options"]["eps"] == 5.0
    assert [g.get("rho", 0.0) for g in opt["groups"]] == [1e-3, 0.0]  # weights at rho, biases free
    train = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert "optimizer" not in train and "lr" not in train  # no adam / 0.001 that never ran
    _one_line_error(_train(tmp_path / "s", "--lr", "0.01", model="tiny-bsqh"), "--lr: expected no value")


def test_bsqh_eps_explosion_fails_the_run(registry, tmp_path):
    # eta = 1e9: no trial step can decrease J by eta*tau, eps rises past eps_max at the first step
    res = _train(tmp_path / "r", "-o", "eta=1e9", "-o", "eps_max=100", model="tiny-bsqh")
    line = _one_line_error(res, "training failed: optimizer BSQH failed at step 1", "eps rose to",
                           "no checkpoint was written")
    assert "eps_max=100" in line


def test_solver_failure_fails_the_run_and_keeps_the_last_checkpoint(registry, tmp_path):
    from proxnets.engine.checkpoint import load_checkpoint

    res = _train(tmp_path / "r", model="tiny-failing")  # 12 steps per epoch, checkpoints every 4 and at epoch ends
    _one_line_error(res, "training failed: fixed_point did not converge", "last good checkpoint is kept",
                    "step 12")
    state = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert state["global_step"] == 12 and state["epoch"] == 1
    assert not list((tmp_path / "r").glob(".*.tmp"))


def test_user_mistakes_are_one_line_errors(registry, tmp_path):
    _one_line_error(_train(tmp_path / "a", "-o", "rho=-1", model="tiny-bsqh"), "rho: expected a number in [0.0, inf], got -1")
    line = _one_line_error(_train(tmp_path / "b", "-o", "rhoo=1", model="tiny-bsqh"), "-o rhoo: expected a key among")
    assert "'rho'" in line and "'eps_max'" in line and "'eta'" in line
    line = _one_line_error(_train(tmp_path / "c", "-o", "hiden=3"), "-o hiden: expected a key among ['hidden']")
    _one_line_error(_train(tmp_path / "d", "--device", "gpu"), "device: expected", "'gpu'")
    _one_line_error(_train(tmp_path / "e", "-o", "hidden=-3"))
    _one_line_error(_train(tmp_path / "e", "--ddp-timeout", "0"), "ddp_timeout: expected")
    _one_line_error(CliRunner().invoke(cli.main, ["eval", str(tmp_path)]), "config.json")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.json").write_text("{not json")
    _one_line_error(CliRunner().invoke(cli.main, ["eval", str(tmp_path / "f")]), "config.json: expected JSON")
    # --debug shows the real exception
    res = CliRunner().invoke(cli.main, ["--debug", "train", "--model", "tiny-mlp", "--dataset", "digits",
                                        "--device", "gpu", "--out", str(tmp_path / "g")])
    assert isinstance(res.exception, ValueError)


def test_orphan_temporaries_are_cleaned_on_the_next_start(registry, tmp_path):
    run = tmp_path / "r"
    assert _train(run, "--epochs", "1").exit_code == 0
    for name in (".checkpoint.pt.abc123.tmp", ".config.json.x.tmp", ".metrics.jsonl.y.tmp"):
        (run / name).write_bytes(b"half written")
    res = _train(run, "--epochs", "1", "--resume")
    assert res.exit_code == 0, res.output
    assert not list(run.glob(".*.tmp"))


def test_disk_full_names_the_path(registry, tmp_path, monkeypatch):
    import errno

    from proxnets.utils import io

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.torch, "save", full)
    _one_line_error(_train(tmp_path / "r"), f"could not write {tmp_path / 'r' / 'checkpoint.pt'}",
                    "No space left on device")


def test_read_only_target_names_the_path(registry, tmp_path, monkeypatch):
    import errno

    from proxnets.utils import io

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
    _one_line_error(_train(tmp_path / "r"), f"could not write {tmp_path / 'r' / 'config.json'}",
                    "Read-only file system")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_names_the_path(registry, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    run.chmod(0o500)
    try:
        _one_line_error(_train(run), str(run / "config.json"), "Permission denied")
    finally:
        run.chmod(0o700)


def test_eval_refuses_nan_weights(registry, tmp_path):
    from proxnets.engine.checkpoint import load_checkpoint
    from proxnets.utils.io import save_state

    run = tmp_path / "r"
    assert _train(run, "--epochs", "1").exit_code == 0
    state = load_checkpoint(run / "checkpoint.pt")
    state["model"]["1.weight"][0, 0] = float("nan")
    save_state(run / "checkpoint.pt", state)
    _one_line_error(CliRunner().invoke(cli.main, ["eval", str(run)]), "expected finite weights", "'1.weight'")


def test_cli_errors_are_clear(registry, tmp_path):
    res = CliRunner().invoke(cli.main, ["train", "--model", "nope", "--dataset", "digits", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "model: expected one of ['tiny-bsqh', 'tiny-failing', 'tiny-mlp'], got 'nope'" in res.output
    res = CliRunner().invoke(cli.main, ["train", "--model", "tiny-mlp", "--dataset", "mnist", "--data-dir",
                                        str(tmp_path), "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "train-images-idx3-ubyte.gz" in res.output
    res = CliRunner().invoke(cli.main, ["reproduce", "nonsense", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "method: expected one of" in res.output
    res = CliRunner().invoke(cli.main, ["eval", str(tmp_path)])
    assert res.exit_code != 0 and "config.json" in res.output


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
