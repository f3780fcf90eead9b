"""DDP faults: a stopped rank fails the others within the timeout; workers die with their launcher."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_fault.py")
pytestmark = [pytest.mark.distributed, pytest.mark.skipif(sys.platform != "linux", reason="signals and prctl: Linux")]


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(cond, limit: float, what: str) -> None:
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {limit} s")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _steps(run: Path) -> int:
    m = run / "metrics.jsonl"
    return len(m.read_text().splitlines()) if m.exists() else 0


@pytest.mark.slow  # ~25 s on 2 loaded cores: two interpreters start, train, then one waits out the timeout
def test_a_stopped_rank_fails_the_others_within_the_timeout(tmp_path):
    run, port, timeout = tmp_path / "run", _free_port(), 4.0
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(run), str(timeout)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)))
             for r in (0, 1)]
    try:
        _wait_for(lambda: _steps(run) >= 3, 120, "training start")
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = procs[0].communicate(timeout=120)  # torch's default would wait 30 minutes
        waited = time.monotonic() - t0
        assert procs[0].returncode != 0, out[-3000:]
        assert "Timed out waiting 4000ms" in out, out[-3000:]
        print(f"survivor exited {procs[0].returncode} after {waited:.1f} s (timeout {timeout} s)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_workers_exit_when_the_launcher_dies(tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), str(run),
         "60"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pids: list[int] = []
    try:
        _wait_for(lambda: _steps(run) >= 3, 120, "training start")
        pids = [int(Path(f"{run}.pid.{r}").read_text()) for r in (0, 1)]
        assert all(_alive(p) for p in pids)
        launcher.kill()  # SIGKILL: the launcher gets no chance to stop its workers
        launcher.wait()
        _wait_for(lambda: not any(_alive(p) for p in pids), 60, "workers exiting after the launcher died")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
