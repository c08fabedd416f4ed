"""Pull a whole model: resolve its manifest once, fetch the blobs it lists, keep the manifest.

Blobs already in the store (same digest and size) are not fetched again; the others are fetched
``max_concurrent`` at a time, each with its own parallel ranged connections. The manifest is
written last, so a model is listed only once all its blobs are verified and in place.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from ..fsutil import atomic_write
from .blobs import BlobStore
from .fetch import BlobFetch, FetchConfig, Progress, first_error
from .registry import Credentials, Manifest, Reference, RegistryAuth, fetch_manifest
from .shared_fetch import SharedBlobFetch
from .sources import PeerSources

log = logging.getLogger("tensord.download")


class BlobLocks:
    """One lock per digest being fetched (entries are dropped when nobody holds them)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, digest: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(digest, (trio.Lock(), 0))
        self._locks[digest] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[digest]
            if users == 1:
                del self._locks[digest]
            else:
                self._locks[digest] = (lock, users - 1)


@dataclass
class PullProgress:
    """A model's progress: per blob and in total."""

    ref: str
    total: int
    blobs: dict[str, Progress] = field(default_factory=dict)
    skipped: int = 0  # bytes already present

    @property
    def done(self) -> int:
        return self.skipped + sum(p.done for p in self.blobs.values())

    @property
    def connections(self) -> int:
        return sum(p.connections for p in self.blobs.values())

    @property
    def peak_connections(self) -> int:
        """At least this many connections were open at once (the most of any one blob, or
        all the blobs' current ones together)."""
        most = max((p.peak_connections for p in self.blobs.values()), default=0)
        return max(most, self.connections)

    @property
    def retries(self) -> int:
        return sum(p.retries for p in self.blobs.values())


async def pull_model(
    client: httpx.AsyncClient,
    ref: Reference,
    root: Path,
    *,
    credentials: Credentials | None = None,
    config: FetchConfig | None = None,
    max_concurrent: int = 2,
    progress: Callable[[PullProgress], None] | None = None,
    blob_locks: BlobLocks | None = None,
    peers: PeerSources | None = None,
) -> Manifest:
    """Pull ``ref`` into ``root`` (``blobs/`` and ``manifests/``); returns its manifest.

    ``blob_locks`` is shared by pulls running at the same time, so two models with a common
    layer (or two pulls of one model) download it once: the second waits, then finds it.
    With ``peers`` (peer-first downloads), each blob's pieces come from the cluster's peers
    first and from the origin only what no peer has or will have.
    """
    locks = blob_locks if blob_locks is not None else BlobLocks()
    auth = RegistryAuth(client, credentials or {})
    max_bytes = (config or FetchConfig()).max_bytes
    manifest = await fetch_manifest(client, ref, auth, max_bytes=max_bytes)
    blobs = BlobStore(root)
    state = PullProgress(str(ref), manifest.total)
    todo = []
    for blob in manifest.blobs:
        if blobs.has(blob.digest, blob.size):
            state.skipped += blob.size
        else:
            todo.append(blob)
    log.info(
        "pull %s (%s): %d blobs, %d bytes, %d to fetch",
        ref,
        manifest.digest,
        len(manifest.blobs),
        manifest.total,
        len(todo),
    )
    # Started in the manifest's order (not in whatever order tasks reach a semaphore): nodes
    # that pull the same model together then fetch the same blob at the same moment, and share
    # it. ``max_concurrent`` blobs read from the origin at once; a shared blob gives its slot
    # back as soon as the rest of it comes from peers, so the next blob's origin reads overlap
    # the exchange of the last one's pieces (the origin is the bottleneck: it never idles).
    slots = trio.Semaphore(max(1, max_concurrent))

    async def one(digest: str, size: int, slot: _Slot) -> None:
        with slot:
            async with locks.hold(digest):
                if blobs.has(digest, size):  # another pull fetched it meanwhile
                    state.skipped += size
                    return

                def on_progress(p: Progress) -> None:
                    state.blobs[digest] = p
                    if progress is not None:
                        progress(state)

                fetch = make_fetch(
                    client,
                    ref.url("blobs", digest),
                    blobs.path(digest),
                    peers,
                    size=size,
                    sha256=digest.removeprefix("sha256:"),
                    auth=auth,
                    config=config,
                    progress=on_progress,
                )
                fetch.on_origin_done = slot.release
                await fetch.run()

    try:
        async with trio.open_nursery() as nursery:
            for blob in todo:
                await slots.acquire()
                nursery.start_soon(one, blob.digest, blob.size, _Slot(slots))
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    await trio.to_thread.run_sync(_write_manifest, root, ref, manifest)
    return manifest


class _Slot:
    """One of a pull's origin slots, given back once: when the blob needs nothing more from
    the origin, or when its fetch ends, whichever is first."""

    def __init__(self, slots: trio.Semaphore) -> None:
        self._slots: trio.Semaphore | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None

    def __enter__(self) -> _Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_fetch(
    client: httpx.AsyncClient,
    url: str,
    dest: Path,
    peers: PeerSources | None,
    **kwargs: Any,
) -> BlobFetch:
    """The fetch of one blob: peer-first when the cluster is a source, else the plain one."""
    if peers is None:
        return BlobFetch(client, url, dest, **kwargs)
    return SharedBlobFetch(client, url, dest, peers=peers, **kwargs)


def manifest_path(root: Path, ref: Reference) -> Path:
    """``manifests/<registry>/<repository>/<tag>``: Ollama's layout, with the registry's host
    and port as Ollama writes them (``127.0.0.1:5000``), so ``OLLAMA_MODELS`` can point at the
    model directory. A pull pinned to a digest alone is kept under ``sha256-<hex>``."""
    tag = ref.tag or (ref.digest or "latest").replace(":", "-")
    return root / "manifests" / ref.registry / ref.repository / tag


def _write_manifest(root: Path, ref: Reference, manifest: Manifest) -> None:
    """The manifest's own bytes, as Ollama keeps them: its digest is the file's SHA-256."""
    path = manifest_path(root, ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, manifest.raw)


__all__ = [
    "BlobLocks",
    "PullProgress",
    "make_fetch",
    "manifest_path",
    "pull_model",
]
