"""Reusable scratch buffers: one tensor per name, grown when too small, handed out as contiguous views.

Chunked loops allocate the same few chunk-sized temporaries for every chunk; fresh ones above the
allocator's mmap threshold come from new pages (glibc returns large freed blocks to the system, and
the benchmarks fix that threshold so that peak memory is live memory), so every chunk pays page
faults. A ``workspace`` dict kept for the duration of one loop (never returned to a caller that keeps
what it was given) reuses them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["workspace_buffer"]


def workspace_buffer(workspace: dict | None, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """A contiguous ``shape`` view of the reusable buffer ``workspace[name]`` (grown when too small), or None.

    The buffer has ``like``'s dtype and device (a new one replaces it when they differ); ``None``
    without a workspace, so that callers can write ``out=workspace_buffer(...)`` either way.
    Measured uses: chunked capsule routing (~50,000 page faults per call of its benchmark's layer) and
    the streamed CCNN features (:mod:`proxnets.convex.features`).
    """
    if workspace is None:
        return None
    n = math.prod(shape)
    buf = workspace.get(name)
    if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
        buf = workspace[name] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)
