"""The shared training engine.

- :func:`fit` / :func:`evaluate` -- one loop for every back-propagation model, closure-style
  optimizer steps, exact resumption, DDP under ``torchrun``.
- :class:`TrainConfig` -- every knob with its default; :func:`lr_factor` -- schedules as pure functions.
- :func:`select_device`, :func:`seed_everything`, :func:`set_deterministic`.
- :mod:`proxnets.engine.plotting` -- the headless plot helper every experiment uses.
"""

from proxnets.engine.config import TrainConfig
from proxnets.engine.device import seed_everything, select_device, set_deterministic
from proxnets.engine.loop import FitResult, Trainable, build_optimizer, evaluate, fit
from proxnets.engine.schedules import lr_factor

__all__ = [
    "TrainConfig", "FitResult", "Trainable", "fit", "evaluate", "build_optimizer",
    "lr_factor", "select_device", "seed_everything", "set_deterministic",
]
