"""``fit``: the one training loop of proxnets.

One optimizer step per global batch, always through ``optimizer.step(closure)``, so that
optimizers which re-evaluate the loss (L-BFGS, the bSQH optimizer of :mod:`proxnets.pmp`) fit
through the same door as SGD/Adam. ``closure(backward=True)`` zeroes the gradients, computes the
loss on the current batch and back-propagates when ``backward`` is true.

Exact resumption: batches come from a permutation seeded by ``(seed, epoch)``, augmentation from
a generator seeded by ``(seed, epoch, step)``, the learning rate is a pure function of the step,
and checkpoints hold the RNG states. A run interrupted after any checkpoint and resumed with
``resume=True`` ends with the same weights as an uninterrupted run (tested).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from proxnets.data.dataset import ImageDataset
from proxnets.engine.checkpoint import restore
from proxnets.engine.config import TrainConfig
from proxnets.engine.device import seed_everything, select_device, set_deterministic
from proxnets.engine.distributed import (
    all_reduce_mean,
    barrier,
    init_distributed,
    local_slice,
    unwrap,
    wrap_model,
)
from proxnets.engine.progress import epoch_line, progress_iter
from proxnets.engine.rundir import RunDir, TrainingFailed, optimizer_failure
from proxnets.engine.schedules import lr_factor

__all__ = ["Trainable", "FitResult", "fit", "evaluate", "build_optimizer", "default_loss", "default_predict"]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Any]
PredictFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Callback = Callable[[str, dict], None]


def default_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer class labels ``y`` (classification); mean squared error
    ``mean |model(x) - y|^2`` for floating targets (regression, e.g. clean images for a denoiser)."""
    out = model(x)
    if y.is_floating_point():
        return F.mse_loss(out, y)
    return F.cross_entropy(out, y)


def default_predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


@dataclasses.dataclass
class Trainable:
    """Everything the CLI needs to train a named model: what a method's ``MODELS[name](...)`` returns."""

    model: nn.Module
    loss_fn: LossFn = default_loss
    predict_fn: PredictFn = default_predict
    config: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    # certificate(model, x) -> list[proxnets.certificates.Certificate]: the method's optimization
    # certificate on inputs x, printed by `proxnets eval`; every named model has one
    certificate: Callable[[nn.Module, torch.Tensor], list] | None = None


@dataclasses.dataclass
class FitResult:
    model: nn.Module
    history: list[dict]
    run_dir: Path | None
    global_step: int
    interrupted: bool = False

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, predict_fn: PredictFn | None = None, batch_size: int = 512
) -> float:
    """Accuracy of ``argmax predict_fn(model, x)`` against ``y`` (eval mode, restored afterwards)."""
    if len(x) != len(y):
        raise ValueError(f"y: expected {len(x)} labels to match x, got {len(y)}")
    predict_fn = predict_fn or default_predict
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = 0
    for i in range(0, len(x), batch_size):
        scores = predict_fn(model, x[i : i + batch_size].to(device))
        correct += int((scores.argmax(dim=1).cpu() == y[i : i + batch_size].cpu()).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def _split_loss(out: Any) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, {}


def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _batch_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + step)


class _Source:
    """The training examples of ``fit``, read in batches.

    Indexable data (``ImageDataset``, any map-style ``Dataset`` of ``(input, target)`` items) is
    batched here from a permutation seeded by ``(seed, epoch)`` (exact resumption, DDP slices);
    a ``DataLoader`` is iterated as the user built it (its sampler, its collate; a resumed epoch
    skips the batches already done).
    """

    def __init__(self, data: Any, batch_size: int, name: str = "dataset") -> None:
        self.loader: DataLoader | None = None
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dataset: Dataset | None = None
        if isinstance(data, ImageDataset):
            self.tensors = (data.x_train, data.y_train)
        elif isinstance(data, DataLoader):
            self.loader = data
        elif isinstance(data, TensorDataset) and len(data.tensors) == 2:
            self.tensors = (data.tensors[0], data.tensors[1])
        elif isinstance(data, IterableDataset) or not isinstance(data, Dataset) or not hasattr(data, "__len__"):
            raise TypeError(f"{name}: expected a proxnets.data.ImageDataset, a torch Dataset with __len__ of "
                            f"(input, target) items or a DataLoader, got {type(data).__name__} "
                            "(wrap an IterableDataset in a DataLoader)")
        else:
            self.dataset = data
        if self.loader is not None:
            try:
                self.steps = len(self.loader)
            except TypeError:
                raise TypeError(f"{name}: expected a DataLoader with a length (epochs need one), got a DataLoader "
                                "over an IterableDataset without __len__") from None
            self.n = None
        else:
            self.n = len(self.tensors[0]) if self.tensors is not None else len(self.dataset)
            self.steps = math.ceil(self.n / batch_size)
        if self.steps == 0:
            raise ValueError(f"{name}: expected at least one example, got none")

    def _take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tensors is not None:
            return self.tensors[0][idx], self.tensors[1][idx]
        return _pair(default_collate([self.dataset[int(i)] for i in idx]))

    def epoch(self, epoch: int, first: int, cfg: TrainConfig, dist_info) -> Iterator[tuple[int, Any, Any, float]]:
        """``(step, x, y, weight)`` for the steps ``first..steps-1`` of ``epoch``."""
        if self.loader is not None:
            for step, batch in enumerate(self.loader):
                if step >= first:
                    yield (step, *_pair(batch), 1.0)
            return
        perm = _epoch_permutation(self.n, cfg.seed, epoch)
        for step in range(first, self.steps):
            idx, weight = local_slice(perm[step * cfg.batch_size : (step + 1) * cfg.batch_size], dist_info)
            yield (step, *self._take(idx), weight)

    def in_order(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every example once, in order (evaluation)."""
        if self.loader is not None:
            for batch in self.loader:
                yield _pair(batch)
            return
        for i in range(0, self.n, batch_size):
            yield self._take(torch.arange(i, min(i + batch_size, self.n)))


def _pair(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"dataset: expected items (input, target), got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                    + " (for a denoiser: TensorDataset(noisy, clean) or (x, x) with noise added in loss_fn)")


@torch.no_grad()
def _held_out(net: nn.Module, source: _Source, loss_fn: LossFn, predict_fn: PredictFn, cfg: TrainConfig,
              device: torch.device) -> dict[str, float]:
    """Mean loss on held-out data (weighted by batch size); accuracy too when the targets are class labels."""
    was_training = net.training
    net.eval()
    total, loss_sum, correct, labels = 0, 0.0, 0, True
    for xb, yb in source.in_order(cfg.batch_size):
        xb, yb = xb.to(device), yb.to(device)
        loss, _ = _split_loss(loss_fn(net, xb, yb))
        loss_sum += float(loss) * len(xb)
        total += len(xb)
        labels = labels and not yb.is_floating_point() and yb.dim() == 1
        if labels:
            correct += int((predict_fn(net, xb).argmax(dim=1) == yb).sum())
    net.train(was_training)
    out = {"test_loss": loss_sum / max(total, 1)}
    if labels:
        out["test_acc"] = correct / max(total, 1)
    return out


def fit(
    model: nn.Module,
    dataset: ImageDataset | Dataset | DataLoader,
    cfg: TrainConfig | None = None,
    *,
    test_data: Dataset | DataLoader | None = None,
    loss_fn: LossFn | None = None,
    predict_fn: PredictFn | None = None,
    optimizer: Callable[[Any], torch.optim.Optimizer] | torch.optim.Optimizer | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    callbacks: Sequence[Callback] = (),
    run_dir: str | Path | RunDir | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train ``model`` on ``dataset`` and evaluate after every epoch.

    ``dataset``: a :class:`~proxnets.data.ImageDataset` (trained on its train split; ``test_acc``
    on its test split), any map-style ``torch.utils.data.Dataset`` of ``(input, target)`` items, or
    a ``DataLoader`` (its own batches; ``cfg.batch_size`` is then unused). Targets may be class
    labels or regression targets (floating tensors: the default loss is then the MSE, see
    :func:`default_loss`). ``test_data`` (a Dataset or DataLoader) adds ``test_loss`` -- and
    ``test_acc`` for class labels -- to every epoch's record.

    ``run_dir`` (optional; a path or a :class:`~proxnets.engine.rundir.RunDir`) receives
    ``config.json`` (with the optimizer that really ran), ``metrics.jsonl`` (one record per logged
    step and per epoch) and ``checkpoint.pt``. A directory holding a run is refused unless
    ``resume=True`` (then training continues from its checkpoint, refusing changed settings) or
    ``RunDir(path, force=True)``. An optimizer that reports failure (``run_state["stopped"]``, e.g.
    bSQH's eps explosion) raises :class:`~proxnets.engine.rundir.TrainingFailed` before anything
    is checkpointed after it. Returns a :class:`FitResult`; the history holds one record per epoch.
    """
    cfg = cfg or TrainConfig()
    source = _Source(dataset, cfg.batch_size)
    held_out = _Source(test_data, cfg.batch_size, "test_data") if test_data is not None else None
    if resume and run_dir is None:
        raise ValueError("resume: expected a run_dir to resume from, got resume=True with run_dir=None")
    loss_fn = loss_fn or default_loss
    predict_fn = predict_fn or default_predict
    device = select_device(cfg.device)
    dist_info = init_distributed(device, timeout=cfg.ddp_timeout)
    seed_everything(cfg.seed)
    if cfg.deterministic:
        set_deterministic(True)
    model.to(device)
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif optimizer is not None:
        opt = optimizer(model.parameters())
    else:
        opt = build_optimizer(model.parameters(), cfg)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])

    run = run_dir if isinstance(run_dir, RunDir) or run_dir is None else RunDir(Path(run_dir))
    run_path = run.path if run is not None else None
    writer = dist_info.is_main and run is not None

    steps_per_epoch = source.steps
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    history: list[dict] = []
    start_epoch, start_step, global_step = 0, 0, 0
    resumed_sums: dict[str, float] = {}

    state = run.open(cfg, opt, resume=resume, map_location=device) if run is not None else None
    barrier(dist_info)  # every rank has checked the directory before rank 0 writes into it
    if writer:
        run.begin(state, log=log)
    if state is not None:
        restore(state, unwrap(model), opt)
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        history = list(state["history"])
        resumed_sums = dict(state.get("epoch_sums", {}))
        if dist_info.is_main:
            log(f"resumed from {run.checkpoint_path} at epoch {start_epoch + 1}, step {global_step}")

    net = wrap_model(model, dist_info, device)

    def checkpoint(epoch: int, step_in_epoch: int, sums: dict[str, float] | None = None) -> None:
        if writer:
            run.save_checkpoint(
                unwrap(net), opt, epoch=epoch, step_in_epoch=step_in_epoch,
                global_step=global_step, history=history, config=cfg.to_dict(), epoch_sums=sums,
            )

    interrupted = False
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if global_step >= total_steps:
                break
            net.train()
            first = start_step if epoch == start_epoch else 0
            t0 = time.perf_counter()
            # running sums of the epoch's metrics; restored mid-epoch so that a resumed epoch
            # reports the same averages as an uninterrupted one
            sums: dict[str, float] = dict(resumed_sums) if epoch == start_epoch else {}
            steps = progress_iter(source.epoch(epoch, first, cfg, dist_info), steps_per_epoch - first,
                                  f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and dist_info.is_main)
            for step, xb, yb, weight in steps:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                if augment is not None:
                    xb = augment(xb, _batch_generator(cfg.seed, epoch, step))
                factor = lr_factor(cfg, global_step, total_steps)
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * factor
                extras: dict[str, float] = {}
                evaluated: list[torch.Tensor] = []

                def closure(backward: bool = True) -> torch.Tensor:
                    opt.zero_grad(set_to_none=True)
                    loss, more = _split_loss(loss_fn(net, xb, yb))
                    extras.update(more)
                    if backward:
                        (loss * weight).backward()
                        if cfg.grad_clip is not None:
                            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                        evaluated.append(loss.detach())
                    return loss.detach()

                loss = opt.step(closure)
                failure = optimizer_failure(opt)
                if failure is not None:  # its step changed nothing and later ones will not either
                    raise TrainingFailed(f"optimizer {type(opt).__name__} failed at step {global_step + 1} "
                                         f"(epoch {epoch + 1}): {failure}")
                if loss is None:  # optimizers may return nothing: report the loss at the step's start
                    loss = evaluated[0] if evaluated else torch.tensor(float("nan"))
                loss_value = all_reduce_mean(float(loss), dist_info)
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"training loss became {loss_value} at step {global_step} (epoch {epoch + 1})")
                for k, v in {"train_loss": loss_value, "_count": 1.0, **extras}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                global_step += 1
                record = {"event": "step", "step": global_step, "epoch": epoch + 1, "loss": loss_value,
                          "lr": opt.param_groups[0]["lr"], **{k: float(v) for k, v in extras.items()}}
                if writer and global_step % cfg.log_every == 0:
                    run.append_metrics(record)
                for cb in callbacks:
                    cb("step_end", {"model": unwrap(net), "optimizer": opt, "record": record})
                done_epoch = step + 1 == steps_per_epoch
                if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and not done_epoch:
                    checkpoint(epoch, step + 1, sums)
                if global_step >= total_steps:
                    break
            count = max(sums.pop("_count", 0.0), 1.0)
            rec: dict[str, Any] = {"epoch": epoch + 1, "step": global_step}
            rec.update({k: v / count for k, v in sums.items()})
            if cfg.eval_every_epoch and isinstance(dataset, ImageDataset) and len(dataset.x_test):
                rec["test_acc"] = evaluate(unwrap(net), dataset.x_test, dataset.y_test, predict_fn)
            if cfg.eval_every_epoch and held_out is not None:
                rec.update(_held_out(unwrap(net), held_out, loss_fn, predict_fn, cfg, device))
            rec["epoch_time"] = time.perf_counter() - t0
            history.append(rec)
            if writer:
                run.append_metrics({"event": "epoch", **rec})
            if dist_info.is_main:
                log(epoch_line(rec))
            for cb in callbacks:
                cb("epoch_end", {"model": unwrap(net), "optimizer": opt, "record": rec})
            finished = step + 1 == steps_per_epoch
            checkpoint(epoch + 1 if finished else epoch, 0 if finished else step + 1, None if finished else sums)
    except KeyboardInterrupt:
        interrupted = True
        log(f"interrupted at step {global_step}; resume with resume=True from {run_path}")
        raise
    # ranks leave fit together: rank 0 still evaluates and writes files after its last step
    barrier(dist_info)
    return FitResult(unwrap(net), history, run_path, global_step, interrupted)
