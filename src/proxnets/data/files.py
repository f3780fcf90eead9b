"""Full datasets from their standard distribution files.

Layout of the data directory (``--data-dir`` or ``$PROXNETS_DATA``)::

    <data_dir>/mnist/          train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
                               t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
    <data_dir>/fashion-mnist/  (the same four names)
    <data_dir>/cifar10/        cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin
                               or cifar-10-batches-py/{data_batch_1..5,test_batch}
                               or one of the archives cifar-10-binary.tar.gz / cifar-10-python.tar.gz

IDX files may also be uncompressed (same names without ``.gz``). The CIFAR-10 python pickles are
read through a restricted unpickler that admits dicts, lists, strings, bytes and numpy arrays
only -- never arbitrary objects. With ``download=True`` the files are fetched from their
publishers and their MD5 checksums verified; offline and missing, the error names the files and
the directory expected.
"""

from __future__ import annotations

import gzip
import hashlib

import pickle
import struct
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from proxnets.data.dataset import ImageDataset
from proxnets.utils.io import atomic_path

__all__ = ["read_idx", "write_idx", "read_cifar_bin", "read_cifar_py", "load_from_files", "download_dataset", "FILES",
           "MissingDataError"]

IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
FILES = {
    "mnist": {
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    "fashion-mnist": {
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    },
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/",
        "md5": {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
    },
}
CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class MissingDataError(FileNotFoundError):
    """A dataset's files are not in the data directory."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed): magic ``0x0000 <dtype> <ndim>``, big-endian dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: expected a readable IDX file, got an unreadable file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: expected an IDX file (magic 0x0000<type><ndim>), got header {raw[:4]!r}")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: expected {expected} data bytes for dims {dims}, got {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def read_cifar_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise ValueError(f"{path}: expected a multiple of 3073 bytes (CIFAR-10 binary records), got {raw.size}")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


class _ArraysOnly(pickle.Unpickler):
    """Admits only what CIFAR's pickles contain: builtin containers and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are admitted")


def read_cifar_py(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch (dict with b'data' (N, 3072) uint8 and b'labels'), safely."""
    with open(path, "rb") as fh:
        d = _ArraysOnly(fh, encoding="bytes").load()
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{path}: expected a CIFAR-10 batch dict with b'data' and b'labels', got {type(d).__name__}")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    return data.reshape(-1, 3, 32, 32), np.asarray(d[b"labels"], dtype=np.int64)


def _missing(name: str, folder: Path, wanted: list[str]) -> MissingDataError:
    return MissingDataError(
        f"dataset {name!r}: expected files {wanted} in {folder}, but they are missing. Place the standard "
        f"distribution files there (set --data-dir or $PROXNETS_DATA to choose the directory), or pass "
        f"--download / download=True where a network is available."
    )


def _find_idx(folder: Path, stem: str) -> Path | None:
    for cand in (folder / f"{stem}.gz", folder / stem):
        if cand.is_file():
            return cand
    return None


def _load_idx_set(name: str, folder: Path) -> ImageDataset:
    paths = {k: _find_idx(folder, v) for k, v in IDX_NAMES.items()}
    missing = [IDX_NAMES[k] + ".gz" for k, p in paths.items() if p is None]
    if missing:
        raise _missing(name, folder, missing)
    arr = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        x, y = arr[f"{split}_x"], arr[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"dataset {name!r}: expected {split} images (N, H, W) and N labels, got {x.shape}, {y.shape}")

    def imgs(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    return ImageDataset(name, imgs(arr["train_x"]), torch.from_numpy(arr["train_y"].astype(np.int64)),
                        imgs(arr["test_x"]), torch.from_numpy(arr["test_y"].astype(np.int64)), 10, CLASSES[name])


def _load_cifar(folder: Path) -> ImageDataset:
    bin_dir, py_dir = folder / "cifar-10-batches-bin", folder / "cifar-10-batches-py"
    if not bin_dir.is_dir() and not py_dir.is_dir():
        for archive in ("cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"):
            if (folder / archive).is_file():
                with tarfile.open(folder / archive) as tar:
                    tar.extractall(folder, filter="data")
                break
    if bin_dir.is_dir():
        reader, files = read_cifar_bin, {s: [bin_dir / f"{b}.bin" for b in bs] for s, bs in
                                         (("train", CIFAR_TRAIN), ("test", CIFAR_TEST))}
    elif py_dir.is_dir():
        reader, files = read_cifar_py, {s: [py_dir / b for b in bs] for s, bs in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST))}
    else:
        raise _missing("cifar10", folder, ["cifar-10-batches-bin/ (or cifar-10-batches-py/, or cifar-10-binary.tar.gz)"])
    missing = [str(p.relative_to(folder)) for ps in files.values() for p in ps if not p.is_file()]
    if missing:
        raise _missing("cifar10", folder, missing)
    out = {}
    for split, paths in files.items():
        xs, ys = zip(*(reader(p) for p in paths))
        out[split] = (torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0),
                      torch.from_numpy(np.concatenate(ys)))
    return ImageDataset("cifar10", *out["train"], *out["test"], 10, CLASSES["cifar10"])


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_dataset(name: str, data_dir: str | Path) -> Path:
    """Fetch ``name``'s files into ``<data_dir>/<name>/`` and verify their MD5 checksums."""
    if name not in FILES:
        raise ValueError(f"name: expected one of {sorted(FILES)}, got {name!r}")
    folder = Path(data_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = FILES[name]
    for fname, md5 in spec["md5"].items():
        target = folder / fname
        if target.is_file() and _md5(target) == md5:
            continue
        try:
            with urllib.request.urlopen(spec["url"] + fname, timeout=60) as resp, atomic_path(target) as tmp:
                with open(tmp, "wb") as out:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                got = _md5(tmp)
                if got != md5:
                    raise ValueError(f"{fname}: expected MD5 {md5}, got {got} (download corrupted; nothing kept)")
        except OSError as e:
            raise MissingDataError(
                f"dataset {name!r}: could not download {spec['url'] + fname} ({e}); place the file in {folder}"
            ) from None
    return folder


def load_from_files(name: str, data_dir: Path, download: bool = False) -> ImageDataset:
    folder = data_dir / name
    if download:
        download_dataset(name, data_dir)
    if name == "cifar10":
        return _load_cifar(folder)
    return _load_idx_set(name, folder)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzip-compressed when the name ends in ``.gz`` (for tests)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.tobytes()
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".gz":
            with gzip.open(tmp, "wb") as fh:
                fh.write(payload)
        else:
            tmp.write_bytes(payload)
    return path
