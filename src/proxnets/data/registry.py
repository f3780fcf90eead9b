"""``load_dataset(name)``: the one entry point for every dataset."""

from __future__ import annotations

import os
from pathlib import Path

from proxnets.data.dataset import ImageDataset
from proxnets.data.embedded import load_digits, load_mnist5k

__all__ = ["DATASETS", "VARIANTS", "load_dataset", "default_data_dir"]

BASES = {"mnist5k": "embedded", "digits": "embedded", "mnist": "files", "fashion-mnist": "files", "cifar10": "files"}
VARIANTS = ("rot", "rand", "img", "img-rot")
DATASETS = list(BASES) + [f"{b}-{v}" for b in ("mnist5k", "mnist", "fashion-mnist") for v in VARIANTS] + list(VARIANTS)


def default_data_dir() -> Path:
    """``$PROXNETS_DATA`` or ``~/.cache/proxnets/data``."""
    return Path(os.environ.get("PROXNETS_DATA", Path.home() / ".cache" / "proxnets" / "data"))


def _split_name(name: str) -> tuple[str, str | None]:
    if name in VARIANTS:
        return "mnist5k", name
    for v in sorted(VARIANTS, key=len, reverse=True):
        if name.endswith("-" + v) and name[: -len(v) - 1] in BASES:
            return name[: -len(v) - 1], v
    return name, None


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    download: bool = False,
    n_train: int | None = None,
    n_test: int | None = None,
) -> ImageDataset:
    """Load dataset ``name`` (see :data:`DATASETS`) as an :class:`ImageDataset`.

    ``seed`` fixes the embedded sets' split and the variants' randomness; ``n_train``/``n_test``
    take stratified subsets. File-based sets are read from ``data_dir`` (default
    :func:`default_data_dir`) and downloaded there first when ``download`` is true.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a dataset name (str), got {name!r}")
    base, variant = _split_name(name.lower())
    if base not in BASES or (variant and base not in ("mnist5k", "mnist", "fashion-mnist")):
        raise ValueError(f"name: expected one of {DATASETS}, got {name!r}")
    if base == "mnist5k":
        ds = load_mnist5k(seed=0)
    elif base == "digits":
        ds = load_digits(seed=0)
    else:
        from proxnets.data.files import load_from_files

        ds = load_from_files(base, Path(data_dir) if data_dir is not None else default_data_dir(), download=download)
    if n_train is not None or n_test is not None:
        ds = ds.subset(n_train, n_test, seed=seed)
    if variant is not None:
        from proxnets.data.variants import make_variant

        ds = make_variant(ds, variant, seed=seed)
    return ds
