"""A receive in progress: a memory-mapped ``.npy`` file the network layer ``recv_into``\\s.

No full copy in RAM: chunk payloads land straight in :attr:`PartialReceive.buffer`, a flat ``B``
memoryview of the mapping; the pages written are page cache, not anonymous memory, so a 64 GiB
tensor can arrive on a machine with less RAM. The data file already has a valid ``.npy`` layout,
so a commit is a rename; the saved progress (:mod:`.progress`) makes it resumable after a restart.

:class:`PartialReceive` is made and owned by its :class:`~tensord.store.TensorStore` and uses the
store's directories and bookkeeping (one package, one owner of the files).
"""

from __future__ import annotations

import logging
import mmap
import os
import time
import weakref
from pathlib import Path
from typing import Protocol

from ..errors import StoreFull
from ..fsutil import atomic_write as _atomic_write
from ..fsutil import fsync_dir as _fsync_dir
from ..fsutil import start_writeback
from ..fsutil import unlink_quietly as _unlink
from ..fsutil import write_temp as _write_temp
from ..wire.meta import TensorMeta
from .disk import _close_quietly, _is_full
from .names import _data_file_name, encode_component
from .progress import _bytes_have, _progress_bytes, _read_progress
from .records import TensorInfo, _Sidecar, _sidecar_bytes

log = logging.getLogger("tensord.store")


class PartialOwner(Protocol):
    """What a partial uses of the :class:`~tensord.store.TensorStore` that made it: its two
    directories and four pieces of bookkeeping. Stated here so the dependency points one way
    (the store imports this module; this module names no store)."""

    _tensor_dir: Path
    _partial_dir: Path

    def _read_sidecar(self, stem: str) -> _Sidecar | None: ...

    def _remove_partial_files(self, stem: str) -> None: ...

    def _full_midway(self, meta: TensorMeta, doing: str) -> StoreFull: ...

    def _forget(self, partial: PartialReceive) -> None: ...


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
        store: PartialOwner,
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
        self._header_len = header_len
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
        _atomic_write(self._progress_path, _progress_bytes(have, raw_crcs))

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

    def start_writeback(self, stop: int) -> bool:
        """Start writing the tensor's bytes before ``stop`` to disk, in the background of the
        kernel (:func:`~tensord.fsutil.start_writeback`): the received bytes go to the disk while
        the rest arrives, and the commit's ``fsync`` waits only for the tail. Call it only while
        the partial is open, never concurrently with :meth:`commit`, :meth:`close` or
        :meth:`discard` (the descriptor is closed by them)."""
        if self._mmap is None:
            return False
        return start_writeback(self._fd, self._header_len, min(stop, self.meta.nbytes))

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
        data_name = _data_file_name(name_stem)
        sidecar = store._tensor_dir / f"{name_stem}.json"
        body = _sidecar_bytes(self.meta, sender, info.stored_at, data_name)
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
