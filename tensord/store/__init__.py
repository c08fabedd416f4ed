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

from ..errors import StoreFull
from .names import checked_name, encode_component
from .partial import PartialReceive
from .records import PartialInfo, TensorInfo
from .tensor_store import TensorStore

__all__ = [
    "PartialInfo",
    "PartialReceive",
    "StoreFull",
    "TensorInfo",
    "TensorStore",
    "checked_name",
    "encode_component",
]
