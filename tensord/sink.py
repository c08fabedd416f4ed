"""Where a receive writes: an array in memory (a library node) or a file in the store (the daemon).

The network layer only sees :attr:`Sink.buffer`, a flat writable ``B`` memoryview it
``recv_into``\\s chunk payloads; the sink decides what that memory is and what "complete" means.
A :class:`MemorySink` is an ``np.empty`` array that becomes the received tensor. A
:class:`StoreSink` is a memory-mapped partial file of the :class:`~tensord.store.TensorStore`:
its progress is checkpointed to disk while the receive runs (so a daemon that is killed resumes
from the last checkpoint, not from zero) and :meth:`StoreSink.commit` renames it into place only
once the whole tensor has been verified. The slow file operations (``msync``, ``fsync``) run in a
worker thread, so the event loop keeps receiving meanwhile.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import trio

from .buffers import ReceiveBuffers, populate
from .errors import DestinationMismatch, TransferFailed
from .limits import MAX_CHUNK
from .net.connection import Connection
from .store import PartialReceive, StoreFull, TensorInfo, TensorStore
from .wire.messages import Begin
from .wire.meta import TensorMeta, numpy_dtype
from .wire.transfer import ReceiveTransfer

log = logging.getLogger("tensord.transfer")


def flat_bytes(array: np.ndarray[Any, Any]) -> memoryview:
    """A flat, writable-if-possible ``B`` view of a C-contiguous array: no copy."""
    flat: Any = array.reshape(-1).view(np.uint8)
    return memoryview(flat)


class Sink(Protocol):
    """The destination of one receive."""

    meta: TensorMeta
    buffer: memoryview
    #: Does it outlive the process (is checkpointing worth it)?
    persistent: bool

    def worker(self) -> Callable[[], None] | None:
        """Work for a thread beside the receive about to start, if it has any (asked on the event
        loop once per receive, a resumed one too): new memory is faulted in ahead of the socket,
        a store file's landed bytes are written back behind it. It runs until :meth:`stopped`."""

    def landed(self, nbytes: int) -> None:
        """``nbytes`` of the tensor have arrived (called for every chunk: cheap)."""

    def stopped(self) -> None:
        """The receive stopped: what its :meth:`worker` still does in a thread ends."""

    def restore(self, xfer: ReceiveTransfer) -> None:
        """Load progress saved by an earlier process into ``xfer`` (if any)."""

    async def checkpoint(self, xfer: ReceiveTransfer) -> bool:
        """Persist ``xfer``'s progress so a restart can resume from it; whether it saved."""

    async def commit(self, sender: str) -> np.ndarray[Any, Any]:
        """The verified tensor: make it the stored one and return it."""

    async def close(self) -> None:
        """Stop for now; keep what arrived for a resume."""

    async def discard(self) -> None:
        """Give up; free what arrived."""


def _too_big(meta: TensorMeta, exc: BaseException) -> TransferFailed:
    return TransferFailed(
        f"cannot allocate {meta.nbytes} bytes for {meta.name!r}: {exc}", code="quota"
    )


class MemorySink:
    """An array in memory; committing hands it over as the tensor.

    The array is the caller's own (``into``: ``receive_tensor(into=...)``, ``pull_tensor(out=...)``,
    checked by :func:`check_destination` before any byte lands), else one from the node's pool of
    freed receive buffers (``buffers``), else a new ``np.empty``. ``claim`` is the waiting
    ``receive_tensor(into=...)`` call the caller's array came from: it is told when the receive
    ends without the tensor, so the array is free again.
    """

    persistent = False

    def __init__(
        self,
        meta: TensorMeta,
        *,
        into: np.ndarray[Any, Any] | None = None,
        buffers: ReceiveBuffers | None = None,
        claim: Claim | None = None,
    ) -> None:
        self.meta = meta
        self.claim = claim
        self._mapping: mmap.mmap | None = None
        self._stopped = False
        if into is not None:
            check_destination(meta, into)
            self.array = into
        else:
            try:
                if buffers is not None:
                    self.array, block = buffers.array(meta)
                    if block is not None and block.fresh:
                        self._mapping = block.mm
                else:
                    self.array = meta.empty_array()
            except (MemoryError, ValueError, OSError) as exc:
                raise _too_big(meta, exc) from None
        self.buffer = flat_bytes(self.array)

    def worker(self) -> Callable[[], None] | None:
        """New memory from the pool is faulted in ahead of the socket (:meth:`_populate`)."""
        return self._populate if self._mapping is not None else None

    def _populate(self) -> None:
        """Fault the whole array in, a few MiB per system call, until the receive stops: the
        socket then writes into resident pages."""
        if self._mapping is not None:
            self._mapping = None
            populate(self.array.ctypes.data, self.array.nbytes, lambda: not self._stopped)

    def landed(self, nbytes: int) -> None:
        pass

    def stopped(self) -> None:
        self._stopped = True

    def restore(self, xfer: ReceiveTransfer) -> None:
        pass

    async def checkpoint(self, xfer: ReceiveTransfer) -> bool:
        return False

    async def commit(self, sender: str) -> np.ndarray[Any, Any]:
        return self.array

    async def close(self) -> None:
        pass

    async def discard(self) -> None:
        if self.claim is not None:
            self.claim.release()


class Claim(Protocol):
    """A ``receive_tensor(into=...)`` call whose array a receive writes into."""

    def release(self) -> None:
        """The receive ended without the tensor: the caller's array is no longer written."""

    def bind(self, scope: trio.CancelScope) -> None:
        """The receive writing into the array runs in ``scope`` (cancelled with the call)."""


def check_destination(meta: TensorMeta, into: object) -> None:
    """Refuse an array the tensor ``meta`` cannot land in, before any byte does."""
    if not isinstance(into, np.ndarray):
        raise DestinationMismatch(
            f"cannot receive {meta.name!r} into a {type(into).__name__}: pass a numpy array"
        )
    if not into.flags.c_contiguous or not into.flags.writeable:
        raise DestinationMismatch(
            f"cannot receive {meta.name!r} into an array that is not C-contiguous and writable: "
            "pass np.empty(...) or np.ascontiguousarray(...) of your own"
        )
    dtype = numpy_dtype(meta.dtype)
    if into.dtype != dtype or into.shape != meta.shape:
        raise DestinationMismatch(
            f"tensor {meta.name!r} is {dtype}{list(meta.shape)}, the array given to receive "
            f"it into is {into.dtype}{list(into.shape)}: pass an array of that shape and dtype"
        )


class StoreSink:
    """A partial file in the store, checkpointed while it fills and committed atomically.

    ``as_name`` stores the tensor under another name than the one on the wire (a pull's
    ``--as``). Checkpoints and the commit are serialized by a lock, and nothing is saved after
    the commit or a close started: the mapping is gone by then.
    """

    persistent = True

    def __init__(
        self,
        store: TensorStore,
        meta: TensorMeta,
        key: str,
        chunk_size: int | None,
        *,
        as_name: str | None = None,
    ) -> None:
        self.meta = meta
        self.store = store
        stored_meta = meta if as_name is None else replace(meta, name=as_name)
        try:
            self.partial: PartialReceive = store.begin_receive(
                stored_meta, key, chunk_size=chunk_size
            )
        except StoreFull as exc:
            raise TransferFailed(str(exc), code="quota") from None
        except OSError as exc:
            raise TransferFailed(
                f"cannot store {meta.name!r} in {store.root}: {exc.strerror or exc}", code="quota"
            ) from None
        self.buffer = self.partial.buffer
        self._lock = trio.Lock()
        self._saved_count = -1
        self._ended = False
        self._writeback: _WriteBehind | None = None  # one per receive (a resumed one too)

    # The mapped file is not faulted in ahead: measured on this class of machine (a 256 MiB
    # receive), faulting it in moved ~0.06 s of page-cache work off the event loop and showed no
    # gain between daemons, whose time goes to the commit's fsync. The worker thread writes the
    # landed bytes back instead, so that fsync has only the tail left to wait for.

    def worker(self) -> Callable[[], None] | None:
        if self._ended or self.meta.nbytes <= WRITEBACK_STEP:
            return None
        self._writeback = _WriteBehind(self.partial)
        return self._writeback.run

    def landed(self, nbytes: int) -> None:
        if self._writeback is not None:
            self._writeback.landed(nbytes)

    def stopped(self) -> None:
        self._stop_writeback()

    def _stop_writeback(self) -> None:
        """Ends the receive's write-behind thread; returns once no system call on the file runs."""
        if self._writeback is not None:
            self._writeback.stop()

    def restore(self, xfer: ReceiveTransfer) -> None:
        saved = self.partial.load_progress()
        if saved is None:
            return
        have, crcs = saved
        try:
            xfer.restore(have, crcs)
        except ValueError as exc:
            log.warning("ignoring saved progress of %r: %s", self.partial.key, exc)
            return
        self._saved_count = xfer.have_count
        log.info(
            "tensor transfer %s: found %d of %d bytes of %r on disk from before a restart",
            xfer.id,
            xfer.bytes_have,
            self.meta.nbytes,
            self.meta.name,
        )

    async def checkpoint(self, xfer: ReceiveTransfer) -> bool:
        async with self._lock:
            if self._ended or xfer.have_count == self._saved_count:
                return False
            # The snapshot is taken here, on the event loop, so every chunk it lists has its
            # bytes in the mapping already; save_progress flushes them before writing it.
            have, crcs = xfer.progress()
            count = xfer.have_count
            await trio.to_thread.run_sync(self.partial.save_progress, have, crcs)
            self._saved_count = count
            return True

    async def commit(self, sender: str) -> np.ndarray[Any, Any]:
        def commit() -> TensorInfo:
            self._stop_writeback()  # waits for a sync_file_range still running on the file
            return self.partial.commit(sender)

        async with self._lock:
            self._ended = True
            try:
                info = await trio.to_thread.run_sync(commit)
            except StoreFull as exc:
                raise TransferFailed(str(exc), code="quota") from None
        return self.store.load(info.name)

    async def close(self) -> None:
        async with self._lock:  # not while a checkpoint thread flushes the mapping
            self._ended = True
            await trio.to_thread.run_sync(self._stop_writeback)
            self.partial.close()

    async def discard(self) -> None:
        async with self._lock:
            self._ended = True
            await trio.to_thread.run_sync(self._stop_writeback)
            self.partial.discard()


#: Received bytes are handed to the kernel's writeback in steps of this many (a 256 MiB tensor:
#: 16 system calls, each in the worker thread).
WRITEBACK_STEP = 16 << 20


class _WriteBehind:
    """Writes a partial file's received bytes back to disk while the rest arrives.

    Why: the commit syncs the whole tensor before ``Stored`` is answered; without this the
    kernel starts writing only then (or when its dirty limits say so), and a receive into the
    store takes the network's time *plus* the disk's. Here a worker thread asks for the writeback
    of each ``WRITEBACK_STEP`` that landed (``sync_file_range``, no waiting), so the disk works
    while the socket does and the ``fsync`` waits only for the tail.

    The event loop only calls :meth:`landed` (an integer compare per chunk; a lock and a notify
    per step); :meth:`stop` ends the thread and returns once no system call on the file is
    running, so the file can be committed or closed.
    """

    def __init__(self, partial: PartialReceive) -> None:
        self._partial = partial
        self._next = WRITEBACK_STEP
        self._landed = 0
        self._stopped = False
        self._cond = threading.Condition()
        self._busy = threading.Lock()  # held during each system call on the file

    def landed(self, nbytes: int) -> None:
        if nbytes >= self._next:
            self._next = nbytes + WRITEBACK_STEP
            with self._cond:
                self._landed = nbytes
                self._cond.notify()

    def run(self) -> None:
        done = 0
        while True:
            with self._cond:
                while not self._stopped and self._landed <= done:
                    self._cond.wait()
                if self._stopped:
                    return
                upto = self._landed
            with self._busy:
                if self._stopped or not self._partial.start_writeback(upto):
                    return
            done = upto

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        with self._busy:  # a system call still running on the file ends first
            pass


def open_sink(
    store: TensorStore | None,
    meta: TensorMeta,
    key: str,
    chunk_size: int | None,
    as_name: str | None = None,
    *,
    into: np.ndarray[Any, Any] | None = None,
    buffers: ReceiveBuffers | None = None,
    claim: Claim | None = None,
) -> Sink:
    """Where a receive writes: a partial file in the store, else the caller's array (``into``),
    else pooled or new memory."""
    if store is not None:
        if into is not None:
            check_destination(meta, into)  # the tensor is stored, then copied into it
        return StoreSink(store, meta, key, chunk_size, as_name=as_name)
    return MemorySink(meta, into=into, buffers=buffers, claim=claim)


def new_receive(
    store: TensorStore | None,
    conn: Connection,
    begin: Begin,
    key: str,
    as_name: str | None = None,
    *,
    into: np.ndarray[Any, Any] | None = None,
    buffers: ReceiveBuffers | None = None,
    claim: Claim | None = None,
) -> tuple[ReceiveTransfer, Sink]:
    """A receive of what ``begin`` announces on ``conn`` and its sink, with the progress an
    earlier process saved of it (a served send and a pull receive alike)."""
    sink = open_sink(
        store, begin.meta, key, begin.chunk_size, as_name, into=into, buffers=buffers, claim=claim
    )
    try:
        xfer = ReceiveTransfer(
            begin,
            sink.buffer,
            sender=conn.peer_id,
            crc=conn.agreement.crc,
            lz4=conn.agreement.lz4,
            max_chunk=MAX_CHUNK,
        )
    except BaseException:
        # Nothing arrived: free the space at once (discard of a fresh partial never waits).
        if isinstance(sink, StoreSink):
            sink.partial.discard()
        elif isinstance(sink, MemorySink) and sink.claim is not None:
            sink.claim.release()
        raise
    sink.restore(xfer)
    return xfer, sink


__all__ = [
    "Claim",
    "MemorySink",
    "Sink",
    "StoreSink",
    "check_destination",
    "flat_bytes",
    "new_receive",
    "open_sink",
]
