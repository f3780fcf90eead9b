"""Multi-process data-parallel training through ``torch.distributed`` (DDP).

Launch any training script with ``torchrun --nproc_per_node=N script.py``; the engine reads
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment, joins the process group (gloo on
CPU, NCCL on CUDA) and wraps the model in ``DistributedDataParallel``. Every rank draws the same
global batch (the permutation is seeded) and takes its own slice, with its loss weighted by its
share so that DDP's gradient average equals the single-process gradient of the global batch.
"""

from __future__ import annotations

import atexit
import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "wrap_model", "unwrap", "local_slice", "all_reduce_mean", "barrier"]


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group if launched by torchrun; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        # a group left alive at interpreter exit can abort the process (gloo: "terminate called
        # without an active exception") after training has finished; we opened it, we close it
        atexit.register(_destroy)
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(rank, world, local)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    if not info.enabled:
        return model
    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def local_slice(indices: torch.Tensor, info: DistInfo) -> tuple[torch.Tensor, float]:
    """This rank's part of a global batch, and the weight ``world * n_local / n_global`` of its mean loss."""
    if not info.enabled:
        return indices, 1.0
    part = torch.tensor_split(indices, info.world_size)[info.rank]
    return part, info.world_size * len(part) / max(len(indices), 1)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size
