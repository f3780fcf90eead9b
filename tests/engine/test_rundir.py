"""The run directory: refusals, the optimizer that ran, a failed optimizer keeps the last good checkpoint."""

import json

import pytest
import torch
from torch import nn

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, fit
from proxnets.engine.checkpoint import load_checkpoint
from proxnets.engine.rundir import RunDir, RunDirError, TrainingFailed, describe_optimizer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", n_train=600, n_test=100)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


CFG = dict(epochs=2, batch_size=100, lr=1e-2, progress=False)


class StopsAt(torch.optim.SGD):
    """SGD that reports failure the way bSQH does (``run_state["stopped"]``) at its ``at``-th step."""

    def __init__(self, params, at: int):
        super().__init__(params, lr=0.1)
        self.at, self.steps = at, 0
        self.run_state = {"stopped": False, "message": ""}

    def step(self, closure):
        self.steps += 1
        loss = closure()
        if self.steps >= self.at:
            self.run_state.update(stopped=True, message="eps rose to 1e9 > eps_max")
            return loss  # like bSQH: the failed step leaves the weights alone
        super().step()
        return loss


def test_failed_optimizer_keeps_the_last_good_checkpoint(digits, tmp_path):
    with pytest.raises(TrainingFailed, match="optimizer StopsAt failed at step 9 \\(epoch 2\\): eps rose"):
        fit(_mlp(), digits, TrainConfig(**CFG, checkpoint_every=4), optimizer=lambda p: StopsAt(p, 9),
            run_dir=tmp_path, log=lambda m: None)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["global_step"] == 8 and state["epoch"] == 1 and state["step_in_epoch"] == 2
    # the checkpoint is the model after 8 good steps: an uninterrupted 8-step run ends there too
    ref = fit(_mlp(), digits, TrainConfig(**CFG, max_steps=8), optimizer=lambda p: StopsAt(p, 99),
              log=lambda m: None)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k


def test_fit_refuses_a_used_directory_and_changed_settings(digits, tmp_path):
    fit(_mlp(), digits, TrainConfig(**CFG), run_dir=tmp_path, log=lambda m: None)
    with pytest.raises(RunDirError, match="out: expected an empty run directory"):
        fit(_mlp(), digits, TrainConfig(**CFG), run_dir=tmp_path, log=lambda m: None)
    changed = TrainConfig(**{**CFG, "batch_size": 50, "seed": 3, "schedule": "cosine"})
    with pytest.raises(RunDirError, match="batch_size 100 -> 50; schedule \"constant\" -> \"cosine\"; seed 0 -> 3"):
        fit(_mlp(), digits, changed, run_dir=tmp_path, resume=True, log=lambda m: None)
    with pytest.raises(RunDirError, match="optimizer \"adam\" -> \"sgd\"; lr 0.01 -> 0.5"):
        fit(_mlp(), digits, TrainConfig(**CFG), run_dir=tmp_path, resume=True, log=lambda m: None,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    res = fit(_mlp(), digits, TrainConfig(**{**CFG, "seed": 3}), run_dir=RunDir(tmp_path, force=True),
              log=lambda m: None)
    assert res.global_step == 12
    assert json.loads((tmp_path / "config.json").read_text())["train"]["seed"] == 3


def test_config_records_the_optimizer_that_ran():
    from proxnets.pmp.training import bsqh_optimizer

    net = _mlp()
    d = describe_optimizer(bsqh_optimizer(net, 1e-3))
    assert d["name"] == "bsqh" and d["lr"] == 1.0 and d["groups"][0]["rho"] == 1e-3
    d = describe_optimizer(torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9))
    assert d["name"] == "sgd" and d["lr"] == 0.2 and d["options"]["momentum"] == 0.9
    json.dumps(d)  # plain JSON


def test_nonfinite_weights_are_refused_on_load(digits, tmp_path):
    res = fit(_mlp(), digits, TrainConfig(**{**CFG, "epochs": 1}), run_dir=tmp_path, log=lambda m: None)
    assert set(RunDir(tmp_path).load_weights()) == set(res.model.state_dict())
    from proxnets.utils.io import save_state

    state = load_checkpoint(tmp_path / "checkpoint.pt")
    state["model"]["3.bias"][2] = float("inf")
    save_state(tmp_path / "checkpoint.pt", state)
    with pytest.raises(RunDirError, match="expected finite weights, got NaN/Inf in '3.bias'"):
        RunDir(tmp_path).load_weights()


def test_a_collective_timeout_reads_as_one_line(monkeypatch):
    from proxnets.engine.distributed import collective_failure

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    e = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms for recv operation")
    line = collective_failure(e)
    assert line.startswith("ddp: rank 1 of 2 failed in a collective") and "--ddp-timeout" in line
    assert collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
