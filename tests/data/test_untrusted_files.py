"""Untrusted files (issue 13, items 1-2): crafted archives, IDX headers, PNG bombs, CIFAR pickles,
denoiser and checkpoint metadata. Each test is an attack that succeeded (or hung) before."""

import gzip
import io
import pickle
import struct
import tarfile
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

from proxnets.data import load_dataset
from proxnets.data import files as data_files
from proxnets.data.archives import UnsafeArchiveError, file_md5, is_extracted, safe_extract
from proxnets.data.files import read_cifar_py, read_idx
from proxnets.data.images import read_image
from proxnets.utils.io import check_plain, load_state, save_state, validate_metadata

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _member(tar, name, data=b"", **kw):
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _cifar_archive(path, n=2, seed=0):
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        _member(tar, "cifar-10-batches-bin", type=tarfile.DIRTYPE, mode=0o755)
        for b in BATCHES:
            rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1).astype(np.uint8)
            _member(tar, f"cifar-10-batches-bin/{b}.bin", rec.tobytes())
    return path


def _trust(monkeypatch, archive):
    """Make the loader accept this test archive's MD5 as the published one."""
    monkeypatch.setitem(data_files.FILES["cifar10"], "archives", {archive.name: file_md5(archive)})


def test_archive_with_wrong_checksum_is_not_extracted(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    _cifar_archive(folder / "cifar-10-binary.tar.gz")
    with pytest.raises(ValueError, match="cifar-10-binary.tar.gz: expected MD5 c32a1d4ab5d03f1284b67883e8d87530, got"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["cifar-10-binary.tar.gz"]


def _evil(path, build):
    with tarfile.open(path, "w:gz") as tar:
        build(tar)
    return path


ATTACKS = {
    # CVE-2025-4517 style: a chain of symlinks whose resolution leaves the target, then a file through it
    "symlink chain": (lambda t: (_member(t, "a", type=tarfile.SYMTYPE, linkname="."),
                                 _member(t, "a/b", type=tarfile.SYMTYPE, linkname="../.."),
                                 _member(t, "a/b/escaped", b"pwned")), "symbolic link"),
    "dot-dot path": (lambda t: _member(t, "cifar-10-batches-bin/../../escaped", b"pwned"), "'\\.\\.'"),
    "absolute path": (lambda t: _member(t, "/tmp/escaped-proxnets", b"pwned"), "absolute"),
    "hard link": (lambda t: (_member(t, "x", b"ok"), _member(t, "h", type=tarfile.LNKTYPE, linkname="/etc/passwd")),
                  "hard link"),
    "device": (lambda t: _member(t, "dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3), "device"),
    "fifo": (lambda t: _member(t, "fifo", type=tarfile.FIFOTYPE), "FIFO"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_crafted_archive_members_are_refused_and_nothing_is_written(tmp_path, monkeypatch, attack):
    build, why = ATTACKS[attack]
    folder = tmp_path / "data" / "cifar10"
    folder.mkdir(parents=True)
    archive = _evil(folder / "cifar-10-binary.tar.gz", build)
    _trust(monkeypatch, archive)  # even with a "good" checksum, the members are checked
    with pytest.raises(UnsafeArchiveError, match=why):
        load_dataset("cifar10", data_dir=tmp_path / "data")
    assert sorted(p.name for p in folder.iterdir()) == ["cifar-10-binary.tar.gz"]  # no partial dir, no marker
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "data" / "escaped").exists()


def test_archive_size_and_member_caps(tmp_path):
    archive = _cifar_archive(tmp_path / "a.tar.gz")
    with pytest.raises(UnsafeArchiveError, match="at most 3 members"):
        safe_extract(archive, tmp_path / "out", file_md5(archive), max_members=3)
    with pytest.raises(UnsafeArchiveError, match="at most 1000 unpacked bytes"):
        safe_extract(archive, tmp_path / "out", file_md5(archive), max_bytes=1000)


def test_half_extracted_archive_is_retried_and_a_complete_one_is_not(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    archive = _cifar_archive(folder / "cifar-10-binary.tar.gz")
    _trust(monkeypatch, archive)
    half = folder / "cifar-10-batches-bin"  # an extraction killed after its first file
    half.mkdir()
    (half / "data_batch_1.bin").write_bytes(b"\0" * 3073)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert is_extracted(archive, folder, file_md5(archive))
    calls = []
    monkeypatch.setattr(data_files, "safe_extract", lambda *a, **k: calls.append(a))
    load_dataset("cifar10", data_dir=tmp_path)
    assert calls == []  # marked complete: not extracted again


def _idx_gz(path, dims, body=b"", dtype=0x08):
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(bytes([0, 0, dtype, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims) + body)
    return path


def _peak(fn):
    tracemalloc.start()
    try:
        fn()
    except ValueError as e:
        err = e
    else:
        err = None
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return err, peak


def test_idx_header_is_checked_before_decompressing(tmp_path):
    # 40 MB of zeros (40 kB compressed) behind a header declaring 4e12 bytes: refused from the header
    p = _idx_gz(tmp_path / "bomb.gz", (60000, 8192, 8192), b"\0" * (40 << 20))
    err, peak = _peak(lambda: read_idx(p))
    assert err is not None and "size cap" in str(err) and peak < 8 << 20
    # a header under the cap but impossible for the compressed size
    p2 = _idx_gz(tmp_path / "liar.gz", (1000, 1000, 500))
    with pytest.raises(ValueError, match="consistent with the compressed size"):
        read_idx(p2)
    # uncompressed: header against the file size
    p3 = tmp_path / "raw"
    p3.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10**9) + b"\0" * 10)
    with pytest.raises(ValueError, match=r"expected 1000000000 data bytes for dims \(1000000000,\), got 10"):
        read_idx(p3)
    p4 = _idx_gz(tmp_path / "short.gz", (10, 10), b"\0" * 99)
    with pytest.raises(ValueError, match="expected 100 data bytes.*got 99"):
        read_idx(p4)
    p5 = _idx_gz(tmp_path / "long.gz", (10, 10), b"\0" * 101)
    with pytest.raises(ValueError, match="got more than 100"):
        read_idx(p5)


def _png(width, height, payload=b""):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("w,h", [(20000, 10000), (10000, 10000), (9000, 8000)])
def test_png_decompression_bomb_is_refused_on_every_path(tmp_path, w, h):
    # 200 Mpx: Pillow's own error; 100 Mpx: Pillow only warns; 72 Mpx: under Pillow's limits, over ours
    p = tmp_path / "bomb.png"
    p.write_bytes(_png(w, h, b"\0" * 4096))
    err, peak = _peak(lambda: read_image(p))
    assert err is not None and "pixels" in str(err) and str(err).startswith("path: expected")
    assert peak < 16 << 20


def test_png_small_limit_and_normal_image(tmp_path):
    p = tmp_path / "ok.png"
    p.write_bytes(_png(4, 3, b"".join(b"\0" + bytes([10 * i] * 4) for i in range(3))))
    assert read_image(p).shape == (1, 3, 4)
    with pytest.raises(ValueError, match="at most 10 pixels, got 4 x 3 = 12"):
        read_image(p, max_pixels=10)


def _reconstruct_pickle(shape):
    """An ~90-byte pickle whose _reconstruct call declares ``shape`` (numpy would allocate it)."""
    out = io.BytesIO()
    out.write(b"\x80\x02}q\x00(C\x04data")
    out.write(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
    out.write(b"J" + struct.pack("<i", shape) + b"\x85C\x01B\x87R")  # (shape,) , b'B' -> REDUCE
    out.write(b"C\x06labels]u.")
    return out.getvalue()


def test_cifar_pickle_declaring_a_huge_array_allocates_nothing(tmp_path):
    p = tmp_path / "data_batch_1"
    p.write_bytes(_reconstruct_pickle(150_000_000))
    assert len(p.read_bytes()) < 100
    err, peak = _peak(lambda: read_cifar_py(p))
    assert err is not None and peak < 8 << 20


def test_cifar_pickle_refuses_objects_subarray_dtypes_and_lying_shapes(tmp_path):
    p = tmp_path / "b"

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    p.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="refused to load builtins.print"):
        read_cifar_py(p)
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), dtype=object), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(ValueError, match="refused dtype 'O8'"):
        read_cifar_py(p)
    p.write_bytes(pickle.dumps({b"data": np.dtype((np.uint8, (10**6,))), b"labels": []}, protocol=2))  # sub-array
    with pytest.raises(ValueError, match="refused dtype 'V1000000'"):
        read_cifar_py(p)
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)
    p.write_bytes(good.replace(struct.pack("<H", 3072), struct.pack("<H", 3073)))  # shape no longer matches bytes
    with pytest.raises(ValueError, match="refused ndarray shape"):
        read_cifar_py(p)
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 11]}))
    with pytest.raises(ValueError, match="b'labels'"):
        read_cifar_py(p)
    x, y = read_cifar_py(_write(tmp_path / "ok", good))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 1]


def _write(path, data):
    path.write_bytes(data)
    return path


def test_denoiser_file_declaring_huge_depth_is_refused_before_building(tmp_path):
    from proxnets.stable.restore import load_denoiser

    p = tmp_path / "d.pt"
    save_state(p, {"kind": "averaged", "config": {"channels": 1, "depth": 3_000_000}, "state": {}})
    with pytest.raises(ValueError, match=r"config.depth: expected an integer in \[1, 1000\], got 3000000"):
        load_denoiser(p)
    save_state(p, {"kind": "dncnn", "config": {"channels": 1, "width": 1024, "depth": 1000}, "state": {}})
    with pytest.raises(ValueError, match="config: expected a denoiser of at most"):
        load_denoiser(p)
    save_state(p, {"kind": "dncnn", "config": {"channels": 1, "evil": 1}, "state": {}})
    with pytest.raises(ValueError, match="config: expected keys among"):
        load_denoiser(p)


def test_self_referencing_or_exploding_checkpoint_is_refused(tmp_path):
    history: list = [{"epoch": 0}]
    history.append(history)
    p = tmp_path / "c.pt"
    torch.save({"history": history, "model": {"w": torch.zeros(2)}}, p)
    with pytest.raises(ValueError, match="self-referencing list"):
        load_state(p)
    laughs: list = [0]
    for _ in range(40):  # 2**40 entries reached through shared references, 40 objects stored
        laughs = [laughs, laughs]
    with pytest.raises(ValueError, match="entries in all"):
        check_plain("history", laughs, max_items=10_000)
    save_state(p, {"history": [{"epoch": i} for i in range(3)], "model": {"w": torch.zeros(2)}})
    assert load_state(p)["history"][2] == {"epoch": 2}


def test_validate_metadata_messages():
    spec = {"depth": (int, 1, 10), "lr": (float, 0.0, 1.0), "bn": (bool,), "act": (str, ("relu",))}
    assert validate_metadata("cfg", {"depth": 3, "lr": 1, "bn": True, "act": "relu"}, spec)
    for bad, msg in [({"depth": 11}, "cfg.depth: expected an integer in \\[1, 10\\], got 11"),
                     ({"depth": True}, "cfg.depth: expected an integer"), ({"depth": 10**400}, "cfg.depth"),
                     ({"lr": float("nan")}, "cfg.lr: expected a finite number"), ({"bn": 1}, "cfg.bn: expected a bool"),
                     ({"act": "gelu"}, "cfg.act: expected one of \\['relu'\\]"), ({"x": 1}, "cfg: expected keys among"),
                     ([], "cfg: expected a dict")]:
        with pytest.raises(ValueError, match=msg):
            validate_metadata("cfg", bad, spec)
