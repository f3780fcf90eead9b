"""Run-time settings for small CPU workloads.

Solvers, routing and small models call many small operations in sequence; on a shared CPU, intra-op
parallelism then costs more in thread synchronization than it gains (measured: a (1, 4, 6, 6)
convolution at 2 threads on a loaded 2-core machine took ~35 ms, at 1 thread ~0.01 ms).
:func:`intra_op_threads` sets the thread count for a block and restores it afterwards.

The library itself sets nothing global: importing proxnets changes neither ``os.environ`` nor
torch's thread count (the ``proxnets`` command line sets ``OMP_WAIT_POLICY=PASSIVE`` for its own
process only). :func:`thread_warnings` says when the settings of a process will hurt on this
machine; ``proxnets info`` prints them, and the README's "Performance" section says what to set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import torch

from proxnets.utils.validation import check_int

__all__ = ["intra_op_threads", "thread_warnings", "available_cores"]


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


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def thread_warnings(
    env: Mapping[str, str] | None = None,
    *,
    threads: int | None = None,
    cores: int | None = None,
    load: float | None = None,
) -> list[str]:
    """Why the thread settings of a process will make small CPU workloads slow here (empty: none).

    - more intra-op threads than cores: threads wait for each other at every operation.
    - other work competing for the cores (1-minute load average + threads > cores) and
      ``OMP_WAIT_POLICY`` not ``PASSIVE``: idle OpenMP threads spin after each operation and take
      the cores the working threads need. Measured on a 2-core machine with one other busy process
      (``benchmarks/bench_threads.py --busy 1``): a small CNN step 189 ms with torch's defaults,
      12 ms with PASSIVE. On an idle machine spinning is faster (3.0 vs 8.0 ms), hence no warning then.
    - under that competition, more threads than idle cores.

    ``env`` defaults to ``os.environ``, ``threads`` to ``torch.get_num_threads()``, ``cores`` to
    :func:`available_cores`, ``load`` to ``os.getloadavg()[0]``; an unknown load counts as competing.
    """
    env = os.environ if env is None else env
    threads = torch.get_num_threads() if threads is None else threads
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = None
    out = []
    if threads > cores:
        out.append(f"torch uses {threads} threads on {cores} core(s): call torch.set_num_threads({cores}) "
                   f"or set OMP_NUM_THREADS={cores}")
    competing = load is None or load + threads > cores + 0.5
    if threads == 1 or not competing:
        return out
    where = "the load is unknown" if load is None else f"this machine is loaded (1-min load {load:.1f} on {cores} cores)"
    policy = env.get("OMP_WAIT_POLICY", "")
    if policy.upper() != "PASSIVE":
        out.append(f"{where} and OMP_WAIT_POLICY is {policy or 'unset'}: idle OpenMP threads spin and take the "
                   "working threads' cores (measured 15x slower small steps); in your own scripts export "
                   "OMP_WAIT_POLICY=PASSIVE before Python starts (the proxnets CLI sets it for itself; README "
                   "'Performance')")
    if load is not None and threads <= cores:
        idle = max(int(cores - load), 1)
        if threads > idle:
            out.append(f"{where}: {threads} torch threads will wait for each other; small models may run faster "
                       f"with torch.set_num_threads({idle})")
    return out
