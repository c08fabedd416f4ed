"""The tensor store: received tensors as ``.npy`` files on disk, written in place by ``recv_into``.

Why a store on disk, and why this shape:

* **No full copy in RAM.** A receive writes into a memory-mapped file: the network layer
  ``recv_into``\\s chunk payloads straight into :attr:`PartialReceive.buffer`, a flat ``B``
  memoryview of the mapping. The pages written are page cache (reclaimable, written back by the
  kernel), not anonymous memory, so a 64 GiB tensor can arrive on a machine with less RAM.
* **Readable by anything.** A complete tensor is a plain ``.npy`` file: ``np.load`` reads it
  (``tensord get`` copies it out). The three wire dtypes numpy cannot describe (``bfloat16``,
  ``float8_e4m3fn``, ``float8_e5m2``) are stored as the unsigned integer of the same size, with the
  true wire dtype in the sidecar.
* **A reader never sees a half-written tensor, and metadata never disagrees with data.** Each
  tensor is two files in ``root/tensors/``: the data ``<stem>.<gen>.npy`` (a fresh generation name
  per commit) and the sidecar ``<stem>.json`` naming that data file together with the wire
  metadata, the sender and the time stored. A commit renames the finished partial to its new
  generation name, then atomically replaces the sidecar - that rename is the single commit point -
  and only then removes the previous generation. A crash at any step leaves either the old tensor
  or the new one, never a mix (a data file no sidecar names is an orphan, swept by
  :meth:`TensorStore.expire_partials`). A reader that opened the old generation keeps a valid
  mapping after it is unlinked.
* **Resumable across restarts.** An in-progress receive lives in ``root/partial/`` as the data file
  (already a valid ``.npy`` layout, so commit is a rename), a JSON header (key, metadata, chunk
  size, creation time) and a binary progress file (chunk bitmap and per-chunk crc32c), written
  atomically after the data pages it vouches for were flushed. A sender's resumed ``Begin`` after a
  daemon restart re-opens it with :meth:`TensorStore.begin_receive` and only the missing chunks
  travel again.
* **A full disk is found at the start, not mid-transfer.** Space is checked against the size cap
  and ``statvfs`` before anything is created, then reserved with ``posix_fallocate``: a write
  through a mapping into a sparse file on a full disk is a ``SIGBUS`` that would kill the daemon.
* **Names never become paths.** Tensor names (which may contain ``/``) and transfer keys (opaque
  strings) are percent-encoded into a single path component of ``[A-Za-z0-9_.%~-]`` that never
  starts with ``.``; long ones are shortened with a SHA-256. A file name read back from a sidecar is
  checked against that form before it is joined to the root.

Everything here is synchronous file I/O with no trio: metadata operations are cheap enough for the
event loop. ``begin_receive`` (``fallocate``), ``save_progress`` and ``commit`` (``msync`` +
``fsync``) may wait on the disk for large tensors; callers on the event loop may prefer to run them
with ``trio.to_thread.run_sync``. The store takes no locks: a ``PartialReceive`` may be committed
in a worker thread while the event loop goes on, but do not run :meth:`TensorStore.expire_partials`
at the same time as a commit (it could take the committing file for an orphan). One process (the
daemon) owns a store's root; other processes may read it.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import json
import logging
import mmap
import os
import re
import secrets
import struct
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadTensor, ProtocolError, StoreFull, TensorError, TensorNotFound
from ..fsutil import atomic_write as _atomic_write
from ..fsutil import fsync_dir as _fsync_dir
from ..fsutil import unlink_quietly as _unlink
from ..fsutil import write_temp as _write_temp
from ..limits import check_name
from ..wire.crc import crc32c
from ..wire.meta import EXTENDED_DTYPES, TensorMeta, numpy_dtype

log = logging.getLogger("tensord.store")

__all__ = [
    "PartialInfo",
    "PartialReceive",
    "StoreFull",
    "TensorInfo",
    "TensorStore",
]

_FORMAT_VERSION = 1
#: Free space kept beyond the tensor itself for the sidecar, progress file and temp files.
_DISK_SLACK = 1 << 20
#: errno values that mean "the disk (or the user's quota) is full".
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: errno values of a filesystem without fallocate support: fall back to a sparse file.
_NO_FALLOCATE_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
_MAX_STEM = 160
_STEM_PREFIX_KEPT = 80
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.")
_GEN_RE = r"\.[0-9a-f]{16}\.npy"
_PROGRESS_MAGIC = b"TNSDPRG1"
_PROGRESS_HEAD = struct.Struct("<8sI")
_PROGRESS_TAIL = struct.Struct("<I")
_MAX_SIZE = 1 << 62  # metadata read back from disk is validated with this as the size limit


# --------------------------------------------------------------------------------------------
# Names, files, small helpers


def encode_component(text: str) -> str:
    """``text`` as one safe path component, injectively.

    Bytes outside ``[A-Za-z0-9_.-]`` (and a leading ``.``) become ``%XX``, so the result can never
    be ``.``, ``..``, a dotfile, or contain ``/`` or NUL. Results longer than 160 characters are
    shortened to a readable prefix, ``%~`` (which the escaping never produces) and the SHA-256 of
    the whole text, which keeps every file name well under the 255-byte limit.
    """
    raw = text.encode("utf-8", "surrogatepass")
    out = "".join(
        chr(b) if b in _SAFE_BYTES and not (i == 0 and b == 0x2E) else f"%{b:02X}"
        for i, b in enumerate(raw)
    )
    if not out or len(out) > _MAX_STEM:
        prefix = out[:_STEM_PREFIX_KEPT]
        cut = prefix.rfind("%")
        if cut > len(prefix) - 3 and cut != -1:
            prefix = prefix[:cut]  # do not end the prefix in half an escape
        out = prefix + "%~" + hashlib.sha256(raw).hexdigest()
    return out


def _storage_dtype(wire: str) -> np.dtype[Any]:
    """The dtype written in the ``.npy`` header: the uint of the same size for bf16/fp8."""
    if wire in EXTENDED_DTYPES:
        return np.dtype(f"<u{EXTENDED_DTYPES[wire]}")
    return np.dtype(wire)


def _npy_header(meta: TensorMeta) -> bytes:
    """The ``.npy`` header for ``meta``: deterministic, so a re-opened file can be checked."""
    fmt: Any = np.lib.format
    d = {
        "descr": fmt.dtype_to_descr(_storage_dtype(meta.dtype)),
        "fortran_order": False,
        "shape": tuple(meta.shape),
    }
    buf = io.BytesIO()
    try:
        fmt.write_array_header_1_0(buf, d)
    except ValueError:  # header over 64 KiB: version 2.0 has a 4-byte length
        buf = io.BytesIO()
        fmt.write_array_header_2_0(buf, d)
    return buf.getvalue()


def _validated(meta: TensorMeta) -> TensorMeta:
    """Check a ``TensorMeta`` the way a peer's is checked (name, dtype, shape x itemsize)."""
    try:
        return TensorMeta.from_wire(meta.to_wire(), _MAX_SIZE)
    except ProtocolError as exc:
        raise BadTensor(str(exc)) from None


def checked_name(name: str) -> str:
    """A tensor name from a caller (API, control request, CLI), checked by the one validator
    the wire uses too (:func:`~tensord.wire.meta.check_name`); :class:`BadTensor` if bad."""
    try:
        return check_name(name)
    except ProtocolError as exc:
        raise BadTensor(str(exc)) from None


def _is_full(exc: OSError) -> bool:
    return exc.errno in _FULL_ERRNOS


def _reserve(fd: int, size: int) -> None:
    """Give the file ``size`` bytes of real disk blocks, so a full disk fails here, not in a page
    fault (``SIGBUS``) halfway through a transfer. Falls back to a sparse file where the
    filesystem or platform has no ``fallocate``."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None and size > 0:
        try:
            fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE_ERRNOS:
                raise
    os.ftruncate(fd, size)


def _mtime(*paths: Path) -> float | None:
    """The newest mtime of those of ``paths`` that exist."""
    times = []
    for p in paths:
        with contextlib.suppress(OSError):
            times.append(p.stat().st_mtime)
    return max(times) if times else None


def _bytes_have(have: bytes, nbytes: int, chunk_size: int | None) -> int:
    """Bytes covered by the set chunks of ``have``; exact when the chunk size is known."""
    n = len(have)
    count = have.count(1)
    if not count:
        return 0
    cs = chunk_size if chunk_size else -(-nbytes // n)
    last_len = min(cs, max(0, nbytes - (n - 1) * cs))
    total = count * cs - ((cs - last_len) if have[n - 1] else 0)
    return max(0, min(nbytes, total))


# --------------------------------------------------------------------------------------------
# What the store returns


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A stored tensor: its wire metadata, who sent it and when it was stored.

    Has the fields of :class:`~tensord.wire.meta.TensorMeta` (``name``, ``dtype`` - the wire dtype,
    ``shape``, ``nbytes``, ``requires_grad``) plus ``sender`` and ``stored_at`` (Unix time);
    :attr:`meta` is the ``TensorMeta`` itself, e.g. to send the tensor on.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    requires_grad: bool
    sender: str
    stored_at: float

    @property
    def meta(self) -> TensorMeta:
        return TensorMeta(self.name, self.dtype, self.shape, self.nbytes, self.requires_grad)

    @classmethod
    def of(cls, meta: TensorMeta, sender: str, stored_at: float) -> TensorInfo:
        return cls(
            meta.name, meta.dtype, meta.shape, meta.nbytes, meta.requires_grad, sender, stored_at
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (for the control API)."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "requires_grad": self.requires_grad,
            "sender": self.sender,
            "stored_at": self.stored_at,
        }


@dataclass(frozen=True, slots=True)
class PartialInfo:
    """An interrupted receive found on disk: enough to log it and to resume it."""

    key: str
    meta: TensorMeta
    chunk_size: int | None
    bytes_have: int
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class _Sidecar:
    info: TensorInfo
    data: Path


@dataclass(frozen=True, slots=True)
class _PartialHeader:
    key: str
    meta: TensorMeta
    chunk_size: int | None
    created: float


# --------------------------------------------------------------------------------------------
# A receive in progress


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class PartialReceive:
    """One in-progress receive: a memory-mapped ``.npy`` file the network layer writes into.

    Get one from :meth:`TensorStore.begin_receive`; end it with exactly one of :meth:`commit`
    (the tensor is complete and verified), :meth:`discard` (give up) or :meth:`close` (stop for now
    and keep it on disk for a resume). It is also a context manager that closes on exit. After any
    of the three, :attr:`buffer` is released: a stray ``recv_into`` fails loudly instead of
    writing into a stored tensor.
    """

    def __init__(
        self,
        store: TensorStore,
        key: str,
        meta: TensorMeta,
        chunk_size: int | None,
        stem: str,
        fd: int,
        header_len: int,
    ) -> None:
        self.key = key
        self.meta = meta
        self.chunk_size = chunk_size
        self._store = store
        self._stem = stem
        self._fd = fd
        self._mmap: mmap.mmap | None = mmap.mmap(fd, header_len + meta.nbytes)
        # Registered only once the mapping exists: a failed __init__ leaves the fd to the caller.
        self._finalizer = weakref.finalize(self, _close_quietly, fd)
        #: The tensor's bytes: flat, writable, ``B`` format, exactly ``meta.nbytes`` long.
        self.buffer: memoryview = memoryview(self._mmap)[header_len:]
        self._state = "open"

    # -- paths

    @property
    def data_path(self) -> Path:
        return self._store._partial_dir / f"{self._stem}.npy"

    @property
    def _header_path(self) -> Path:
        return self._store._partial_dir / f"{self._stem}.json"

    @property
    def _progress_path(self) -> Path:
        return self._store._partial_dir / f"{self._stem}.progress"

    @property
    def closed(self) -> bool:
        return self._state != "open"

    def __enter__(self) -> PartialReceive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PartialReceive {self.key!r} {self.meta.name!r} {self._state}>"

    def _check_open(self) -> mmap.mmap:
        if self._mmap is None:
            raise ValueError(f"partial receive {self.key!r} is already {self._state}")
        return self._mmap

    # -- progress

    def save_progress(self, have: bytes | bytearray, raw_crcs: list[int]) -> None:
        """Persist the chunk bitmap and per-chunk crc32c, so a restart resumes from here.

        The data pages are flushed (``msync``) first: the progress file must never claim a chunk
        whose bytes could still be lost, because the whole-tensor check is combined from these
        crcs and never re-reads the data. Then the progress is written atomically (temp file,
        ``fsync``, rename), so a crash leaves the previous progress or this one.
        """
        mm = self._check_open()
        if len(have) != len(raw_crcs):
            raise ValueError(f"{len(have)} bitmap entries but {len(raw_crcs)} crcs")
        if bytes(have).translate(None, b"\x00\x01"):
            raise ValueError("the chunk bitmap must hold only 0 and 1")
        if self.chunk_size:
            expected = -(-self.meta.nbytes // self.chunk_size)
            if len(have) != expected:
                raise ValueError(
                    f"{len(have)} chunks in the bitmap, expected {expected} "
                    f"({self.meta.nbytes} bytes in chunks of {self.chunk_size})"
                )
        if any(not 0 <= c < 1 << 32 for c in raw_crcs):
            raise ValueError("crc32c values must be in 0..2**32-1")
        mm.flush()
        body = (
            _PROGRESS_HEAD.pack(_PROGRESS_MAGIC, len(have))
            + bytes(have)
            + np.asarray(raw_crcs, dtype="<u4").tobytes()
        )
        _atomic_write(self._progress_path, body + _PROGRESS_TAIL.pack(crc32c(body)))

    def load_progress(self) -> tuple[bytes, list[int]] | None:
        """The last saved ``(have, raw_crcs)``, or ``None`` if none was saved (or it is damaged)."""
        return _read_progress(self._progress_path, self.meta, self.chunk_size)

    @property
    def bytes_have(self) -> int:
        """Bytes covered by the saved progress (exact when the chunk size is known)."""
        progress = self.load_progress()
        if progress is None:
            return 0
        return _bytes_have(progress[0], self.meta.nbytes, self.chunk_size)

    # -- ending

    def commit(self, sender: str) -> TensorInfo:
        """Make the received bytes the stored tensor ``meta.name``, atomically.

        Flush and ``fsync`` the data, write the new sidecar to a temp file, rename the data to its
        new generation name in ``tensors/``, rename the sidecar over the old one (the commit
        point), then remove the previous generation and this partial's header and progress. A
        reader sees the old tensor or the new one, never a mix. If the disk fills up on the way
        (``ENOSPC``), the partial is removed, :class:`StoreFull` is raised and the old tensor of
        that name is untouched.
        """
        mm = self._check_open()
        store = self._store
        info = TensorInfo.of(self.meta, sender, time.time())
        name_stem = encode_component(self.meta.name)
        data_name = f"{name_stem}.{secrets.token_hex(8)}.npy"
        sidecar = store._tensor_dir / f"{name_stem}.json"
        body = json.dumps(
            {
                "version": _FORMAT_VERSION,
                "meta": self.meta.to_wire(),
                "sender": sender,
                "stored_at": info.stored_at,
                "file": data_name,
            },
            sort_keys=True,
        ).encode()
        tmp: Path | None = None
        try:
            mm.flush()
            os.fsync(self._fd)
            tmp = _write_temp(sidecar, body)
        except OSError as exc:
            if tmp is not None:
                _unlink(tmp)
            if _is_full(exc):
                self.discard()
                raise store._full_midway(self.meta, "committing") from None
            raise
        old = store._read_sidecar(name_stem)
        new_data = store._tensor_dir / data_name
        try:
            os.replace(self.data_path, new_data)
            try:
                os.replace(tmp, sidecar)  # the commit point
            except BaseException:
                os.replace(new_data, self.data_path)  # back where it was: still resumable
                raise
        except BaseException:
            _unlink(tmp)
            raise
        self._release("committed")
        _fsync_dir(store._tensor_dir)
        if old is not None and old.data != new_data:
            _unlink(old.data)
        _unlink(self._progress_path)
        _unlink(self._header_path)
        _fsync_dir(store._partial_dir)
        return info

    def discard(self) -> None:
        """Give up on this receive and remove its files. Safe to call more than once."""
        if self._state in ("committed", "discarded"):
            return
        self._release("discarded")
        self._store._remove_partial_files(self._stem)

    def close(self) -> None:
        """Stop using this receive but keep it on disk for a resume (e.g. at shutdown)."""
        if self._state == "open":
            self._release("closed")

    def _release(self, state: str) -> None:
        self._state = state
        self._store._forget(self)
        mm, self._mmap = self._mmap, None
        try:
            self.buffer.release()
            if mm is not None:
                mm.close()
        except BufferError:
            # Someone still holds a view of the buffer (e.g. an ndarray over it): the mapping
            # lives until that is dropped. Correct, but writes through it reach the file.
            log.warning(
                "partial receive %r %s while views of its buffer are still held",
                self.key,
                state,
            )
        self._finalizer()


def _read_progress(
    path: Path, meta: TensorMeta, chunk_size: int | None
) -> tuple[bytes, list[int]] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    head, tail = _PROGRESS_HEAD.size, _PROGRESS_TAIL.size
    try:
        if len(raw) < head + tail:
            raise ValueError("too short")
        magic, n = _PROGRESS_HEAD.unpack_from(raw)
        if magic != _PROGRESS_MAGIC or len(raw) != head + 5 * n + tail:
            raise ValueError("bad magic or length")
        (check,) = _PROGRESS_TAIL.unpack_from(raw, len(raw) - tail)
        if check != crc32c(memoryview(raw)[: len(raw) - tail]):
            raise ValueError("checksum mismatch")
        have = raw[head : head + n]
        if have.translate(None, b"\x00\x01"):
            raise ValueError("bitmap holds values other than 0 and 1")
        if chunk_size and n != -(-meta.nbytes // chunk_size):
            raise ValueError("chunk count does not match the chunk size")
        crcs = np.frombuffer(raw, dtype="<u4", count=n, offset=head + n).tolist()
    except (ValueError, struct.error) as exc:
        log.warning("ignoring damaged progress file %s: %s", path, exc)
        return None
    return have, [int(c) for c in crcs]


# --------------------------------------------------------------------------------------------
# The store


class TensorStore:
    """Tensors on disk under ``root``: ``root/tensors/`` (complete) and ``root/partial/``.

    ``max_bytes`` caps the bytes of all files in both directories (complete tensors, their
    sidecars, and partial receives); ``None`` means only the disk's free space limits it.
    """

    def __init__(self, root: Path | str, *, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be non-negative or None, not {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._tensor_dir = self.root / "tensors"
        self._partial_dir = self.root / "partial"
        self._tensor_dir.mkdir(parents=True, exist_ok=True)
        self._partial_dir.mkdir(parents=True, exist_ok=True)
        # Partials open in this process (a caller's object keeps its entry alive): expiry skips
        # them, and a second begin_receive for the same key gets the same object.
        self._open: weakref.WeakValueDictionary[str, PartialReceive] = weakref.WeakValueDictionary()

    def __repr__(self) -> str:
        return f"<TensorStore {str(self.root)!r} max_bytes={self.max_bytes}>"

    # -- complete tensors

    def list(self) -> list[TensorInfo]:
        """Every stored tensor, sorted by name. Damaged sidecars are skipped (and logged)."""
        out = []
        for entry in self._scan(self._tensor_dir):
            if entry.name.endswith(".json"):
                found = self._read_sidecar(entry.name[: -len(".json")])
                if found is not None:
                    out.append(found.info)
        return sorted(out, key=lambda i: i.name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            check_name(name)
        except ProtocolError:
            return False
        return self._read_sidecar(encode_component(name)) is not None

    def meta(self, name: str) -> TensorInfo:
        """The stored tensor's metadata, sender and time stored. Raises :class:`TensorNotFound`."""
        return self._find(name).info

    def path(self, name: str) -> Path:
        """The ``.npy`` file holding ``name`` now (a commit of a new version changes it)."""
        return self._find(name).data

    def load(self, name: str) -> np.ndarray[Any, Any]:
        """The tensor, memory-mapped read-only, with its dtype (bf16/fp8 via ml_dtypes if
        installed, else the same-size uint, as :func:`~tensord.wire.meta.numpy_dtype`)."""
        for _ in range(3):
            found = self._find(name)
            try:
                arr: np.ndarray[Any, Any] = np.load(found.data, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                continue  # replaced between reading the sidecar and opening the data: again
            except (OSError, ValueError) as exc:
                raise TensorError(
                    f"tensor {name!r} in {self.root} is damaged ({exc}): delete it and receive "
                    "it again"
                ) from None
            info = found.info
            if arr.shape != info.shape or arr.dtype != _storage_dtype(info.dtype):
                raise TensorError(
                    f"tensor {name!r} in {self.root} is damaged: its file holds {arr.dtype} "
                    f"{arr.shape}, its metadata says {info.dtype} {info.shape}; delete it and "
                    "receive it again"
                )
            want = numpy_dtype(info.dtype)
            return arr if arr.dtype == want else arr.view(want)
        raise TensorNotFound(f"tensor {name!r} kept changing while it was being opened: retry")

    def delete(self, name: str) -> None:
        """Remove ``name`` (sidecar first: it is the commit point). Raises TensorNotFound."""
        found = self._find(name)
        _unlink(self._tensor_dir / f"{encode_component(name)}.json")
        _fsync_dir(self._tensor_dir)
        _unlink(found.data)

    def put(
        self,
        name: str,
        array: np.ndarray[Any, Any],
        *,
        sender: str = "",
        requires_grad: bool = False,
        dtype: str | None = None,
    ) -> TensorInfo:
        """Store a local array (``dtype="bfloat16"`` stores a uint16 array as bf16).

        Goes through the same path as a receive, so the cap, the disk check and the atomic
        replace apply alike.
        """
        try:
            meta = TensorMeta.of(name, array, requires_grad, dtype)
        except ProtocolError as exc:
            raise BadTensor(str(exc)) from None
        partial = self.begin_receive(meta, f"put/{secrets.token_hex(8)}")
        try:
            src: Any = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            partial.buffer[:] = memoryview(src)
            return partial.commit(sender)
        except BaseException:
            partial.discard()
            raise

    def _partial_bytes(self) -> int:
        total = 0
        for entry in self._scan(self._partial_dir, hidden=True):
            with contextlib.suppress(OSError):
                total += entry.stat(follow_symlinks=False).st_size
        return total

    def used_bytes(self) -> int:
        """Bytes of every file in ``tensors/`` and ``partial/``: what the cap is checked against."""
        total = 0
        for d in (self._tensor_dir, self._partial_dir):
            for entry in self._scan(d, hidden=True):
                with contextlib.suppress(OSError):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    # -- receives

    def begin_receive(
        self, meta: TensorMeta, key: str, *, chunk_size: int | None = None
    ) -> PartialReceive:
        """A writable memory-mapped destination for ``meta``'s bytes, for transfer ``key``.

        ``key`` names the transfer (e.g. sender node id + transfer id) and is treated as an
        opaque string. If a partial for the same key with identical ``meta`` and ``chunk_size``
        exists (on disk from before a restart, or open in this process), it is re-opened with its
        data and progress; one with different metadata is discarded. Otherwise a new file is
        created and its space reserved.

        ``chunk_size`` gives the saved chunk bitmap its unit: pass the ``Begin``'s chunk size so a
        resume with another chunking starts over rather than trusting a bitmap in other units.

        Raises :class:`StoreFull` - before creating anything - if the cap or the disk's free space
        is too small, or if reserving the space fails with ``ENOSPC`` (the partial is removed);
        :class:`~tensord.errors.BadTensor` if ``meta`` is invalid.
        """
        meta = _validated(meta)
        if not isinstance(key, str):
            raise TypeError(f"the transfer key must be a str, not {type(key).__name__}")
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        stem = encode_component(key)
        current = self._open.get(key)
        if current is not None:
            if current.meta == meta and current.chunk_size == chunk_size:
                return current
            current.discard()
        header = self._read_partial_header(stem)
        if header is not None and header.key == key:
            if header.meta == meta and header.chunk_size == chunk_size:
                reopened = self._reopen(stem, key, meta, chunk_size)
                if reopened is not None:
                    return reopened
            log.info("discarding partial receive %r: the sender now sends another tensor", key)
        self._remove_partial_files(stem)
        self._check_space(meta)
        return self._create(stem, key, meta, chunk_size)

    def partials(self) -> builtins.list[PartialInfo]:
        """Resumable partial receives on disk (e.g. left by a restart), oldest first."""
        out = []
        for entry in self._scan(self._partial_dir):
            if not entry.name.endswith(".json"):
                continue
            stem = entry.name[: -len(".json")]
            header = self._read_partial_header(stem)
            if header is None or not self._partial_data_ok(stem, header.meta):
                continue
            progress = _read_progress(
                self._partial_dir / f"{stem}.progress", header.meta, header.chunk_size
            )
            updated = _mtime(*self._partial_files(stem)) or header.created
            out.append(
                PartialInfo(
                    header.key,
                    header.meta,
                    header.chunk_size,
                    0
                    if progress is None
                    else _bytes_have(progress[0], header.meta.nbytes, header.chunk_size),
                    header.created,
                    updated,
                )
            )
        return sorted(out, key=lambda p: p.created)

    def discard_partials(self, key_prefix: str, name: str, keep: str) -> builtins.list[str]:
        """Remove the partial receives of tensor ``name`` whose key starts with ``key_prefix``
        (a sender's earlier, abandoned transfers of it), are not open and are not ``keep`` (the
        transfer starting now, which may resume its own partial); returns their keys.

        A restarted sender sends the tensor again under a new transfer id: its old partial
        would otherwise hold the space (and count against the cap) until it expires.
        """
        open_stems = {encode_component(k) for k in list(self._open.keys())}
        removed: builtins.list[str] = []
        for entry in self._scan(self._partial_dir):
            if not entry.name.endswith(".json"):
                continue
            stem = entry.name[: -len(".json")]
            if stem in open_stems:
                continue
            header = self._read_partial_header(stem)
            if header is None or header.meta.name != name:
                continue
            if not header.key.startswith(key_prefix) or header.key == keep:
                continue
            self._remove_partial_files(stem)
            removed.append(header.key)
            log.info(
                "discarded partial receive %r of %r: its sender started the tensor again",
                header.key,
                name,
            )
        return removed

    def expire_partials(
        self, older_than_seconds: float, *, now: float | None = None
    ) -> builtins.list[str]:
        """Remove partial receives untouched for ``older_than_seconds``; returns their keys.

        Partials open in this process are kept whatever their age. The same sweep removes
        leftovers of crashes older than the threshold: partial files without a header, data
        files in ``tensors/`` that no sidecar names, and stale temp files.
        """
        now = time.time() if now is None else now
        cutoff = now - older_than_seconds
        open_stems = {encode_component(k) for k in list(self._open.keys())}
        removed: builtins.list[str] = []
        stems: set[str] = set()
        for entry in self._scan(self._partial_dir, hidden=True):
            name = entry.name
            if name.startswith("."):
                self._sweep_if_old(Path(entry.path), cutoff)
                continue
            stem, dot, ext = name.rpartition(".")
            if dot and ext in ("npy", "json", "progress"):
                stems.add(stem)
            else:
                self._sweep_if_old(Path(entry.path), cutoff)
        for stem in stems - open_stems:
            updated = _mtime(*self._partial_files(stem))
            if updated is None or updated >= cutoff:
                continue
            header = self._read_partial_header(stem)
            self._remove_partial_files(stem)
            if header is not None:
                removed.append(header.key)
                log.info(
                    "expired partial receive %r of %r (%d bytes)",
                    header.key,
                    header.meta.name,
                    header.meta.nbytes,
                )
        referenced = {
            found.data.name
            for entry in self._scan(self._tensor_dir)
            if entry.name.endswith(".json")
            and (found := self._read_sidecar(entry.name[: -len(".json")])) is not None
        }
        for entry in self._scan(self._tensor_dir, hidden=True):
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                continue
            if entry.name not in referenced:
                self._sweep_if_old(Path(entry.path), cutoff)
        return removed

    # -- internals

    @staticmethod
    def _scan(directory: Path, *, hidden: bool = False) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    if (hidden or not entry.name.startswith(".")) and entry.is_file(
                        follow_symlinks=False
                    ):
                        yield entry
        except FileNotFoundError:
            return

    @staticmethod
    def _sweep_if_old(path: Path, cutoff: float) -> None:
        with contextlib.suppress(OSError):
            if path.stat(follow_symlinks=False).st_mtime < cutoff:
                path.unlink()
                log.info("removed leftover file %s", path)

    def _find(self, name: str) -> _Sidecar:
        found = self._read_sidecar(encode_component(checked_name(name)))
        if found is None or found.info.name != name:
            raise TensorNotFound(f"no tensor named {name!r} in the store at {self.root}")
        return found

    def _read_sidecar(self, stem: str) -> _Sidecar | None:
        """The sidecar of ``stem``, validated; ``None`` if absent or damaged."""
        path = self._tensor_dir / f"{stem}.json"
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable tensor metadata %s: %s", path, exc)
            return None
        try:
            if not isinstance(raw, dict) or raw.get("version") != _FORMAT_VERSION:
                raise ValueError("not a version 1 sidecar")
            meta = TensorMeta.from_wire(raw.get("meta"), _MAX_SIZE)
            if encode_component(meta.name) != stem:
                raise ValueError(f"it describes {meta.name!r}, another tensor")
            data = raw.get("file")
            # Never join a name read from disk to a path unchecked.
            if not isinstance(data, str) or not re.fullmatch(re.escape(stem) + _GEN_RE, data):
                raise ValueError(f"bad data file name {str(data)[:80]!r}")
            sender = raw.get("sender")
            stored_at = raw.get("stored_at")
            if not isinstance(sender, str) or not isinstance(stored_at, int | float):
                raise ValueError("bad sender or stored_at")
        except (ValueError, ProtocolError) as exc:
            log.warning("ignoring damaged tensor metadata %s: %s", path, exc)
            return None
        return _Sidecar(TensorInfo.of(meta, sender, float(stored_at)), self._tensor_dir / data)

    def _partial_files(self, stem: str) -> tuple[Path, Path, Path]:
        d = self._partial_dir
        return d / f"{stem}.npy", d / f"{stem}.json", d / f"{stem}.progress"

    def _remove_partial_files(self, stem: str) -> None:
        # Header first: without it, what is left is never offered for resume.
        data, header, progress = self._partial_files(stem)
        for p in (header, progress, data):
            _unlink(p)
        _fsync_dir(self._partial_dir)

    def _read_partial_header(self, stem: str) -> _PartialHeader | None:
        path = self._partial_dir / f"{stem}.json"
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable partial receive %s: %s", path, exc)
            return None
        try:
            if not isinstance(raw, dict) or raw.get("version") != _FORMAT_VERSION:
                raise ValueError("not a version 1 partial header")
            key = raw.get("key")
            if not isinstance(key, str) or encode_component(key) != stem:
                raise ValueError("its key does not match its file name")
            meta = TensorMeta.from_wire(raw.get("meta"), _MAX_SIZE)
            cs = raw.get("chunk_size")
            if cs is not None and (not isinstance(cs, int) or isinstance(cs, bool) or cs <= 0):
                raise ValueError("bad chunk_size")
            created = raw.get("created")
            if not isinstance(created, int | float):
                raise ValueError("bad created time")
        except (ValueError, ProtocolError) as exc:
            log.warning("ignoring damaged partial receive %s: %s", path, exc)
            return None
        return _PartialHeader(key, meta, cs, float(created))

    def _partial_data_ok(self, stem: str, meta: TensorMeta) -> bool:
        """Does the partial's data file exist with exactly the header and size ``meta`` needs?"""
        header = _npy_header(meta)
        try:
            with open(self._partial_dir / f"{stem}.npy", "rb") as f:
                size = os.fstat(f.fileno()).st_size
                return size == len(header) + meta.nbytes and f.read(len(header)) == header
        except OSError:
            return False

    def _check_space(self, meta: TensorMeta) -> None:
        """Refuse a tensor the cap or the disk cannot take, before anything is created."""
        need = len(_npy_header(meta)) + meta.nbytes
        if self.max_bytes is not None:
            used = self.used_bytes()
            if used + need > self.max_bytes:
                partial = self._partial_bytes()
                held = f" ({partial} of them in partial receives)" if partial else ""
                raise StoreFull(
                    f"cannot store tensor {meta.name!r} ({meta.nbytes} bytes): the store at "
                    f"{self.root} holds {used} bytes{held} and its cap is {self.max_bytes} bytes; "
                    "delete tensors (tensord rm NAME) or raise the store's size cap; partial "
                    "receives are freed when their sender starts the tensor again or after "
                    "transfer.partial_ttl_seconds"
                )
        try:
            st = os.statvfs(self.root)
        except (OSError, AttributeError):
            return  # no statvfs here: the reservation below still catches a full disk
        free = st.f_bavail * st.f_frsize
        if free < need + _DISK_SLACK:
            raise StoreFull(
                f"cannot store tensor {meta.name!r} ({meta.nbytes} bytes): only {free} bytes "
                f"are free on the disk holding {self.root}; free disk space or delete tensors "
                "(tensord rm NAME)"
            )

    def _full_midway(self, meta: TensorMeta, doing: str) -> StoreFull:
        return StoreFull(
            f"cannot store tensor {meta.name!r} ({meta.nbytes} bytes): the disk holding "
            f"{self.root} filled up while {doing} it (nothing stored was changed); free disk "
            "space or delete tensors (tensord rm NAME)"
        )

    def _create(
        self, stem: str, key: str, meta: TensorMeta, chunk_size: int | None
    ) -> PartialReceive:
        data_path, header_path, _ = self._partial_files(stem)
        header = _npy_header(meta)
        fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _reserve(fd, len(header) + meta.nbytes)
            os.pwrite(fd, header, 0)
            os.fsync(fd)
            _atomic_write(
                header_path,
                json.dumps(
                    {
                        "version": _FORMAT_VERSION,
                        "key": key,
                        "meta": meta.to_wire(),
                        "chunk_size": chunk_size,
                        "created": time.time(),
                    },
                    sort_keys=True,
                ).encode(),
            )
            partial = PartialReceive(self, key, meta, chunk_size, stem, fd, len(header))
        except BaseException as exc:
            _close_quietly(fd)
            self._remove_partial_files(stem)
            if isinstance(exc, OSError) and _is_full(exc):
                raise self._full_midway(meta, "reserving space for") from None
            raise
        self._open[key] = partial
        return partial

    def _reopen(
        self, stem: str, key: str, meta: TensorMeta, chunk_size: int | None
    ) -> PartialReceive | None:
        if not self._partial_data_ok(stem, meta):
            return None
        try:
            fd = os.open(self._partial_dir / f"{stem}.npy", os.O_RDWR)
        except OSError:
            return None
        try:
            partial = PartialReceive(self, key, meta, chunk_size, stem, fd, len(_npy_header(meta)))
        except BaseException:
            _close_quietly(fd)
            raise
        self._open[key] = partial
        return partial

    def _forget(self, partial: PartialReceive) -> None:
        if self._open.get(partial.key) is partial:
            del self._open[partial.key]
