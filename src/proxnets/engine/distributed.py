"""Multi-process data-parallel training through ``torch.distributed`` (DDP).

Launch any training script with ``torchrun --nproc_per_node=N script.py``; the engine reads
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment, joins the process group (gloo on
CPU, NCCL on CUDA) and wraps the model in ``DistributedDataParallel``. Every rank draws the same
global batch (the permutation is seeded) and takes its own slice, with its loss weighted by its
share so that DDP's gradient average equals the single-process gradient of the global batch.

Faults: the process group gets a timeout (``TrainConfig.ddp_timeout``, CLI ``--ddp-timeout``;
torch's default of 30 minutes lets one hung rank hold the job), after which a rank waiting in a
collective fails with a message naming the timeout; and every worker dies with its launcher
(``PR_SET_PDEATHSIG`` on Linux, plus a parent-pid watchdog everywhere), so killing ``torchrun``
leaves no orphans training on.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import datetime
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "die_with_parent", "collective_failure", "wrap_model", "unwrap", "local_slice", "all_reduce_mean", "barrier"]


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


def init_distributed(device: torch.device, timeout: float = 300.0) -> DistInfo:
    """Join the process group if launched by torchrun; a no-op for a single process.

    ``timeout``: seconds a collective waits for the other ranks before failing this one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        die_with_parent()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout)))
        global _TIMEOUT
        _TIMEOUT = float(timeout)
        # a group left alive at interpreter exit can abort the process (gloo: "terminate called
        # without an active exception") after training has finished; we opened it, we close it
        atexit.register(_destroy)
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(rank, world, local)


_TIMEOUT = 300.0
_WATCHED: list[int] = []
PR_SET_PDEATHSIG = 1


def die_with_parent(poll: float = 1.0) -> None:
    """End this process when its parent (the launcher) dies.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, the kernel's own notice. Everywhere (and as a
    second line on Linux, where the notice follows the parent *thread*): a daemon thread that
    polls ``os.getppid()`` and exits the process when it changes (the orphan is re-parented).
    """
    parent = os.getppid()
    if parent <= 1 or _WATCHED:
        return
    _WATCHED.append(parent)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog below still works
        if os.getppid() != parent:  # died before the notice was armed
            os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll)
            if os.getppid() != parent:
                sys.stderr.write(f"proxnets: launcher (pid {parent}) died; worker {os.getpid()} exits\n")
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=watch, name="proxnets-parent-watchdog", daemon=True).start()


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


def _collective_failed(what: str, info: DistInfo, e: Exception) -> RuntimeError:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return RuntimeError(f"ddp: rank {info.rank} of {info.world_size} failed in {what}: another rank stopped, died or "
                        f"hung past the timeout of {_TIMEOUT:g} s (--ddp-timeout) ({first})")


def collective_failure(e: BaseException) -> str | None:
    """A one-line reading of ``e`` if it is a failed collective (a timeout or a lost peer), else None.

    DDP's gradient all-reduce runs inside ``backward``: its timeout surfaces there as gloo's or
    NCCL's own RuntimeError, which the CLI turns into this line.
    """
    text = str(e)
    backend_error = getattr(dist, "DistBackendError", ())
    if not (isinstance(e, backend_error) if backend_error else False) and not any(
            k in text for k in ("Timed out waiting", "gloo", "NCCL", "Connection closed by peer", "Connection reset")):
        return None
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    return str(_collective_failed("a collective", info, e))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        try:
            dist.barrier()
        except RuntimeError as e:  # gloo/NCCL timeouts and lost peers (DistBackendError is a RuntimeError)
            raise _collective_failed("barrier", info, e) from e


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    try:
        dist.all_reduce(t)
    except RuntimeError as e:
        raise _collective_failed("all_reduce", info, e) from e
    return float(t.item()) / info.world_size
