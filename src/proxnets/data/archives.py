"""Extracting an untrusted tar archive without trusting it (nor the interpreter's tar filter).

:func:`safe_extract` does, in this order:

1. the archive's MD5 must equal the one we know (a different file is never opened as a tar);
2. every member is checked before anything is written: regular files and directories only (no
   symbolic or hard links, devices, FIFOs), a relative name without ``..`` whose resolved path
   stays inside the extraction directory, at most ``max_members`` members and ``max_bytes`` bytes;
3. members are written one by one into a fresh temporary directory next to the target, by our
   own code (``O_EXCL | O_NOFOLLOW``, our own permissions, never the archive's);
4. the top-level entries are moved into place, then a marker file holding the MD5 is written
   **last**: an extraction interrupted at any point has no marker and is redone on the next call.

Python's ``tarfile`` is used only to parse headers and stream member contents; its
``extract``/``extractall`` are never called (CVE-2025-4517: ``filter="data"`` was bypassed by
symlink chains before Python 3.11.13 / 3.12.11 / 3.13.4).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tarfile
import tempfile
from pathlib import Path

__all__ = ["safe_extract", "is_extracted", "file_md5", "UnsafeArchiveError"]

MAX_MEMBERS = 10_000
MAX_BYTES = 2 << 30  # 2 GiB unpacked: CIFAR-10's archives unpack to ~180 MB


class UnsafeArchiveError(ValueError):
    """An archive that fails a check: wrong checksum, a link, a path escaping the target, too large."""


def file_md5(path: str | os.PathLike) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _marker(archive: Path, target: Path) -> Path:
    return target / f".{archive.name}.extracted"


def is_extracted(archive: str | os.PathLike, target: str | os.PathLike, md5: str) -> bool:
    """True when ``archive`` (with this ``md5``) was extracted completely into ``target``."""
    m = _marker(Path(archive), Path(target))
    return m.is_file() and not m.is_symlink() and m.read_text(encoding="ascii", errors="replace").strip() == md5


def _check_member(m: tarfile.TarInfo, root: Path) -> str:
    """The member's normalized relative name, or an UnsafeArchiveError naming it."""
    name = m.name
    if not (m.isfile() or m.isdir()):  # isfile: REGTYPE/AREGTYPE/CONTTYPE; links, devices, FIFOs refused
        kind = ("symbolic link" if m.issym() else "hard link" if m.islnk() else "FIFO" if m.isfifo()
                else "device" if m.isdev() else f"type {m.type!r}")
        raise UnsafeArchiveError(f"archive member {name!r}: expected a regular file or directory, got a {kind}")
    if not name or "\x00" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"archive member {name!r}: expected a relative path, got an absolute one")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r}: expected a path inside the target, got one with '..'")
    rel = posixpath.join(*parts)
    dest = (root / rel).resolve()
    if dest != root and root not in dest.parents:
        raise UnsafeArchiveError(f"archive member {name!r}: expected a path inside the target, got {dest}")
    return rel


def safe_extract(
    archive: str | os.PathLike,
    target: str | os.PathLike,
    md5: str,
    *,
    max_members: int = MAX_MEMBERS,
    max_bytes: int = MAX_BYTES,
) -> list[Path]:
    """Extract ``archive`` into ``target`` after verifying ``md5`` and every member (see module doc).

    Returns the top-level paths placed in ``target``. Existing top-level entries of the same names (a
    previous, incomplete extraction) are replaced; :func:`is_extracted` tells whether to call it.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise FileNotFoundError(f"archive: expected an existing file, got {str(archive)!r}")
    got = file_md5(archive)
    if got != md5:
        raise UnsafeArchiveError(
            f"archive {archive.name}: expected MD5 {md5}, got {got} (not the published file; nothing extracted)")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, mode="r:*") as tar:
        tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".partial", dir=target))
        try:
            root = tmp.resolve()
            total, count, tops = 0, 0, []
            members: list[tuple[tarfile.TarInfo, str]] = []
            for m in tar:  # headers only: check all before writing anything
                count += 1
                if count > max_members:
                    raise UnsafeArchiveError(f"archive {archive.name}: expected at most {max_members} members, got more")
                rel = _check_member(m, root)
                total += max(m.size, 0)
                if total > max_bytes:
                    raise UnsafeArchiveError(
                        f"archive {archive.name}: expected at most {max_bytes} unpacked bytes, got more")
                members.append((m, rel))
                top = rel.split("/")[0]
                if top not in tops:
                    tops.append(top)
            for m, rel in members:
                dest = root / rel
                if m.isdir():
                    dest.mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                if dest.parent.resolve() != dest.parent or dest.parent.is_symlink():  # never: we create no links
                    raise UnsafeArchiveError(f"archive member {m.name!r}: expected a path inside the target")
                src = tar.extractfile(m)
                if src is None:
                    raise UnsafeArchiveError(f"archive member {m.name!r}: expected file contents, got none")
                try:
                    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                except FileExistsError:
                    raise UnsafeArchiveError(f"archive member {m.name!r}: expected each file once, got a duplicate") from None
                with os.fdopen(fd, "wb") as out:
                    written = 0
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > m.size:
                            raise UnsafeArchiveError(f"archive member {m.name!r}: more data than its header says")
                        out.write(chunk)
            placed = []
            _marker(archive, target).unlink(missing_ok=True)
            for top in tops:
                final = target / top
                if final.is_symlink() or final.is_file():
                    final.unlink()
                elif final.exists():
                    shutil.rmtree(final)  # a previous, incomplete extraction (no marker)
                os.replace(root / top, final)
                placed.append(final)
            marker = _marker(archive, target)
            with open(marker, "w", encoding="ascii") as fh:  # written last: its presence means "complete"
                fh.write(md5 + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            return placed
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
