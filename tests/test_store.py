"""The on-disk tensor store: round trips, atomic replace, resume after a restart, expiry, hostile
names and keys, the size cap and full disks, and that a receive does not copy the tensor in RAM."""

from __future__ import annotations

import errno
import gc
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensord.errors import BadTensor, TensorError, TensorNotFound
from tensord.store import StoreFull, TensorStore, encode_component
from tensord.wire.meta import TensorMeta, numpy_dtype


def _meta(name: str, dtype: str, shape: tuple[int, ...], grad: bool = False) -> TensorMeta:
    itemsize = {"bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}.get(dtype)
    size = itemsize if itemsize is not None else np.dtype(dtype).itemsize
    return TensorMeta(name, dtype, shape, int(np.prod(shape)) * size, grad)


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def _receive(store: TensorStore, meta: TensorMeta, data: bytes, key: str = "peer/0001") -> None:
    partial = store.begin_receive(meta, key)
    partial.buffer[:] = data
    partial.commit("peer")


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        ("<f4", (3, 5)),
        ("<f2", (7,)),
        (">i8", (2, 3, 4)),  # big-endian stays big-endian
        ("|b1", (9,)),
        ("<c16", (4, 1)),
        ("<u1", ()),  # 0-d
        ("<f8", (0,)),  # empty
        ("<i4", (3, 0, 2)),  # empty, 3-d
        ("bfloat16", (4, 6)),  # by name: no numpy type without ml_dtypes
        ("float8_e4m3fn", (5,)),
    ],
)
def test_round_trip_through_buffer(tmp_path: Path, dtype: str, shape: tuple[int, ...]) -> None:
    store = TensorStore(tmp_path)
    meta = _meta("blk.0/w", dtype, shape, grad=True)
    data = _random_bytes(meta.nbytes)
    if dtype == "|b1":
        data = bytes(b & 1 for b in data)
    before = time.time()
    partial = store.begin_receive(meta, "gpu-2/00000000000000a1")
    assert partial.buffer.format == "B" and not partial.buffer.readonly
    assert partial.buffer.nbytes == meta.nbytes
    partial.buffer[:] = data
    info = partial.commit("gpu-2")

    # The file is a plain .npy: np.load (no mmap, no store) reads the exact bytes.
    plain = np.load(store.path(meta.name))
    assert plain.shape == shape
    assert plain.tobytes() == data
    # The store's view: right dtype (ml_dtypes if installed, else the uint of the same size).
    loaded = store.load(meta.name)
    assert loaded.dtype == numpy_dtype(dtype)
    assert loaded.shape == shape
    assert not loaded.flags.writeable
    assert loaded.tobytes() == data
    # Metadata, including what only the sidecar knows.
    got = store.meta(meta.name)
    assert got == info
    assert got.meta == meta
    assert got.dtype == dtype and got.requires_grad is True and got.sender == "gpu-2"
    assert before <= got.stored_at <= time.time()
    assert [i.name for i in store.list()] == [meta.name]
    assert meta.name in store
    # A new store on the same root sees the same thing.
    assert TensorStore(tmp_path).meta(meta.name) == info


def test_put_and_list_several(tmp_path: Path) -> None:
    store = TensorStore(tmp_path)
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "b": np.arange(12, dtype=np.float32).reshape(3, 4),
        "a/x": np.array(7, dtype=np.int16),
        "c": np.zeros((0, 3), dtype=np.float64),
        "bf": np.arange(10, dtype=np.uint16),
    }
    for name, arr in arrays.items():
        store.put(name, arr, sender="me", dtype="bfloat16" if name == "bf" else None)
    assert [i.name for i in store.list()] == ["a/x", "b", "bf", "c"]
    for name, arr in arrays.items():
        assert np.load(store.path(name)).tobytes() == arr.tobytes()
        assert store.load(name).shape == arr.shape
    assert store.meta("bf").dtype == "bfloat16"
    assert store.meta("b").sender == "me"


def test_commit_releases_the_buffer(tmp_path: Path) -> None:
    store = TensorStore(tmp_path)
    meta = _meta("w", "<f4", (1024,))
    partial = store.begin_receive(meta, "k")
    buf = partial.buffer
    buf[:] = b"\x01" * meta.nbytes
    partial.commit("p")
    # A stray write after the commit fails loudly instead of changing the stored tensor.
    with pytest.raises(ValueError, match="released"):
        buf[0] = 2
    with pytest.raises(ValueError, match="committed"):
        partial.commit("p")
    assert np.load(store.path("w")).tobytes() == b"\x01" * meta.nbytes
    assert _files_under(tmp_path / "partial") == []


# --------------------------------------------------------------------------------------------
# Atomic replace


def test_replace_is_atomic_and_keeps_old_until_commit(tmp_path: Path) -> None:
    store = TensorStore(tmp_path)
    old = np.arange(100, dtype=np.float32)
    store.put("w", old, sender="a")
    reader = store.load("w")  # a reader holding the old version
    old_path = store.path("w")

    meta = _meta("w", "bfloat16", (3, 7))
    new = _random_bytes(meta.nbytes, seed=3)
    partial = store.begin_receive(meta, "b/1")
    partial.buffer[:] = new
    # Until the commit, every reader sees the old tensor, data and metadata alike.
    assert store.meta("w").dtype == "<f4" and store.meta("w").sender == "a"
    assert np.array_equal(store.load("w"), old)
    partial.commit("b")

    info = store.meta("w")
    assert (info.dtype, info.shape, info.sender) == ("bfloat16", (3, 7), "b")
    assert np.load(store.path("w")).tobytes() == new
    assert store.path("w") != old_path and not old_path.exists()
    # Exactly one data file and one sidecar for the name; the old reader still reads old bytes.
    assert len(_files_under(tmp_path / "tensors")) == 2
    assert np.array_equal(reader, old)


def test_delete(tmp_path: Path) -> None:
    store = TensorStore(tmp_path)
    store.put("x", np.ones(4))
    store.put("y", np.zeros(4))
    store.delete("x")
    assert "x" not in store
    with pytest.raises(TensorNotFound, match="'x'"):
        store.meta("x")
    with pytest.raises(TensorNotFound):
        store.delete("x")
    with pytest.raises(TensorNotFound):
        store.load("x")
    assert [i.name for i in store.list()] == ["y"]
    assert len(_files_under(tmp_path / "tensors")) == 2


# --------------------------------------------------------------------------------------------
# Resume after a restart


def _open_and_write_half(root: Path, meta: TensorMeta, data: bytes, cs: int) -> list[int]:
    store = TensorStore(root)
    partial = store.begin_receive(meta, "gpu-1/00000000000000ff", chunk_size=cs)
    n = -(-meta.nbytes // cs)
    have = bytearray(n)
    crcs = [0] * n
    for i in range(0, n, 2):  # every other chunk, as a windowed receive with losses might
        partial.buffer[i * cs : (i + 1) * cs] = data[i * cs : (i + 1) * cs]
        have[i] = 1
        crcs[i] = 0xDEAD0000 + i
    partial.save_progress(bytes(have), crcs)
    return crcs


def test_resume_after_restart(tmp_path: Path) -> None:
    cs = 4096
    meta = _meta("layers/7/ffn", "<f4", (10, 1000))  # 40000 bytes: 10 chunks, the last short
    data = _random_bytes(meta.nbytes, seed=7)
    crcs = _open_and_write_half(tmp_path, meta, data, cs)
    gc.collect()  # the "daemon" is gone: no object of it survives

    store = TensorStore(tmp_path)
    [found] = store.partials()
    assert found.key == "gpu-1/00000000000000ff"
    assert found.meta == meta and found.chunk_size == cs
    assert found.bytes_have == 5 * cs  # chunks 0, 2, 4, 6, 8 (all full length)

    partial = store.begin_receive(meta, "gpu-1/00000000000000ff", chunk_size=cs)
    progress = partial.load_progress()
    assert progress is not None
    have, got_crcs = progress
    assert have == bytes([1, 0] * 5) and got_crcs == crcs
    assert partial.bytes_have == 5 * cs
    for i in range(0, 10, 2):  # the data written before the restart is intact
        assert bytes(partial.buffer[i * cs : (i + 1) * cs]) == data[i * cs : (i + 1) * cs]
    for i in range(1, 10, 2):  # the sender sends only the missing chunks
        partial.buffer[i * cs : (i + 1) * cs] = data[i * cs : (i + 1) * cs]
    partial.save_progress(b"\x01" * 10, [0] * 10)
    assert partial.bytes_have == meta.nbytes
    partial.commit("gpu-1")
    assert store.load("layers/7/ffn").tobytes() == data
    assert store.partials() == []
    assert _files_under(tmp_path / "partial") == []


def test_reopen_in_process_returns_same_object(tmp_path: Path) -> None:
    store = TensorStore(tmp_path)
    meta = _meta("w", "<f4", (8,))
    p1 = store.begin_receive(meta, "k", chunk_size=4096)
    assert store.begin_receive(meta, "k", chunk_size=4096) is p1


def test_same_key_other_meta_starts_over(tmp_path: Path) -> None:
    meta = _meta("w", "<f4", (2048,))
    _open_and_write_half(tmp_path, meta, _random_bytes(meta.nbytes), 4096)
    gc.collect()
    store = TensorStore(tmp_path)
    other = _meta("w", "<f4", (4096,))
    partial = store.begin_receive(other, "gpu-1/00000000000000ff", chunk_size=4096)
    assert partial.load_progress() is None
    assert [p.meta for p in store.partials()] == [other]
    # Same meta, other chunking: the saved bitmap is in other units, so it starts over too.
    partial.save_progress(b"\x01\x00\x00\x00", [1, 0, 0, 0])
    partial.close()
    again = store.begin_receive(other, "gpu-1/00000000000000ff", chunk_size=8192)
    assert again.load_progress() is None


def test_close_keeps_discard_removes(tmp_path: Path) -> None:
    store = TensorStore(tmp_path)
    meta = _meta("w", "<i2", (100,))
    with store.begin_receive(meta, "a") as partial:
        partial.buffer[:10] = b"x" * 10
        partial.save_progress(b"\x01", [5])
    assert partial.closed
    assert [p.key for p in store.partials()] == ["a"]
    assert store.used_bytes() > meta.nbytes

    reopened = store.begin_receive(meta, "a")
    assert bytes(reopened.buffer[:10]) == b"x" * 10
    reopened.discard()
    reopened.discard()  # idempotent
    assert store.partials() == []
    assert _files_under(tmp_path / "partial") == []
    assert store.used_bytes() == 0
    with pytest.raises(ValueError):
        reopened.save_progress(b"\x01", [5])


def test_progress_is_validated(tmp_path: Path) -> None:
    store = TensorStore(tmp_path)
    meta = _meta("w", "<f4", (3000,))  # 12000 bytes = 3 chunks of 4096
    partial = store.begin_receive(meta, "k", chunk_size=4096)
    with pytest.raises(ValueError, match="expected 3"):
        partial.save_progress(b"\x01\x00", [1, 2])
    with pytest.raises(ValueError, match="crcs"):
        partial.save_progress(b"\x01\x00\x00", [1, 2])
    with pytest.raises(ValueError, match="0 and 1"):
        partial.save_progress(b"\x01\x02\x00", [1, 2, 3])
    with pytest.raises(ValueError, match="crc32c"):
        partial.save_progress(b"\x01\x00\x00", [1 << 32, 0, 0])
    partial.save_progress(b"\x01\x00\x01", [1, 0, 3])
    assert partial.load_progress() == (b"\x01\x00\x01", [1, 0, 3])
    assert partial.bytes_have == 4096 + (12000 - 8192)
    # A damaged progress file means "start over", never a wrong bitmap.
    prog = next((tmp_path / "partial").glob("*.progress"))
    raw = bytearray(prog.read_bytes())
    raw[10] ^= 1
    prog.write_bytes(bytes(raw))
    assert partial.load_progress() is None
    assert store.partials()[0].bytes_have == 0


def test_expire_partials(tmp_path: Path) -> None:
    store = TensorStore(tmp_path)
    meta = _meta("w", "<f4", (16,))
    store.begin_receive(meta, "old").close()
    store.begin_receive(meta, "new").close()
    kept_open = store.begin_receive(meta, "open")
    # Leftovers of a crash: a data file without header, a temp file, an unreferenced tensor file.
    (tmp_path / "partial" / "orphan.npy").write_bytes(b"x")
    (tmp_path / "partial" / ".k.json.0123456789abcdef.tmp").write_bytes(b"x")
    store.put("t", np.ones(3))
    stray = tmp_path / "tensors" / "t.0123456789abcdef.npy"
    stray.write_bytes(b"x")
    now = time.time()
    hour_ago = now - 3600
    for p in (tmp_path / "partial").iterdir():
        if encode_component("new") not in p.name:
            os.utime(p, (hour_ago, hour_ago))
    os.utime(stray, (hour_ago, hour_ago))
    os.utime(store.path("t"), (hour_ago, hour_ago))

    assert store.expire_partials(600, now=now) == ["old"]
    assert sorted(p.key for p in store.partials()) == ["new", "open"]
    assert not (tmp_path / "partial" / "orphan.npy").exists()
    assert not list((tmp_path / "partial").glob(".*"))
    assert not stray.exists()
    assert np.array_equal(store.load("t"), np.ones(3))  # referenced: kept however old
    assert kept_open.buffer.nbytes == meta.nbytes  # still usable
    assert store.expire_partials(0, now=now + 1) == ["new"]
    kept_open.close()
    assert store.expire_partials(0, now=now + 1) == ["open"]
    assert store.partials() == []


# --------------------------------------------------------------------------------------------
# Hostile names and keys


HOSTILE_BUT_VALID = [
    "a/b/c",
    "a/..b/...",
    "x/.hidden",
    "_./_",
    "w:1@gpu-2+q=3",
    "a" * 256,
    "a/" * 127 + "zz",
    "9.json",  # a name that looks like another tensor's sidecar
    "9",
    "t.0123456789abcdef",  # looks like a generation suffix
]


def test_hostile_valid_names_stay_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = TensorStore(root)
    for i, name in enumerate(HOSTILE_BUT_VALID):
        store.put(name, np.full(4, i, dtype=np.int32), sender="s")
    files = _files_under(tmp_path)
    assert files, "something was stored"
    for f in files:
        assert f.parent in (root / "tensors", root / "partial"), f
        assert len(f.name) < 255
    assert sorted(i.name for i in store.list()) == sorted(HOSTILE_BUT_VALID)
    for i, name in enumerate(HOSTILE_BUT_VALID):
        assert np.array_equal(store.load(name), np.full(4, i, dtype=np.int32))
    store.delete("9")
    assert store.load("9.json")[0] == HOSTILE_BUT_VALID.index("9.json")


@pytest.mark.parametrize(
    "name",
    [
        *("../escape", "/etc/passwd", "a/../../b", "a//b", "a/", ".", "..", "", "a\x00b"),
        *("a\n", "a b", "x" * 257, "a\\b", "%2e%2e"),
    ],
)
def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    store = TensorStore(root)
    store.put("keep", np.ones(2))
    for call in (store.meta, store.load, store.path, store.delete):
        with pytest.raises(BadTensor, match="bad tensor name"):
            call(name)
    with pytest.raises(BadTensor):
        store.begin_receive(TensorMeta(name, "<f4", (1,), 4), "k")
    with pytest.raises(BadTensor):
        store.put(name, np.ones(1))
    assert name not in store
    assert all(f.is_relative_to(root) for f in _files_under(tmp_path))
    assert _files_under(root / "partial") == []
    assert np.array_equal(store.load("keep"), np.ones(2))


@pytest.mark.parametrize(
    "key",
    [
        *("../../evil", "/abs/path", "a/b", ".", "..", "", ".hidden", "\x00"),
        *("k\u00e9y\U0001f600", "%2F..%2F", "x" * 5000, "\ud800"),
    ],
)
def test_hostile_keys_stay_inside_partial_dir(tmp_path: Path, key: str) -> None:
    root = tmp_path / "root"
    store = TensorStore(root)
    meta = _meta("w", "<f4", (4,))
    partial = store.begin_receive(meta, key)
    partial.save_progress(b"", [])
    partial.close()
    for f in _files_under(tmp_path):
        assert f.parent == root / "partial", f
        assert not f.name.startswith(".")
        assert len(f.name) < 255
    assert [p.key for p in store.partials()] == [key]
    store.begin_receive(meta, key).commit("s")
    assert store.meta("w").sender == "s"


def test_encoding_is_injective_on_lookalikes() -> None:
    names = ["a/b", "a%2Fb", "a_2Fb", "a.b", ".ab", "%2Eab", "x" * 300, "x" * 301, ""]
    assert len({encode_component(n) for n in names}) == len(names)
    assert all(not encode_component(n).startswith(".") for n in names)


def test_tampered_sidecar_cannot_point_outside(tmp_path: Path) -> None:
    store = TensorStore(tmp_path / "root")
    store.put("w", np.ones(2))
    secret = tmp_path / "secret.npy"
    np.save(secret, np.arange(2))
    sidecar = tmp_path / "root" / "tensors" / "w.json"
    raw = json.loads(sidecar.read_text())
    raw["file"] = "../../secret.npy"
    sidecar.write_text(json.dumps(raw))
    with pytest.raises(TensorNotFound):
        store.load("w")
    assert store.list() == []


# --------------------------------------------------------------------------------------------
# Size cap and full disks


def test_cap_refuses_before_creating_and_keeps_earlier_tensors(tmp_path: Path) -> None:
    probe = TensorStore(tmp_path / "probe")
    _receive(probe, _meta("t0", "<u1", (4096,)), b"x" * 4096)
    per_tensor = probe.used_bytes()  # data + .npy header + sidecar
    cap = 2 * per_tensor + per_tensor // 2
    store = TensorStore(tmp_path / "root", max_bytes=cap)
    stored: dict[str, bytes] = {}
    with pytest.raises(StoreFull) as caught:
        for i in range(10):
            meta = _meta(f"t{i}", "<u1", (4096,))
            data = _random_bytes(4096, seed=i)
            _receive(store, meta, data, key=f"k{i}")
            stored[meta.name] = data
    msg = str(caught.value)
    assert len(stored) == 2
    assert "'t2'" in msg and "4096 bytes" in msg and f"cap is {cap} bytes" in msg
    assert "tensord rm" in msg and "\n" not in msg
    assert caught.value.code == "quota"
    assert _files_under(tmp_path / "root" / "partial") == []  # nothing was created
    assert store.used_bytes() <= cap
    for name, data in stored.items():
        assert store.load(name).tobytes() == data
    # A partial in progress counts against the cap too.
    store.delete("t0")
    partial = store.begin_receive(_meta("p", "<u1", (4096,)), "kp")
    with pytest.raises(StoreFull):
        store.begin_receive(_meta("q", "<u1", (4096,)), "kq")
    partial.discard()
    store.begin_receive(_meta("q", "<u1", (4096,)), "kq")


def test_resume_does_not_count_twice_against_the_cap(tmp_path: Path) -> None:
    meta = _meta("big", "<u1", (8192,))
    store = TensorStore(tmp_path, max_bytes=8192 + 1000)
    store.begin_receive(meta, "k").close()
    assert store.begin_receive(meta, "k").buffer.nbytes == 8192


def test_too_little_free_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TensorStore(tmp_path)
    store.put("keep", np.arange(5))
    real = os.statvfs(tmp_path)

    class Tiny:
        f_bavail = 10
        f_frsize = real.f_frsize

    monkeypatch.setattr(os, "statvfs", lambda path: Tiny())
    with pytest.raises(StoreFull, match=rf"only {10 * real.f_frsize} bytes are free"):
        store.begin_receive(_meta("w", "<f4", (1 << 20,)), "k")
    assert _files_under(tmp_path / "partial") == []
    assert np.array_equal(store.load("keep"), np.arange(5))


def test_enospc_while_reserving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TensorStore(tmp_path)
    keep = _random_bytes(4096, seed=1)
    _receive(store, _meta("keep", "<u1", (4096,)), keep)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(StoreFull, match=r"'w' \(4096 bytes\).*filled up"):
        store.begin_receive(_meta("w", "<u1", (4096,)), "k")
    assert _files_under(tmp_path / "partial") == []
    assert store.load("keep").tobytes() == keep


def test_no_fallocate_support_still_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    store = TensorStore(tmp_path)
    data = _random_bytes(10_000)
    _receive(store, _meta("w", "<u1", (10_000,)), data)
    assert store.load("w").tobytes() == data


def test_enospc_at_commit_keeps_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TensorStore(tmp_path)
    old = _random_bytes(4096, seed=1)
    _receive(store, _meta("w", "<u1", (4096,)), old)
    partial = store.begin_receive(_meta("w", "<u1", (64, 64)), "k2")
    partial.buffer[:] = _random_bytes(4096, seed=2)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreFull, match="filled up while committing"):
        partial.commit("p")
    monkeypatch.undo()
    assert store.meta("w").shape == (4096,)
    assert store.load("w").tobytes() == old
    assert _files_under(tmp_path / "partial") == []
    assert len(_files_under(tmp_path / "tensors")) == 2


def test_damaged_data_file_is_reported(tmp_path: Path) -> None:
    store = TensorStore(tmp_path)
    store.put("w", np.ones(8, dtype=np.float32))
    np.save(store.path("w"), np.ones(3, dtype=np.float64))
    with pytest.raises(TensorError, match=r"damaged.*delete it"):
        store.load("w")


# --------------------------------------------------------------------------------------------
# Memory: a receive lands in the page cache through the mapping, not in anonymous memory


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_receiving_512_mib_does_not_copy_it_in_ram(tmp_path: Path) -> None:
    size = 512 << 20
    meta = _meta("big", "<u1", (size,))
    store = TensorStore(tmp_path)
    a, b = socket.socketpair()
    a.setblocking(True)
    chunk = bytes(range(256)) * 256  # 64 KiB: fits the socket buffer, so one thread suffices
    before = _rss_anon_kib()
    with a, b:
        partial = store.begin_receive(meta, "k")
        buf: Any = partial.buffer
        offset = 0
        while offset < size:
            a.sendall(chunk)
            got = 0
            while got < len(chunk):
                got += b.recv_into(buf[offset + got : offset + len(chunk)])
            offset += len(chunk)
        grown_mib = (_rss_anon_kib() - before) / 1024
        assert bytes(buf[size - 3 :]) == chunk[-3:]
        assert bytes(buf[(1 << 20) : (1 << 20) + 4]) == chunk[:4]
        del buf
        partial.discard()  # no write-back of 512 MiB: keeps the test fast
    assert grown_mib < 64, f"anonymous memory grew by {grown_mib:.0f} MiB"
