"""Run-time settings for small CPU workloads.

Solvers, routing and small models call many small operations in sequence; on a shared CPU, intra-op
parallelism then costs more in thread synchronization than it gains (measured: a (1, 4, 6, 6)
convolution at 2 threads on a loaded 2-core machine took ~35 ms, at 1 thread ~0.01 ms).
:func:`intra_op_threads` sets the thread count for a block and restores it afterwards.
"""

from __future__ import annotations

import contextlib

import torch

from proxnets.utils.validation import check_int

__all__ = ["intra_op_threads"]


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Within the block, ``torch.get_num_threads() == n``; restored on exit."""
    check_int("n", n, low=1)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
