"""Ready-made bSQH runs through the shared engine (used by the CLI registry, experiments, benchmark).

- :func:`bsqh_optimizer`: a BSQH on a model with weights regularized and biases not.
- :func:`train_bsqh`: mini-batch bSQH with :func:`proxnets.engine.fit` (the engine's batch is the
  batch of the acceptance test), optionally followed by fine-tuning with the zero pattern frozen.
- :func:`full_batch_bsqh`: the theorem's setting, every iteration on the whole training set
  (:func:`full_batch_closure`: its closure).
- :func:`make_bsqh_trainable`: the ``MODELS`` entries (LeNet-5 and a small CNN trained by bSQH).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.engine import TrainConfig, Trainable, evaluate, fit
from proxnets.pmp.certify import DecreaseAudit, certificate
from proxnets.pmp.models import LeNet5, SmallLeNet5
from proxnets.pmp.optimizer import BSQH
from proxnets.pmp.sparsity import freeze_sparsity, sparsity_param_groups, weight_density

__all__ = ["BSQH_DEFAULTS", "DEFAULT_RHO", "bsqh_optimizer", "train_bsqh", "full_batch_bsqh", "full_batch_closure",
           "make_bsqh_trainable"]

# Defaults measured on mnist5k with LeNet-5 (docs/pmp.md): eps0 = 5 is a step 0.1 of SGD size; the
# floor eps_min = 1 caps the step at 0.5, which keeps mini-batch bSQH from accepting a huge step
# that happens to pass the test on one batch (the objective no longer needs it: see
# tests/pmp/test_pmp_objective.py). rho is in units of the default, normalized regularizer:
# rho R = rho x (density of the weights) + rho lam2 |w|^2 / 2.
BSQH_DEFAULTS: dict[str, Any] = dict(eps=5.0, eps_min=1.0, eta=1e-5, eps_rule="curvature")
DEFAULT_RHO = 1.0


def bsqh_optimizer(model: nn.Module, rho: float, optimizer_class: type[BSQH] = BSQH, **options: Any) -> BSQH:
    """BSQH with conv/linear weights at ``rho`` and other parameters at 0 (options override defaults).

    ``optimizer_class``: a subclass of :class:`BSQH` (the suite's broken variants use it);
    ``param_groups`` (an option): groups to use instead of :func:`sparsity_param_groups`.
    """
    opts = {**BSQH_DEFAULTS, **options}
    if opts.get("layer") == "map+activation":
        opts.setdefault("model", model)
    groups = opts.pop("param_groups", None)  # e.g. mac_param_groups(model, rho, ...)
    return optimizer_class(sparsity_param_groups(model, rho) if groups is None else groups, **opts)


def train_bsqh(model: nn.Module, dataset, rho: float, *, epochs: int, batch_size: int = 64, seed: int = 0,
               finetune_epochs: int = 0, schedule: str = "constant", callbacks=(), log=lambda s: None,
               eval_every_epoch: bool = True, device: str = "cpu", **options: Any) -> dict[str, Any]:
    """Mini-batch bSQH through the engine, then (optionally) fine-tuning with frozen zeros, rho = 0.

    With ``target_density`` (a BSQH option) the density target is 1 for the first quarter of the
    steps and ramps down over the next half, unless ``density_ramp`` is given.

    Returns ``dict(model, optimizer, history, test_acc, density, time, iterations)`` with the
    per-iteration bSQH diagnostics in ``optimizer.history``.
    """
    if options.get("target_density") is not None and "density_ramp" not in options:
        # gradual pruning: dense for the first quarter of the steps, the cubic ramp over the next half
        steps = -(-len(dataset.x_train) // batch_size) * epochs
        options["density_ramp"] = steps // 2
        options.setdefault("density_start", steps // 4)
    opt = bsqh_optimizer(model, rho, **options)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, device=str(device), progress=False,
                      schedule=schedule, eval_every_epoch=eval_every_epoch)
    t0 = time.perf_counter()
    res = fit(model, dataset, cfg, optimizer=opt, callbacks=callbacks, log=log)
    history = list(res.history)
    if finetune_epochs:
        freeze_sparsity(model)
        tune = bsqh_optimizer(model, 0.0, **{k: v for k, v in options.items()
                                             if k not in ("target_density", "density_ramp", "density_start",
                                                          "param_groups")})
        res = fit(model, dataset, TrainConfig(epochs=finetune_epochs, batch_size=batch_size, seed=seed + 1,
                                              device=str(device), progress=False, schedule=schedule,
                                              eval_every_epoch=eval_every_epoch),
                  optimizer=tune, log=log)
        history += res.history
    elapsed = time.perf_counter() - t0
    density = weight_density(model)
    test_acc = history[-1].get("test_acc")
    if test_acc is None and len(dataset.x_test):
        test_acc = evaluate(model, dataset.x_test, dataset.y_test)
    return dict(model=model, optimizer=opt, history=history, test_acc=test_acc,
                density=density, time=elapsed, iterations=opt.run_state["iteration"])


def full_batch_bsqh(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float, *, iterations: int,
                    audit: bool = True, device: str | torch.device = "cpu", **options: Any) -> dict[str, Any]:
    """bSQH in full-batch mode on ``(x, y)``: returns the optimizer and the wall time of each iteration.

    With ``audit`` the optimizer carries a full-batch :class:`DecreaseAudit` (one extra no-grad
    forward per iteration): ``certificate(model, optimizer=result["optimizer"])`` then checks the
    decrease with recomputed ``J``.
    """
    device = torch.device(device)
    model.to(device)
    x, y = x.to(device), y.to(device)
    options.setdefault("reuse_trial", True)
    opt = bsqh_optimizer(model, rho, audit=DecreaseAudit(full_batch=True) if audit else None, **options)
    closure = full_batch_closure(model, opt, x, y)
    times, t0 = [], time.perf_counter()
    for _ in range(iterations):
        opt.step(closure)
        times.append(time.perf_counter() - t0)
        if opt.run_state["stopped"]:
            break
    return dict(model=model, optimizer=opt, times=times)


def full_batch_closure(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """The closure of a full-batch bSQH step: ``closure(backward=True)`` zeroes the gradients, returns the mean
    cross-entropy of ``model`` on ``(x, y)`` and back-propagates it when ``backward``."""

    def closure(backward: bool = True) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
            return loss.detach()
        return loss  # un-detached when autograd is on: reuse_trial back-propagates the accepted trial

    return closure


def make_bsqh_trainable(arch: type[nn.Module]):
    """A ``MODELS`` factory: ``(input_shape, num_classes, rho=DEFAULT_RHO, audit=True, **bsqh_options) -> Trainable``.

    With ``audit`` (default) the optimizer carries a :class:`DecreaseAudit` (two extra no-grad
    forwards per step) and the Trainable's certificate reports the recomputed decrease of the last
    run; without a run (or after ``proxnets eval`` loads weights only) it reports the exact zeros.
    """

    def factory(input_shape, num_classes, rho: float = DEFAULT_RHO, epochs: int = 5, batch_size: int = 64,
                audit: bool = True, **options):
        model = arch(tuple(input_shape), num_classes)
        built: dict[str, BSQH] = {}

        def make_optimizer(params) -> BSQH:
            built["optimizer"] = bsqh_optimizer(model, rho, audit=DecreaseAudit() if audit else None, **options)
            return built["optimizer"]

        def cert(m: nn.Module, x: torch.Tensor) -> list:
            opt = built.get("optimizer")
            # the record belongs to this model's run only
            owned = opt is not None and m is model
            return certificate(m, x, optimizer=opt if owned else None)

        return Trainable(model=model, config=TrainConfig(epochs=epochs, batch_size=batch_size),
                         optimizer=make_optimizer, certificate=cert)

    factory.__doc__ = f"{arch.__name__} trained by bSQH with an L0 cost rho (weights only)."
    return factory


MODELS = {"lenet5-bsqh": make_bsqh_trainable(LeNet5), "smallcnn-bsqh": make_bsqh_trainable(SmallLeNet5)}
