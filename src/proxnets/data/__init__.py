"""Real datasets, one entry point: :func:`load_dataset`.

Embedded (offline): ``mnist5k``, ``digits``. MNIST variants (Larochelle et al. 2007) of any
MNIST-like set: ``<base>-rot``, ``<base>-rand``, ``<base>-img``, ``<base>-img-rot`` (a bare
``rot`` etc. means ``mnist5k-rot``). From standard files in a data directory: ``mnist``,
``fashion-mnist``, ``cifar10``. Natural photographs for restoration: :mod:`proxnets.data.images`.
"""

from proxnets.data.dataset import ImageDataset, stratified_split
from proxnets.data.registry import DATASETS, load_dataset

__all__ = ["ImageDataset", "DATASETS", "load_dataset", "stratified_split"]
