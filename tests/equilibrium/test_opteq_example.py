"""examples/003_opteq.py runs and every certificate it prints holds."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_example_runs_and_certifies():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "003_opteq.py")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln.strip() for ln in out.stdout.splitlines()]
    certs = [ln for ln in lines if "->" in ln]
    assert len(certs) == 4 and all("-> holds" in ln for ln in certs), out.stdout
    acc = float(next(ln for ln in lines if ln.startswith("test accuracy")).split()[2])
    assert acc > 0.8  # 2 epochs on 4000 digits; chance is 0.1
