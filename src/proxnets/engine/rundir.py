"""One run directory: what a training run was, what it measured, and its one copy of the weights.

A run directory written by :func:`proxnets.engine.fit` (and so by ``proxnets train``) holds

- ``config.json`` -- ``{"format", "model": {name, options, input_shape, num_classes} | null,
  "dataset", "train": TrainConfig fields, "optimizer": the optimizer that really ran}``;
- ``metrics.jsonl`` -- one record per logged step and per epoch;
- ``checkpoint.pt`` -- model, optimizer, counters, RNG states, history (``weights_only`` loadable).
  It is the only copy of the weights: ``proxnets eval`` reads them from it.

:class:`RunDir` is the one place that decides whether a directory may be trained into: a fresh run
refuses a directory that already holds a run (unless ``force``), a resumed run refuses a checkpoint
started with another model, dataset, batch size, lr, schedule, seed or number of epochs (unless
``force``), and every write names its path when the disk is full or read-only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from proxnets.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from proxnets.engine.config import TrainConfig
from proxnets.utils.io import append_jsonl, read_json, write_json, write_text

__all__ = ["RunDir", "RunDirError", "TrainingFailed", "describe_optimizer", "optimizer_failure", "RUN_FORMAT"]

RUN_FORMAT = "proxnets-run/2"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
OLD_LAYOUT = ("model.json", "model.pt")  # proxnets <= 0.1: identity and a second copy of the weights
# what a resumed run must share with the run it continues: (section, key) of config.json
RESUME_KEYS = (
    ("model", "name"), ("model", "options"), ("dataset", None), ("train", "batch_size"), ("optimizer", "name"),
    ("optimizer", "lr"), ("train", "schedule"), ("train", "step_size"), ("train", "gamma"),
    ("train", "warmup_fraction"), ("train", "seed"), ("train", "epochs"), ("train", "max_steps"),
)
# TrainConfig fields that describe the optimizer: config.json keeps what ran under "optimizer" instead
_OPTIMIZER_FIELDS = ("optimizer", "lr", "momentum", "weight_decay")


class RunDirError(ValueError):
    """A run directory that does not fit the run asked for (a user mistake: one line, no traceback)."""


class TrainingFailed(RuntimeError):
    """The optimizer reported that it cannot go on (e.g. bSQH's eps exploded); the last checkpoint is kept."""


def _plain(value: Any) -> Any:
    """A JSON-comparable copy (tuples -> lists, tensors -> lists, dataclasses -> dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **{k: _plain(v) for k, v in dataclasses.asdict(value).items()}}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist() if value.numel() <= 16 else f"tensor{tuple(value.shape)}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__  # callables, rule objects: their kind, not their repr (addresses)


def describe_optimizer(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer that really ran: ``{"name", "class", "lr", "options"}``.

    ``lr`` is the initial learning rate of the first parameter group (the schedule multiplies it);
    ``options`` are the optimizer's defaults (e.g. bSQH's ``eps``, Adam's ``betas``) and ``groups``
    the parameter groups' own settings where they differ (bSQH's ``rho`` on weights, 0 on biases).
    """
    groups = opt.param_groups
    lrs = [g.get("initial_lr", g.get("lr")) for g in groups]
    skip = ("lr", "initial_lr", "params", "param_names")
    options = {k: _plain(v) for k, v in opt.defaults.items() if k not in skip}
    # per-group settings that differ from the defaults (bSQH: rho on weights, 0 on biases)
    own = [{k: _plain(v) for k, v in g.items() if k not in skip and _plain(v) != options.get(k)} for g in groups]
    return {"name": type(opt).__name__.lower(), "class": f"{type(opt).__module__}.{type(opt).__qualname__}",
            "lr": lrs[0] if lrs else None, **({"group_lrs": lrs} if len(set(map(str, lrs))) > 1 else {}),
            "options": options, **({"groups": own} if any(own) else {})}


def optimizer_failure(opt: torch.optim.Optimizer) -> str | None:
    """Why ``opt`` cannot go on, or None.

    The protocol: an optimizer that can fail keeps ``run_state = {"stopped": bool, "message": str}``
    (:class:`proxnets.pmp.BSQH` does: eps above ``eps_max`` stops it, and later steps change nothing).
    """
    state = getattr(opt, "run_state", None)
    if isinstance(state, dict) and state.get("stopped"):
        return str(state.get("message") or f"{type(opt).__name__} stopped")
    return None


def _get(config: dict, section: str, key: str | None) -> Any:
    value = config.get(section)
    if key is None:
        return value
    return value.get(key) if isinstance(value, dict) else None


def _name(section: str, key: str | None) -> str:
    if key is None:
        return section
    return {"name": "model", "options": "model options"}.get(key, key) if section == "model" else (
        "optimizer" if (section, key) == ("optimizer", "name") else key)


@dataclasses.dataclass
class RunDir:
    """A training run's directory (see the module docstring for its files).

    ``model`` (``{"name", "options", "input_shape", "num_classes"}``) and ``dataset`` identify the
    run for ``proxnets train``/``eval``; a library ``fit`` may leave them ``None``. ``force`` lets a
    fresh run overwrite a directory and a resumed run continue with changed settings.
    """

    path: Path
    model: dict[str, Any] | None = None
    dataset: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._forced: list[str] = []

    # ------------------------------------------------------------------ files
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_NAME

    def temporaries(self) -> list[Path]:
        """Temporary files of interrupted atomic writes (``.<name>.*.tmp``, see ``utils.io.atomic_path``)."""
        return sorted(p for p in self.path.glob(".*.tmp") if p.is_file()) if self.path.is_dir() else []

    def contents(self) -> list[str]:
        """Names of the run files present (new or old layout)."""
        names = (CONFIG_NAME, METRICS_NAME, CHECKPOINT_NAME, *OLD_LAYOUT)
        return [n for n in names if (self.path / n).exists()]

    def is_old_layout(self) -> bool:
        if any((self.path / n).exists() for n in OLD_LAYOUT):
            return True
        if self.config_path.is_file():
            try:
                return read_json(self.config_path).get("format") != RUN_FORMAT
            except (ValueError, AttributeError):
                return False
        return False

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise RunDirError(f"run_dir: expected a run directory written by `proxnets train` (with {CONFIG_NAME}), "
                              f"got {str(self.path)!r}")
        try:
            config = read_json(self.config_path)
        except ValueError as e:
            raise RunDirError(f"{CONFIG_NAME}: expected JSON, got a broken file {str(self.config_path)!r} ({e})") from None
        if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
            raise RunDirError(self._old_layout_message())
        return config

    def _old_layout_message(self) -> str:
        return (f"run_dir: expected a run directory of format {RUN_FORMAT!r}, got {str(self.path)!r} in the layout of "
                f"proxnets <= 0.1 (model.json + model.pt + config.json without 'format'); retrain it "
                f"(`proxnets train ... --force` overwrites it)")

    # ------------------------------------------------------------------ starting a run
    def config_for(self, cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The ``config.json`` of a run with ``cfg`` and ``optimizer`` (the optimizer as it ran)."""
        train = {k: v for k, v in cfg.to_dict().items() if k not in _OPTIMIZER_FIELDS}
        return _plain({"format": RUN_FORMAT, "model": self.model, "dataset": self.dataset, "train": train,
                       "optimizer": describe_optimizer(optimizer)})

    def preflight(self, resume: bool) -> None:
        """Refuse early what :meth:`open` would refuse without a config (CLI: before loading data)."""
        present = self.contents()
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"out: expected a directory, got the file {str(self.path)!r}")
        if not present or self.force:
            return
        if self.is_old_layout():
            raise RunDirError(self._old_layout_message())
        if not resume:
            raise RunDirError(f"out: expected an empty run directory, got {str(self.path)!r} holding "
                              f"{', '.join(present)} (use --resume to continue that run or --force to overwrite it)")
        if self.config_path.is_file() and (self.model is not None or self.dataset is not None):
            # the identity is known before any data is loaded: refuse a different model or dataset now
            self._refuse_changes(_plain({"model": self.model, "dataset": self.dataset}))

    def open(self, cfg: TrainConfig, optimizer: torch.optim.Optimizer, *, resume: bool,
             map_location: str | torch.device = "cpu") -> dict | None:
        """Check this directory against the run (read-only; every rank); the checkpoint to resume from, or None."""
        self.preflight(resume)
        self._config = self.config_for(cfg, optimizer)
        if not resume:
            return None
        if self.config_path.is_file() and not self.is_old_layout():
            self._forced = self._refuse_changes(self._config)
        if not self.checkpoint_path.exists():
            return None
        return load_checkpoint(self.checkpoint_path, map_location=map_location)

    def _refuse_changes(self, current: dict[str, Any]) -> list[str]:
        diffs = self.differences(self.read_config(), current)
        if diffs and not self.force:
            raise RunDirError(f"resume: expected the settings the run in {str(self.path)!r} started with, got "
                              f"{'; '.join(diffs)} (use --force to continue anyway)")
        return diffs

    @staticmethod
    def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
        """``"<key> <stored> -> <current>"`` for each of :data:`RESUME_KEYS` that changed (keys ``current``
        does not know, e.g. the model of a library ``fit``, are skipped)."""
        out = []
        for section, key in RESUME_KEYS:
            part = current.get(section)
            known = part is not None if key is None else isinstance(part, dict) and key in part
            if not known:
                continue  # not known to the caller (a library fit names no model and no dataset)
            new = _get(current, section, key)
            old = _get(stored, section, key)
            if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
                out.append(f"{_name(section, key)} {json.dumps(old)} -> {json.dumps(new)}")
        return out

    def begin(self, state: dict | None, log=print) -> None:
        """Write the run's start (rank 0 only, after :meth:`open` on every rank)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in self.temporaries():  # left by a process killed in the middle of an atomic write
            self._unlink(tmp)
        if state is None:
            for name in (METRICS_NAME, CHECKPOINT_NAME, *OLD_LAYOUT):
                self._unlink(self.path / name)
            self.write_config(self._config)
            return
        if self._forced:
            log(f"resuming with changed settings (--force): {'; '.join(self._forced)}")
            self.write_config({**self._config, "forced_changes": self._forced})
        elif not self.config_path.is_file() or self.is_old_layout():  # --force on an old layout: now the new one
            self.write_config(self._config)
            for name in OLD_LAYOUT:
                self._unlink(self.path / name)
        if self.metrics_path.exists():
            self._truncate_metrics(int(state["global_step"]))

    # ------------------------------------------------------------------ writing (every error names its path)
    def _writing(self, path: Path, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:200]
            raise OSError(getattr(e, "errno", None) or 0, f"could not write {path} ({reason})") from e

    def _unlink(self, path: Path) -> None:
        if path.exists():
            self._writing(path, path.unlink)

    def write_config(self, config: dict[str, Any]) -> None:
        self._writing(self.config_path, write_json, self.config_path, config)

    def append_metrics(self, record: dict[str, Any]) -> None:
        self._writing(self.metrics_path, append_jsonl, self.metrics_path, record)

    def save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, **fields: Any) -> Path:
        return self._writing(self.checkpoint_path, save_checkpoint, self.checkpoint_path, model, optimizer, **fields)

    def _truncate_metrics(self, global_step: int) -> None:
        """Drop records written after the checkpoint we resume from (they will be written again)."""
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the interruption
            if rec.get("step", 0) <= global_step:
                keep.append(line)
        self._writing(self.metrics_path, write_text, self.metrics_path, "".join(k + "\n" for k in keep))

    # ------------------------------------------------------------------ reading a finished run
    def identity(self) -> tuple[dict[str, Any], str]:
        """``(model, dataset)`` of the run (``model``: name, options, input_shape, num_classes)."""
        model = self.read_config().get("model")
        if not isinstance(model, dict) or not {"name", "options", "input_shape", "num_classes"} <= set(model):
            raise RunDirError(f"{CONFIG_NAME}: expected the model's name, options, input_shape and num_classes, got "
                              f"{model!r} in {str(self.config_path)!r} (a run of fit() without a named model)")
        return model, self.read_config().get("dataset")

    def load_weights(self) -> dict[str, torch.Tensor]:
        """The model weights of the last checkpoint; refuses non-finite weights (a diverged run)."""
        if not self.checkpoint_path.is_file():
            raise FileNotFoundError(f"checkpoint: expected {str(self.checkpoint_path)!r} (the run wrote no checkpoint)")
        weights = load_checkpoint(self.checkpoint_path)["model"]
        for k, v in weights.items():
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise RunDirError(f"checkpoint: expected finite weights, got NaN/Inf in {k!r} of "
                                  f"{str(self.checkpoint_path)!r} (the run diverged)")
        return weights

    def checkpoint_note(self) -> str:
        """One line on the last good checkpoint (for a failed run's message)."""
        if not self.checkpoint_path.is_file():
            return f"no checkpoint was written in {self.path}"
        try:
            state = load_checkpoint(self.checkpoint_path)
        except (ValueError, OSError) as e:
            return f"the checkpoint {self.checkpoint_path} is unreadable ({e})"
        return (f"the last good checkpoint is kept: {self.checkpoint_path} (epoch {state['epoch']}, "
                f"step {state['global_step']})")
