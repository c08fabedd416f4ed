"""The store itself: :class:`TensorStore` finds, loads, deletes and stores tensors under its root,
and begins, lists and expires the partial receives it owns (see :mod:`tensord.store` for why the
store has this shape).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import secrets
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadTensor, ProtocolError, StoreFull, TensorError, TensorNotFound
from ..fsutil import atomic_write as _atomic_write
from ..fsutil import fsync_dir as _fsync_dir
from ..fsutil import unlink_quietly as _unlink
from ..limits import check_name
from ..wire.meta import TensorMeta, numpy_dtype
from .disk import _DISK_SLACK, _close_quietly, _is_full, _mtime, _reserve
from .names import checked_name, encode_component
from .partial import PartialReceive
from .progress import _bytes_have, _read_progress
from .records import (
    PartialInfo,
    TensorInfo,
    _npy_header,
    _partial_header_bytes,
    _PartialHeader,
    _read_partial_header,
    _read_sidecar,
    _Sidecar,
    _storage_dtype,
    _validated,
)

log = logging.getLogger("tensord.store")


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
        return _read_sidecar(self._tensor_dir, stem)

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
        return _read_partial_header(self._partial_dir, stem)

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
            _atomic_write(header_path, _partial_header_bytes(key, meta, chunk_size, time.time()))
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
