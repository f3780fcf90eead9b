"""Every script in ``examples/`` runs as a user would run it: a fresh interpreter, ``PYTHONPATH=src``.

The scripts are found by glob, so a new example is tested without touching this file. Each must
exit 0 within the timeout, print what it shows, and stay under 80 lines (the house rule for examples).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
TIMEOUT_S = 300  # each script is meant to take < ~20 s on a CPU; generous for a loaded shared machine
MAX_LINES = 80


@pytest.mark.skipif(not EXAMPLES, reason=f"no examples/*.py in {ROOT} yet")
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    lines = script.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_LINES, f"{script.name}: {len(lines)} lines, expected < {MAX_LINES}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "MPLBACKEND": "Agg"}
    try:
        # run from an empty directory: an example may rely only on the package and its embedded data
        res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script.name}: still running after {TIMEOUT_S} s")
    assert res.returncode == 0, f"{script.name} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert res.stdout.strip(), f"{script.name} printed nothing: an example says what it shows"
