"""Full datasets from their standard distribution files.

Layout of the data directory (``--data-dir`` or ``$PROXNETS_DATA``)::

    <data_dir>/mnist/          train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
                               t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
    <data_dir>/fashion-mnist/  (the same four names)
    <data_dir>/cifar10/        cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin
                               or cifar-10-batches-py/{data_batch_1..5,test_batch}
                               or one of the archives cifar-10-binary.tar.gz / cifar-10-python.tar.gz

IDX files may also be uncompressed (same names without ``.gz``); their header is checked against
the file size and a cap before anything beyond it is decompressed. The CIFAR-10 python pickles are
read through a restricted unpickler that admits dicts, lists, strings, bytes and plain numeric
numpy arrays only -- never arbitrary objects -- and checks each array's size before building it.
A CIFAR-10 archive is extracted only when its MD5 is the published one, member by member by our
own code (:mod:`proxnets.data.archives`). With ``download=True`` the files are fetched from their
publishers and their MD5 checksums verified; offline and missing, the error names the files and
the directory expected.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch

from proxnets.data.archives import file_md5, is_extracted, safe_extract
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
        # not downloaded (the binary one is), but verified like it when found in the data directory
        "archives": {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
                     "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
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


MAX_IDX_BYTES = 1 << 30  # 1 GiB of array data: MNIST's largest file holds 47 MB
MAX_CIFAR_FILE_BYTES = 256 << 20  # one CIFAR-10 batch is ~31 MB
GZIP_MAX_RATIO = 1032  # deflate cannot expand more than ~1032:1 (RFC 1951 block limits)


def _idx_header(fh, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    head = fh.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
        raise ValueError(f"{path}: expected an IDX file (magic 0x0000<type><ndim>), got header {head!r}")
    ndim = head[3]
    raw_dims = fh.read(4 * ndim)
    if len(raw_dims) != 4 * ndim:
        raise ValueError(f"{path}: expected {ndim} dimensions in the IDX header, got a truncated header")
    dims = struct.unpack(">" + "I" * ndim, raw_dims)
    dtype = np.dtype(_IDX_DTYPES[head[2]])
    return dtype, dims, math.prod(dims) * dtype.itemsize  # Python ints: no overflow


def read_idx(path: str | Path, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed): magic ``0x0000 <dtype> <ndim>``, big-endian dims.

    The header is read first and checked before anything else is decompressed or allocated: the
    declared size must be at most ``max_bytes``, and (uncompressed) match the file size exactly or
    (gzip) be reachable from the compressed size (deflate expands at most ~1032:1). The body is
    then streamed with a hard limit, so a lying header never costs more than the declared size.
    """
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        size = path.stat().st_size
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            dtype, dims, expected = _idx_header(fh, path)
            header = 4 + 4 * len(dims)
            if expected > max_bytes:
                raise ValueError(f"{path}: expected at most {max_bytes} data bytes (the size cap), "
                                 f"got a header declaring {expected} for dims {dims}")
            if not gz and size != header + expected:
                raise ValueError(f"{path}: expected {expected} data bytes for dims {dims}, got {size - header}")
            if gz and expected > GZIP_MAX_RATIO * size + (1 << 16):
                raise ValueError(f"{path}: expected a header consistent with the compressed size {size} B, "
                                 f"got one declaring {expected} data bytes for dims {dims}")
            body = bytearray()
            while len(body) <= expected:  # read one byte past: a longer file is an error too
                chunk = fh.read(min(1 << 20, expected + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: expected a readable IDX file, got an unreadable file ({e})") from None
    if len(body) != expected:
        got = f"more than {expected}" if len(body) > expected else str(len(body))
        raise ValueError(f"{path}: expected {expected} data bytes for dims {dims}, got {got}")
    return np.frombuffer(bytes(body), dtype=dtype).reshape(dims)


def read_cifar_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32)."""
    size = Path(path).stat().st_size
    if size == 0 or size % 3073 or size > MAX_CIFAR_FILE_BYTES:
        raise ValueError(f"{path}: expected a multiple of 3073 bytes (CIFAR-10 binary records) up to "
                         f"{MAX_CIFAR_FILE_BYTES}, got {size}")
    raw = np.fromfile(path, dtype=np.uint8, count=size)
    if raw.size != size:
        raise ValueError(f"{path}: expected {size} bytes, got {raw.size} (file changed while reading)")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


# Restricted unpickling. numpy's own reconstructors would allocate whatever shape a pickle declares
# (``_reconstruct(ndarray, (10**9,), ...)`` allocates before any check), and a dtype's state can
# declare sub-arrays or fields. So the admitted globals are replaced by stand-ins that only record
# their arguments; the real arrays are built afterwards, from bytes that are already in the file,
# after checking shape x itemsize == len(bytes) <= the cap.
_PICKLE_DTYPES = {"u1", "i1", "b1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8"}


class _DtypeStub:
    def __init__(self, code, align=False, copy=True):
        if not isinstance(code, str) or code not in _PICKLE_DTYPES:
            raise pickle.UnpicklingError(f"refused dtype {code!r}: only plain numeric dtypes are admitted")
        self.code, self.order = code, "|"

    def __setstate__(self, state):
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if (not isinstance(state, tuple) or len(state) < 5 or state[1] not in ("|", "<", ">", "=")
                or any(v is not None for v in state[2:5])):
            raise pickle.UnpicklingError("refused a dtype state with sub-arrays or fields")
        self.order = state[1]

    def build(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder("=" if self.order == "|" else self.order)


class _ArrayStub:
    def __init__(self, subtype, shape, dtype):
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError("refused an ndarray subclass: only numpy.ndarray is admitted")
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def build(self, max_bytes: int) -> np.ndarray:
        st = self.state
        if not isinstance(st, tuple) or len(st) != 5:
            raise pickle.UnpicklingError("refused an ndarray without its (version, shape, dtype, order, data) state")
        _, shape, dt, fortran, data = st
        if (not isinstance(shape, tuple) or len(shape) > 8
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"refused ndarray shape {shape!r}")
        if not isinstance(dt, _DtypeStub) or not isinstance(data, (bytes, bytearray)):
            raise pickle.UnpicklingError("refused an ndarray that is not plain numeric bytes")
        dtype = dt.build()
        n = math.prod(shape) * dtype.itemsize
        if n != len(data) or n > max_bytes:
            raise pickle.UnpicklingError(
                f"refused ndarray shape {shape} x {dtype.itemsize} B: expected it to match its {len(data)} data "
                f"bytes and the cap {max_bytes}")
        return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _latin1_encode(obj, encoding="latin1"):
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused _codecs.encode other than str -> latin1 bytes")
    return obj.encode("latin1")


class _ArraysOnly(pickle.Unpickler):
    """Admits only what CIFAR's pickles contain: builtin containers and plain numpy arrays (as stubs)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _ArrayStub, ("numpy._core.multiarray", "_reconstruct"): _ArrayStub,
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _DtypeStub, ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are admitted")


def read_cifar_py(path: str | Path, max_bytes: int = MAX_CIFAR_FILE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch (dict with b'data' (N, 3072) uint8 and b'labels'), safely: the file
    is size-capped, read into memory and unpickled by :class:`_ArraysOnly` (no arbitrary objects, no
    numpy constructor called with a declared shape); the arrays are built after their checks."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: expected a CIFAR-10 batch of at most {max_bytes} bytes, got {size}")
    try:
        d = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError) as e:
        raise ValueError(f"{path}: expected a CIFAR-10 python batch, got an unreadable pickle ({e})") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{path}: expected a CIFAR-10 batch dict with b'data' and b'labels', got {type(d).__name__}")
    data, labels = d[b"data"], d[b"labels"]
    if isinstance(data, _ArrayStub):
        try:
            data = data.build(max_bytes)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: {e}") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"shape {data.shape}, dtype {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: expected b'data' a (N, 3072) uint8 array, got {got}")
    if (not isinstance(labels, list) or len(labels) != len(data)
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10 for v in labels)):
        raise ValueError(f"{path}: expected b'labels' a list of {len(data)} integers in [0, 10)")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


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
    # An archive is extracted (after its MD5 and every member are checked, see proxnets.data.archives)
    # unless a complete extraction is marked; an interrupted one (no marker) is redone. Directories
    # placed by hand without an archive are used as they are.
    for archive, md5 in FILES["cifar10"]["archives"].items():
        if (folder / archive).is_file():
            if not is_extracted(folder / archive, folder, md5):
                safe_extract(folder / archive, folder, md5)
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


def download_dataset(name: str, data_dir: str | Path) -> Path:
    """Fetch ``name``'s files into ``<data_dir>/<name>/`` and verify their MD5 checksums."""
    if name not in FILES:
        raise ValueError(f"name: expected one of {sorted(FILES)}, got {name!r}")
    folder = Path(data_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = FILES[name]
    for fname, md5 in spec["md5"].items():
        target = folder / fname
        if target.is_file() and file_md5(target) == md5:
            continue
        try:
            with urllib.request.urlopen(spec["url"] + fname, timeout=60) as resp, atomic_path(target) as tmp:
                with open(tmp, "wb") as out:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                got = file_md5(tmp)
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
