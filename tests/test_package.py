"""The package as a user imports it: lazy subpackages, typed, and nothing global set behind their back."""

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner

import proxnets
from proxnets import cli
from proxnets.utils.threads import thread_warnings

SRC = str(Path(proxnets.__file__).resolve().parents[1])


def _python(code: str, env: dict) -> str:
    env = {**env, "PYTHONPATH": os.pathsep.join([SRC, env.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_import_is_lazy_and_sets_nothing_global():
    """``import proxnets`` loads no torch; importing every method package (after the third-party
    libraries it uses) changes neither the environment (OMP_WAIT_POLICY is the user's to set) nor
    torch's thread settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    out = _python(
        "import json, os, sys\n"
        "import proxnets\n"
        "lazy = 'torch' not in sys.modules and 'proxnets.stable' not in sys.modules\n"
        # third-party imports may set their own (scikit-learn sets KMP_DUPLICATE_LIB_OK): not ours
        "import torch, numpy, scipy, sklearn, skimage, matplotlib\n"
        "before = dict(os.environ)\n"
        "threads = (torch.get_num_threads(), torch.get_num_interop_threads())\n"
        "mods = [proxnets.capsules, proxnets.convex, proxnets.pmp, proxnets.opteq, proxnets.stable, proxnets.models]\n"
        "import proxnets.engine, proxnets.report.runner, proxnets.data\n"
        "print(json.dumps({'lazy': lazy, 'env': dict(os.environ) == before, 'names': [m.__name__ for m in mods],\n"
        "    'threads': threads == (torch.get_num_threads(), torch.get_num_interop_threads()),\n"
        "    'deterministic': torch.are_deterministic_algorithms_enabled(),\n"
        "    'dtype': str(torch.get_default_dtype())}))\n", env)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["lazy"], "import proxnets must not load torch or the method packages"
    assert got["env"], "importing proxnets changed os.environ"
    assert got["threads"], "importing proxnets changed torch's thread counts"
    assert not got["deterministic"] and got["dtype"] == "torch.float32"
    assert got["names"][:3] == ["proxnets.capsules", "proxnets.convex", "proxnets.pmp"]
    assert got["names"][3] in ("proxnets.opteq", "proxnets.equilibrium") and got["names"][4] == "proxnets.stable"


def test_unknown_attribute_names_the_subpackages():
    with pytest.raises(AttributeError, match="subpackages: .*'stable'"):
        proxnets.no_such_thing  # noqa: B018
    assert {"capsules", "convex", "pmp", "opteq", "stable"} <= set(dir(proxnets))


def test_py_typed_ships_with_the_package():
    assert resources.files("proxnets").joinpath("py.typed").is_file()
    pyproject = (Path(SRC).parent / "pyproject.toml")
    if pyproject.is_file():  # a source checkout: the marker is declared as package data
        assert '"py.typed"' in pyproject.read_text()


@pytest.mark.parametrize("env, threads, cores, load, expect", [
    ({}, 2, 2, 0.0, []),  # an idle machine: spinning threads cost nothing (they are faster)
    ({}, 2, 2, 1.5, ["loaded (1-min load 1.5 on 2 cores) and OMP_WAIT_POLICY is unset", "set_num_threads(1)"]),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, 2, 2, 1.0, ["OMP_WAIT_POLICY is ACTIVE", "set_num_threads(1)"]),
    ({"OMP_WAIT_POLICY": "passive"}, 2, 2, 1.0, ["set_num_threads(1)"]),
    ({}, 1, 2, 7.0, []),  # one thread: nothing spins, nothing waits
    ({"OMP_WAIT_POLICY": "PASSIVE"}, 8, 2, 0.0, ["8 threads on 2 core(s)"]),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, 4, 16, 3.0, []),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, 4, 16, 15.0, ["torch.set_num_threads(1)"]),
])
def test_thread_warnings(env, threads, cores, load, expect):
    got = thread_warnings(env, threads=threads, cores=cores, load=load)
    assert len(got) == len(expect) and all(e in g for e, g in zip(expect, got)), got


def test_info_warns_about_the_users_own_setting(monkeypatch):
    monkeypatch.setattr(cli, "_USER_OMP_WAIT_POLICY", "")
    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (1.5, 1.5, 1.5))
    monkeypatch.setattr("proxnets.utils.threads.available_cores", lambda: 2)
    res = CliRunner().invoke(cli.main, ["info"])
    assert res.exit_code == 0, res.output
    assert "warning: this machine is loaded" in res.output and "OMP_WAIT_POLICY is unset" in res.output
    assert "export OMP_WAIT_POLICY=PASSIVE" in res.output
