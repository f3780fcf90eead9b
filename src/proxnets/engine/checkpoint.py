"""Checkpoints that lose nothing: model, optimizer, step counters, RNG states, history.

Written atomically (temporary file + rename, :func:`proxnets.utils.io.save_state`), read with
``torch.load(weights_only=True)``: a checkpoint holds tensors and plain Python values only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from proxnets.engine.device import rng_state, set_rng_state
from proxnets.utils.io import load_state, save_state

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint", "restore"]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    step_in_epoch: int,
    global_step: int,
    history: list[dict],
    config: dict,
    epoch_sums: dict | None = None,
) -> Path:
    return save_state(
        path,
        {
            "format_version": FORMAT_VERSION,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "rng": rng_state(),
            "history": history,
            "config": config,
            "epoch_sums": epoch_sums or {},
        },
    )


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    state = load_state(path, map_location=map_location)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint: expected format_version {FORMAT_VERSION}, got {state.get('format_version')!r} in {path}"
        )
    return state


def restore(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load model (and optimizer) state and the RNG states saved with them."""
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
