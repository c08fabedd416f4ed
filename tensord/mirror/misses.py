"""What the mirror does when the store lacks what a client asked for: fetch it through the daemon.

A manifest is resolved at the upstream at once (it is small, and the client is waiting for it)
and the model it names is queued as a pull in the daemon's
:class:`~tensord.download.manager.DownloadManager` - the same job ``tensord pull-model`` starts,
shared with a pull already running, resumed across restarts, and (with peer-first downloads)
fetched through the cluster. The client then asks for the blobs; each one it asks for before it
has landed is served as it lands (:mod:`.landing`) from the pull that brings it. A blob of a
repository the mirror knows that no pull brings (a digest the client found elsewhere) is queued
as a blob download of its own.

Waiting is driven by the download events (no polling): a waiter re-checks the store at each
event of the job it follows (:meth:`Misses.changed`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import trio

from ..download.fetch import DownloadError
from ..download.manager import FINAL, DownloadManager
from ..download.ranged_get import describe_http_error
from ..download.registry import (
    Reference,
    RegistryAuth,
    fetch_manifest,
    get_manifest,  # the index, not resolved
    load_credentials,
    parse_reference,
)
from ..events import DownloadEvent, Event, EventBus
from .protocol import MirrorError, Upstream
from .store import ModelDir

log = logging.getLogger("tensord.mirror")


class Misses:
    def __init__(
        self,
        models: ModelDir,
        downloads: DownloadManager,
        events: EventBus,
        client: httpx.AsyncClient,
        *,
        credentials_file: Path | None = None,
        max_bytes: int,
    ) -> None:
        self.models = models
        self.downloads = downloads
        self.events = events
        self.client = client
        self.credentials_file = credentials_file
        self.max_bytes = max_bytes
        #: blob digest -> the download job that brings it (a pull this mirror started).
        self._bringing: dict[str, str] = {}
        #: model reference -> (its pull, the manifest resolved for it), while the pull runs.
        self._resolved: dict[str, tuple[str, bytes]] = {}

    async def manifest(self, upstream: Upstream, name: str, reference: str) -> bytes:
        """The manifest ``name:reference`` at ``upstream``, with the pull of its blobs queued."""
        source = upstream.reference(name, reference)
        resolved = self._resolved.get(source)
        if resolved is not None and not self.ended(resolved[0]):
            return resolved[1]  # its pull is still running: the upstream is not asked again
        try:
            ref = parse_reference(source)
            creds = await trio.to_thread.run_sync(load_credentials, self.credentials_file)
            auth = RegistryAuth(self.client, creds)
            manifest = await fetch_manifest(self.client, ref, auth, max_bytes=self.max_bytes)
        except DownloadError as exc:
            log.info("mirror: %s: %s", source, exc)
            if "no such model" in str(exc):
                raise MirrorError(404, "MANIFEST_UNKNOWN", "manifest unknown", str(exc)) from None
            raise MirrorError(502, "UNKNOWN", f"the upstream failed: {exc}") from None
        if reference.startswith("sha256:") and manifest.digest != reference:
            # The digest names an index (a client that resolved the tag at the registry, or an
            # image pinned by digest): serve the index itself; the client picks its platform's
            # manifest and asks for that by digest, which is the pull.
            return await self._index(ref, auth, reference)
        job = self.downloads.start("model", source)
        # What ended pulls were bringing is in the store now, or will not be: forget it.
        self._bringing = {d: j for d, j in self._bringing.items() if not self.ended(j)}
        self._resolved = {s: r for s, r in self._resolved.items() if not self.ended(r[0])}
        self._resolved[source] = (job.id, manifest.raw)
        for blob in manifest.blobs:
            self._bringing[blob.digest] = job.id
        log.info("mirror: %s not in the store: pull %s queued", source, job.id)
        return manifest.raw

    async def _index(self, ref: Reference, auth: RegistryAuth, digest: str) -> bytes:
        """The index ``digest`` exactly as the upstream sent it (its digest checked), kept in
        the blob store - content-addressed like any blob - so the next client is served
        without the upstream."""
        try:
            _, got, _, raw = await get_manifest(self.client, ref, digest, auth)
        except DownloadError as exc:
            raise MirrorError(502, "UNKNOWN", f"the upstream failed: {exc}") from None
        except httpx.HTTPError as exc:
            url = ref.url("manifests", digest)
            detail = describe_http_error(exc, url)
            raise MirrorError(502, "UNKNOWN", f"the upstream failed: {detail}") from None
        if got != digest:  # get_manifest checks a digest it was asked for: a bug if not
            raise MirrorError(502, "UNKNOWN", f"the upstream sent {got} for {digest}")
        await trio.to_thread.run_sync(self.models.keep_manifest, digest, raw)
        log.info("mirror: index %s of %s fetched and kept", digest, ref.repository)
        return raw

    async def bring(self, upstream: Upstream, name: str, digest: str) -> str | None:
        """The download job bringing blob ``digest`` of ``name`` (started here if none is),
        or None when none will (then the caller answers ``BLOB_UNKNOWN``)."""
        job_id = self._bringing.get(digest)
        if job_id is None or self.ended(job_id):
            job_id = await self._start_blob(upstream, name, digest)
        return job_id

    async def _start_blob(self, upstream: Upstream, name: str, digest: str) -> str | None:
        listing = await trio.to_thread.run_sync(self.models.tags_listing, name, digest)
        if listing:  # a stored model lists it (its file was removed): pull that model again
            registry, tag = listing[0]
            scheme = upstream.scheme if registry == upstream.registry else None
            source = f"{scheme}://" if scheme else ""
            job = self.downloads.start("model", f"{source}{registry}/{name}:{tag}")
        elif await trio.to_thread.run_sync(self.models.knows, name):
            url = upstream.blob_url(name, digest)
            job = self.downloads.start("url", url, digest.removeprefix("sha256:"))
        else:
            return None
        self._bringing[digest] = job.id
        log.info("mirror: blob %s of %s not in the store: download %s", digest, name, job.id)
        return job.id

    def ended(self, job_id: str) -> bool:
        """Has the job stopped (done, failed, cancelled, or forgotten)?"""
        job = self.downloads.jobs.get(job_id)
        return job is None or job.state in FINAL

    @staticmethod
    async def changed(events: trio.MemoryReceiveChannel[Event], job_id: str) -> None:
        """Until the next event of job ``job_id`` on ``events`` (a subscription taken before
        the state it follows was read, so nothing is missed); events already queued behind it
        are taken too - they say nothing a fresh look at the store does not."""
        async for event in events:
            if isinstance(event, DownloadEvent) and event.id == job_id:
                break
        while True:
            try:
                events.receive_nowait()
            except trio.WouldBlock:
                return


__all__ = ["Misses"]
