"""Learning-rate schedules as pure functions of the step: ``lr(step) = base_lr * factor(step)``.

Pure functions make resumption exact: the step number is the whole schedule state.

- constant: 1
- step:     gamma ** floor(step / step_size)
- exp:      gamma ** (step / step_size)          (smooth version of "step")
- cosine:   (1 + cos(pi * step / total)) / 2
- onecycle: linear rise from 0.04 to 1 over warmup_fraction * total, then cosine to 0
"""

from __future__ import annotations

import math

from proxnets.engine.config import TrainConfig

__all__ = ["lr_factor"]


def lr_factor(cfg: TrainConfig, step: int, total_steps: int) -> float:
    total = max(total_steps, 1)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** (step // cfg.step_size)
    if cfg.schedule == "exp":
        return cfg.gamma ** (step / cfg.step_size)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    # onecycle
    rise = max(int(cfg.warmup_fraction * total), 1)
    if step < rise:
        return 0.04 + 0.96 * step / rise
    return 0.5 * (1.0 + math.cos(math.pi * min(step - rise, total - rise) / max(total - rise, 1)))
