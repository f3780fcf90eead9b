import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from proxnets.data import load_dataset
from proxnets.engine import TrainConfig, evaluate, fit, lr_factor
from proxnets.engine.checkpoint import load_checkpoint
from proxnets.utils.io import load_state


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _mlp(dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(dropout), nn.ReLU(), nn.Linear(32, 10))


def _noise(x, g):
    return x + 0.01 * torch.randn(x.shape, generator=g)


CFG = dict(epochs=3, batch_size=100, lr=1e-2, checkpoint_every=4, schedule="cosine", progress=False)


def test_training_learns_digits(digits):
    res = fit(_mlp(0.0), digits, TrainConfig(epochs=8, batch_size=64, lr=3e-3, progress=False), log=lambda m: None)
    assert res.history[-1]["test_acc"] > 0.9
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert evaluate(res.model, digits.x_test, digits.y_test) == pytest.approx(res.history[-1]["test_acc"])


@pytest.mark.parametrize("stop_at", [3, 15, 22])  # mid-epoch before a checkpoint, epoch end, mid-epoch after
def test_resume_equals_uninterrupted(digits, tmp_path, stop_at):
    cfg = TrainConfig(**CFG)
    ref = fit(_mlp(), digits, cfg, run_dir=tmp_path / "a", augment=_noise, log=lambda m: None)

    def interrupt(event, state):
        if event == "step_end" and state["record"]["step"] == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_mlp(), digits, cfg, run_dir=tmp_path / "b", augment=_noise, callbacks=[interrupt], log=lambda m: None)
    res = fit(_mlp(), digits, cfg, run_dir=tmp_path / "b", augment=_noise, resume=True, log=lambda m: None)
    for (k, a), b in zip(ref.model.state_dict().items(), res.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["train_loss"] for h in ref.history] == [h["train_loss"] for h in res.history]
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["event"] == "step"]
    assert steps == sorted(set(steps)), "metrics after the checkpoint must not be duplicated"


def test_checkpoint_is_weights_only_and_complete(digits, tmp_path):
    fit(_mlp(), digits, TrainConfig(epochs=1, batch_size=200, progress=False), run_dir=tmp_path, log=lambda m: None)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert {"model", "optimizer", "rng", "epoch", "global_step", "history", "config"} <= set(state)
    assert state["epoch"] == 1 and state["global_step"] == math.ceil(1437 / 200)
    assert not list(tmp_path.glob(".*tmp")), "no temporary files left behind"
    # a pickle carrying arbitrary objects is refused
    bad = tmp_path / "evil.pt"
    torch.save({"x": Path("/")}, bad)
    with pytest.raises(Exception):
        load_state(bad)


def test_closure_optimizer_gets_repeated_evaluations(digits):
    calls = []

    class Probe(torch.optim.SGD):
        def step(self, closure):
            with torch.no_grad():
                trial = closure(backward=False)
            loss = closure()
            calls.append((float(trial), float(loss)))
            return super().step()

    fit(_mlp(0.0), digits, TrainConfig(epochs=1, max_steps=5, progress=False),
        optimizer=lambda p: Probe(p, lr=0.1), log=lambda m: None)
    assert len(calls) == 5
    assert all(a == pytest.approx(b) for a, b in calls)  # same batch both times


def test_lbfgs_through_the_same_door(digits):
    res = fit(_mlp(0.0), digits, TrainConfig(epochs=2, batch_size=512, progress=False),
              optimizer=lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=5), log=lambda m: None)
    assert res.history[-1]["test_acc"] > 0.8


def test_schedules_are_pure_functions():
    cfg = TrainConfig(schedule="step", step_size=10, gamma=0.5)
    assert [lr_factor(cfg, s, 100) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    cos = TrainConfig(schedule="cosine")
    assert lr_factor(cos, 0, 100) == 1.0 and lr_factor(cos, 100, 100) == pytest.approx(0.0)
    one = TrainConfig(schedule="onecycle", warmup_fraction=0.25)
    vals = [lr_factor(one, s, 100) for s in range(101)]
    assert max(vals) == pytest.approx(1.0) and vals.index(max(vals)) == 25 and vals[-1] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(epochs=0), "epochs: expected an integer >= 1, got 0"),
     (dict(lr=-1.0), "lr: expected a number in"),
     (dict(optimizer="adagrad"), "optimizer: expected one of"),
     (dict(schedule="linear"), "schedule: expected one of")],
)
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_nonfinite_loss_stops_with_message(digits):
    def bad_loss(model, x, y):
        return model(x).sum() * float("nan")

    with pytest.raises(FloatingPointError, match="training loss became nan"):
        fit(_mlp(), digits, TrainConfig(epochs=1, progress=False), loss_fn=bad_loss, log=lambda m: None)


@pytest.mark.distributed
def test_ddp_two_processes_match_one(tmp_path):
    script = Path(__file__).with_name("ddp_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env, timeout=300)
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path / "two")],
        env=env, timeout=300, capture_output=True, text=True,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]

    def losses(d):
        recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r["event"] == "step"]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 2 * math.ceil(600 / 64)
    assert max(abs(a - b) for a, b in zip(one, two)) < 2e-3
    assert one[-1] < one[0]
