"""``TrainConfig``: every knob of a training run, with its default and why."""

from __future__ import annotations

import dataclasses
from typing import Any

from proxnets.utils.validation import check_choice, check_int, check_number

__all__ = ["TrainConfig", "OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step", "exp", "onecycle")


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # used only when fit() is not handed an optimizer factory
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    schedule: str = "constant"
    step_size: int = 2000  # "step"/"exp": decay period in optimizer steps (CapsNet: 0.96 every 2000)
    gamma: float = 0.96  # "step"/"exp": decay factor per period
    warmup_fraction: float = 0.3  # "onecycle": fraction of steps spent rising
    grad_clip: float | None = None  # max global gradient norm; None = off
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    checkpoint_every: int | None = None  # steps between checkpoints (epoch ends always checkpoint)
    max_steps: int | None = None  # stop after this many optimizer steps in total
    eval_every_epoch: bool = True
    log_every: int = 10  # steps between JSONL step records
    progress: bool = True
    # seconds a rank waits for the others in a collective (DDP) before it fails the run; torch's
    # default is 30 minutes, long enough for a hung rank to hold a whole job
    ddp_timeout: float = 300.0

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, low=1)
        check_int("batch_size", self.batch_size, low=1)
        check_number("lr", self.lr, low=0.0, low_inclusive=False)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_number("momentum", self.momentum, low=0.0, high=1.0, high_inclusive=False)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_int("step_size", self.step_size, low=1)
        check_number("gamma", self.gamma, low=0.0, high=1.0, low_inclusive=False)
        check_number("warmup_fraction", self.warmup_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, low=0.0, low_inclusive=False)
        check_int("seed", self.seed, low=0)
        if self.checkpoint_every is not None:
            check_int("checkpoint_every", self.checkpoint_every, low=1)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, low=1)
        check_int("log_every", self.log_every, low=1)
        check_number("ddp_timeout", self.ddp_timeout, low=0.0, low_inclusive=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: expected keys among {sorted(known)}, got unknown {unknown}")
        return cls(**d)
