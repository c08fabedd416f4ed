"""Receive buffers that stay resident: a small pool of freed receive memory, reused by size.

Why: a library node hands every arrival to the application as a new array, and on the VMs this
runs on the first touch of new memory is the slowest part of a receive (0.1-0.5 GB/s: the host
backs freed guest pages lazily), far slower than the socket (~2 GB/s). The memory an earlier
arrival used, once the application dropped that array, is already resident: receiving into it
costs nothing extra.

How the memory comes back: each buffer is an anonymous ``mmap`` wrapped in a :class:`_Block`
that exposes it through ``__array_interface__``; the array handed out (and every view of it,
every memoryview of those) keeps the block alive through its ``base`` chain. A
``weakref.finalize`` on the block returns the mapping to the pool only when the last of them is
gone, so memory the application can still reach is never reused. The pool holds at most
``max_bytes``; beyond that the oldest buffers are unmapped (given back to the system).

A buffer taken from the pool for the first time is faulted in by :func:`populate` (one
``madvise(MADV_POPULATE_WRITE)`` call per step instead of one page fault per page), which a
caller may run in a worker thread ahead of the socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from .fsutil import libc_function
from .wire.meta import TensorMeta, numpy_dtype

#: Buffers smaller than this are ordinary ``np.empty`` arrays (malloc recycles them itself).
MIN_POOLED = 1 << 20
#: Bytes of freed buffers a node keeps for reuse, by default.
DEFAULT_MAX_BYTES = 1 << 30
MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels answer EINVAL and we fall back
MADV_HUGEPAGE = 14
PAGE = mmap.PAGESIZE


class _Block:
    """Owner of one anonymous mapping; arrays over it keep it (and so the mapping) alive."""

    def __init__(self, mm: mmap.mmap, nbytes: int) -> None:
        self.mm = mm
        self.nbytes = nbytes
        self.fresh = True  # never written yet: its pages are not resident
        base = np.frombuffer(mm, np.uint8, count=nbytes)
        self.__array_interface__ = {
            "data": (base.ctypes.data, False),
            "shape": (nbytes,),
            "typestr": "|u1",
            "version": 3,
        }


def _new_mapping(nbytes: int) -> mmap.mmap:
    mm = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE)
    with contextlib.suppress(OSError, ValueError):
        mm.madvise(MADV_HUGEPAGE)  # fewer faults where transparent huge pages are "madvise"
    return mm


#: ``madvise(2)`` through ctypes, which lets go of the GIL during the call (``mmap.madvise``
#: keeps it: faulting 256 MiB in would stop the event loop for the whole time).
_madvise = libc_function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
POPULATE_STEP = 8 << 20


def address_of(mm: mmap.mmap) -> int:
    """Where ``mm``'s memory starts (the view taken to find out is released at once)."""
    view = (ctypes.c_char * 1).from_buffer(mm)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def populate(addr: int, length: int, alive: Callable[[], bool] = lambda: True) -> bool:
    """Fault ``length`` bytes at ``addr`` in for writing, ``POPULATE_STEP`` bytes per call, while
    ``alive()`` (checked between steps: the mapping may be closed meanwhile); whether the kernel
    could (``MADV_POPULATE_WRITE`` is Linux >= 5.14). Meant for a worker thread running ahead
    of the socket: it changes no byte (new pages are zero-filled, existing ones untouched)."""
    if _madvise is None:
        return False
    start = addr - addr % PAGE
    stop = addr + length
    while start < stop and alive():
        n = min(POPULATE_STEP, stop - start)
        if _madvise(start, n, MADV_POPULATE_WRITE) != 0:
            return False
        start += n
    return True


class ReceiveBuffers:
    """Freed receive buffers of a node, keyed by size, at most ``max_bytes`` of them kept."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, *, populate: bool = True) -> None:
        #: Bytes of freed buffers kept (0: none; with ``populate`` off too, plain ``np.empty``).
        self.max_bytes = max_bytes
        #: Fault new buffers in ahead of the socket (:meth:`MemorySink.populate`).
        self.populate = populate
        self._free: OrderedDict[int, list[mmap.mmap]] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()  # finalizers run wherever the last reference dies
        #: Counters: buffers reused, buffers made new.
        self.reused = 0
        self.made = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of freed buffers kept for reuse right now."""
        return self._held

    def array(self, meta: TensorMeta) -> tuple[np.ndarray[Any, Any], _Block | None]:
        """A C-contiguous writable array for ``meta`` and its block (``None`` when too small to
        pool). ``block.fresh`` says whether its pages are to be faulted in ahead."""
        nbytes = meta.nbytes
        dtype = numpy_dtype(meta.dtype)
        if nbytes < MIN_POOLED or (self.max_bytes <= 0 and not self.populate):
            return meta.empty_array(), None
        mm = self._take(nbytes)
        fresh = mm is None
        if mm is None:
            mm = _new_mapping(nbytes)
            self.made += 1
        else:
            self.reused += 1
        block = _Block(mm, nbytes)
        block.fresh = fresh and self.populate
        weakref.finalize(block, self._give_back, mm, nbytes)
        flat: np.ndarray[Any, Any] = np.asarray(block)
        return flat.view(dtype).reshape(meta.shape), block

    def _take(self, nbytes: int) -> mmap.mmap | None:
        with self._lock:
            free = self._free.get(nbytes)
            if not free:
                return None
            mm = free.pop()
            if not free:
                del self._free[nbytes]
            self._held -= nbytes
            return mm

    def _give_back(self, mm: mmap.mmap, nbytes: int) -> None:
        dropped: list[mmap.mmap] = []
        with self._lock:
            if nbytes > self.max_bytes:
                dropped.append(mm)
            else:
                self._free.setdefault(nbytes, []).append(mm)
                self._free.move_to_end(nbytes)
                self._held += nbytes
                while self._held > self.max_bytes:
                    size, free = next(iter(self._free.items()))
                    dropped.append(free.pop(0))
                    self._held -= size
                    if not free:
                        del self._free[size]
        for old in dropped:
            with contextlib.suppress(BufferError):
                old.close()

    def clear(self) -> None:
        """Give every kept buffer back to the system."""
        with self._lock:
            free, self._free, self._held = self._free, OrderedDict(), 0
        for mms in free.values():
            for mm in mms:
                with contextlib.suppress(BufferError):
                    mm.close()


__all__ = ["MIN_POOLED", "ReceiveBuffers", "address_of", "populate"]
