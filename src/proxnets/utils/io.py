"""Atomic, safe file I/O.

Everything the library writes (checkpoints, reports, JSON, images) goes through a temporary file
in the destination directory followed by ``os.replace``, so a reader never sees a half-written
file, and an interrupted write leaves the previous version intact. Loading never unpickles
arbitrary objects: tensors come back through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_UMASK = os.umask(0)
os.umask(_UMASK)

__all__ = ["atomic_path", "write_text", "write_json", "read_json", "save_state", "load_state", "append_jsonl",
           "check_plain", "validate_metadata", "MAX_DEPTH", "MAX_ITEMS"]

MAX_DEPTH = 64  # nesting of containers in a loaded file (a checkpoint nests ~6 deep)
MAX_ITEMS = 5_000_000  # container entries visited (a checkpoint's history holds ~20 per epoch)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would have
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_jsonable, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record per line; a line is written with a single ``write`` call."""
    line = json.dumps(record, default=_jsonable) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()


def save_state(path: str | os.PathLike, state: dict) -> Path:
    """Atomically save a (nested) dict of tensors and plain Python values."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def check_plain(name: str, obj: Any, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> Any:
    """Refuse a loaded structure that is self-referencing, nested deeper than ``max_depth`` or
    holds more than ``max_items`` container entries (shared sub-containers counted each time they
    are reached, so a "billion laughs" structure is refused too). Tensors and scalars are leaves."""
    budget = [max_items]

    def walk(o: Any, depth: int, path: tuple[int, ...]) -> None:
        if isinstance(o, (dict, list, tuple, set, frozenset)):
            if id(o) in path:
                raise ValueError(f"{name}: expected a finite structure, got a self-referencing {type(o).__name__}")
            if depth >= max_depth:
                raise ValueError(f"{name}: expected containers nested at most {max_depth} deep, got deeper")
            budget[0] -= len(o)
            if budget[0] < 0:
                raise ValueError(f"{name}: expected at most {max_items} entries in all, got more")
            inner = path + (id(o),)
            for v in (o.items() if isinstance(o, dict) else o):
                if isinstance(o, dict):
                    walk(v[0], depth + 1, inner)
                    v = v[1]
                walk(v, depth + 1, inner)

    walk(obj, 0, ())
    return obj


def validate_metadata(name: str, meta: Any, spec: dict[str, tuple]) -> dict:
    """Check a metadata dict read from a file (a model config, checkpoint counters) against ``spec``.

    ``spec`` maps each admitted key to ``(int, low, high)``, ``(float, low, high)``, ``(bool,)`` or
    ``(str, choices)`` (``choices`` None: any string up to 200 characters). Unknown keys, wrong
    types and values outside the caps raise ``ValueError("<name>.<key>: expected ..., got ...")``;
    missing keys are left to the caller's defaults. Returns ``meta``.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: expected a dict of metadata, got {type(meta).__name__}")
    for key, value in meta.items():
        if key not in spec:
            raise ValueError(f"{name}: expected keys among {sorted(spec)}, got {key!r}")
        kind, *limits = spec[key]
        where = f"{name}.{key}"
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected a bool, got {value!r}")
        elif kind in (int, float):
            ok = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
            low, high = limits
            if not ok or (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
                want = "an integer" if kind is int else "a finite number"
                raise ValueError(f"{where}: expected {want} in [{low}, {high}], got {value!r}"[:300])
        elif kind is str:
            choices = limits[0] if limits else None
            if not isinstance(value, str) or len(value) > 200 or (choices is not None and value not in choices):
                want = f"one of {list(choices)}" if choices is not None else "a string"
                raise ValueError(f"{where}: expected {want}, got {value!r}"[:300])
        else:  # pragma: no cover - a programming error in the spec
            raise TypeError(f"spec[{key!r}]: expected int, float, bool or str, got {kind!r}")
    return meta


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a state saved by :func:`save_state` without unpickling arbitrary objects; the result
    passes :func:`check_plain` (no self-referencing or absurdly large structure)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: expected an existing file, got {str(path)!r}")
    if _TORCH_VERSION < (2, 6):  # CVE-2025-32434: weights_only=True could still execute code
        raise RuntimeError(f"torch: expected >= 2.6 to load files safely (CVE-2025-32434), got {torch.__version__}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, not a torch file, or a pickle carrying arbitrary objects
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint: expected a tensors-only file written by proxnets, got {str(path)!r} "
            f"({type(e).__name__}: {first[:200]})"
        ) from None
    return check_plain(f"checkpoint {str(path)!r}", state)
