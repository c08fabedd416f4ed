"""The background download manager: a persistent queue of model pulls and URL downloads.

Runs in the daemon's nursery. A job is started from the control API and runs in the manager's
own nursery, at most ``downloads.max_concurrent`` at a time; two jobs that need the same blob
share its download (:class:`~tensord.download.pull.BlobLocks`). The queue is saved in
``downloads.json`` at every state change, so jobs that were queued or running when the daemon
stopped (or was killed) start again when it comes back - and each blob resumes from its
ranges file instead of from zero. Progress is published on the node's event bus as
:class:`~tensord.events.DownloadEvent`, at most ``PROGRESS_HZ`` times a second per job.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from ..boundary import report_unexpected
from ..config import DownloadSettings
from ..errors import DownloadNotFound
from ..events import DownloadEvent, EventBus
from ..fsutil import atomic_write
from .blobs import BlobStore
from .fetch import DownloadError, FetchConfig, Progress, describe_http_error
from .pull import BlobLocks, PullProgress, make_fetch, pull_model
from .registry import load_credentials, parse_reference
from .sources import PeerSources

log = logging.getLogger("tensord.download")

PROGRESS_HZ = 10
FINAL = frozenset({"done", "failed", "cancelled"})


@dataclass
class Job:
    """One download as the API shows it."""

    id: str
    kind: str  # "model" | "url"
    source: str  # the model reference or the URL
    sha256: str | None = None
    state: str = "queued"
    bytes_done: int = 0
    bytes_total: int | None = None
    connections: int = 0
    #: The most connections this job had open at once (``connections`` is 0 once it ends).
    peak_connections: int = 0
    retries: int = 0
    error: str = ""
    created: float = field(default_factory=time.time)
    finished: float | None = None
    #: Per blob in progress or done in this run: digest -> [done, total].
    layers: dict[str, list[int]] = field(default_factory=dict)
    #: Per blob, bytes by source: digest -> {"origin": n, "<peer id>": n} (peer-first downloads).
    sources: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class DownloadManager:
    """The queue of downloads. ``peers`` makes them peer-first (``downloads.share``): blob
    pieces come from the cluster's peers when any is up and shares, from the origin otherwise."""

    def __init__(
        self,
        root: Path,
        settings: DownloadSettings,
        events: EventBus,
        peers: PeerSources | None = None,
    ) -> None:
        self.root = root
        self.settings = settings
        self.events = events
        self.peers = peers
        self.blobs = BlobStore(root)
        self.jobs: dict[str, Job] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._ended: dict[str, trio.Event] = {}
        self._locks = BlobLocks()
        self._limit = trio.Semaphore(max(1, settings.max_concurrent))
        self._nursery: trio.Nursery | None = None
        self._client: httpx.AsyncClient | None = None
        self._state_file = root / "downloads.json"
        self._last_event: dict[str, float] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        timeout = httpx.Timeout(30.0, connect=10.0)
        async with httpx.AsyncClient(timeout=timeout) as client, trio.open_nursery() as nursery:
            self._client = client
            self._nursery = nursery
            for job in self._load():
                log.info("download %s: %s resumes after a restart", job.id, job.source)
                self._launch(job)
            task_status.started()
            await trio.sleep_forever()

    # -- API ---------------------------------------------------------------------------------

    def start(self, kind: str, source: str, sha256: str | None = None) -> Job:
        """Queue a download; a running or queued one of the same source is returned instead."""
        source = source.strip()
        if kind == "model":
            parse_reference(source)  # a bad reference fails here, before anything is queued
        elif kind == "url":
            if not source.startswith(("http://", "https://")):
                raise DownloadError(f"bad URL {source!r}: expected http:// or https://")
            if sha256 is None or len(sha256) != 64 or set(sha256) - set("0123456789abcdef"):
                raise DownloadError("a URL download needs its expected sha256 (64 hex digits)")
        else:
            raise DownloadError(f"unknown download kind {kind!r}")
        for job in self.jobs.values():
            if job.source == source and job.state not in FINAL:
                return job
        job = Job(secrets.token_hex(6), kind, source, sha256)
        self.jobs[job.id] = job
        self._launch(job)
        return job

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job and return it once it has stopped (its partial blobs are kept, so a
        later pull of the same layers resumes them)."""
        job = self.get(job_id)
        scope = self._scopes.get(job_id)
        if scope is not None:
            scope.cancel()
            with trio.move_on_after(10):
                await self._ended[job_id].wait()
        elif job.state not in FINAL:
            self._finish(job, "cancelled")
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise DownloadNotFound(f"no download with id {job_id!r} (see tensord downloads)")
        return job

    def list(self) -> builtins.list[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)

    # -- running -----------------------------------------------------------------------------

    def _launch(self, job: Job) -> None:
        assert self._nursery is not None, "the manager is not running"
        scope = trio.CancelScope()
        self._scopes[job.id] = scope
        self._ended[job.id] = trio.Event()
        self._save()
        self._publish(job, force=True)
        self._nursery.start_soon(self._run_job, job, scope)

    async def _run_job(self, job: Job, scope: trio.CancelScope) -> None:
        with scope:
            async with self._limit:
                job.state = "running"
                self._save()
                self._publish(job, force=True)
                try:
                    await self._download(job)
                except DownloadError as exc:
                    self._finish(job, "failed", str(exc))
                except httpx.HTTPError as exc:
                    self._finish(job, "failed", describe_http_error(exc, job.source))
                except OSError as exc:
                    why = str(exc) or type(exc).__name__
                    self._finish(job, "failed", f"{job.source}: {why}")
                except Exception as exc:  # a bug: this job fails, the daemon carries on
                    report_unexpected(log, "download", f"download {job.id} of {job.source}", exc)
                    self._finish(job, "failed", f"{job.source}: internal error: {exc!r}")
                else:
                    self._finish(job, "done")
        self._scopes.pop(job.id, None)
        if scope.cancelled_caught:
            self._finish(job, "cancelled")
        self._ended.pop(job.id).set()

    async def _download(self, job: Job) -> None:
        assert self._client is not None
        s = self.settings
        cfg = FetchConfig(
            connections=s.connections, min_piece=s.min_chunk_size, max_bytes=s.max_bytes
        )
        if job.kind == "model":

            def on_model(p: PullProgress) -> None:
                job.bytes_done, job.bytes_total = p.done, p.total
                job.connections, job.retries = p.connections, p.retries
                job.peak_connections = max(job.peak_connections, p.peak_connections)
                for digest, bp in p.blobs.items():
                    job.layers[digest] = [bp.done, bp.total or 0]
                    if bp.sources:
                        job.sources[digest] = dict(bp.sources)
                self._publish(job)

            creds = await trio.to_thread.run_sync(load_credentials, s.credentials_file)
            manifest = await pull_model(
                self._client,
                parse_reference(job.source),
                self.root,
                credentials=creds,
                config=cfg,
                max_concurrent=s.max_concurrent,
                progress=on_model,
                blob_locks=self._locks,
                peers=self.peers,
            )
            job.bytes_done = job.bytes_total = manifest.total
            return
        assert job.sha256 is not None
        digest = f"sha256:{job.sha256}"

        def on_url(p: Progress) -> None:
            job.bytes_done, job.bytes_total = p.done, p.total
            job.connections, job.retries = p.connections, p.retries
            job.peak_connections = max(job.peak_connections, p.peak_connections)
            job.layers[digest] = [p.done, p.total or 0]
            if p.sources:
                job.sources[digest] = dict(p.sources)
            self._publish(job)

        async with self._locks.hold(digest):
            if self.blobs.has(digest):
                job.bytes_done = job.bytes_total = os.stat(self.blobs.path(digest)).st_size
                return
            fetch = make_fetch(
                self._client,
                job.source,
                self.blobs.path(digest),
                self.peers,
                sha256=job.sha256,
                config=cfg,
                progress=on_url,
            )
            await fetch.run()

    def _finish(self, job: Job, state: str, error: str = "") -> None:
        if job.state in FINAL:
            return
        job.state, job.error, job.finished = state, error, time.time()
        job.connections = 0
        if state == "failed":
            log.warning("download %s: %s failed: %s", job.id, job.source, error)
        else:
            log.info("download %s: %s %s (%d bytes)", job.id, job.source, state, job.bytes_done)
        self._save()
        self._publish(job, force=True)

    # -- events and persistence --------------------------------------------------------------

    def _publish(self, job: Job, *, force: bool = False) -> None:
        if not self.events.active:
            return
        now = time.monotonic()
        if not force and now - self._last_event.get(job.id, 0.0) < 1 / PROGRESS_HZ:
            return
        self._last_event[job.id] = now
        state = job.state if force or job.state != "running" else "progress"
        self.events.publish(
            DownloadEvent(
                job.id,
                job.source,
                state,
                job.bytes_done,
                job.bytes_total,
                job.connections,
                job.retries,
                job.error,
                tuple((d, v[0], v[1]) for d, v in job.layers.items()),
                tuple((d, src, n) for d, by in job.sources.items() for src, n in by.items()),
            )
        )

    def _save(self) -> None:
        """Persist the queue (small, rewritten atomically at each state change)."""
        jobs = [j.to_json() for j in self.list()[:200]]
        try:
            atomic_write(self._state_file, json.dumps({"version": 1, "jobs": jobs}).encode())
        except OSError as exc:
            log.warning("cannot save the download queue to %s: %s", self._state_file, exc)

    def _load(self) -> builtins.list[Job]:
        """Jobs from the previous run; those unfinished are returned to be started again."""
        try:
            doc = json.loads(self._state_file.read_text())
            rows = doc["jobs"]
            jobs = [Job(**row) for row in rows if isinstance(row, dict)]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a damaged download queue %s: %s", self._state_file, exc)
            return []
        self.jobs = {j.id: j for j in jobs}
        again = [j for j in jobs if j.state not in FINAL]
        for j in again:
            j.state = "queued"
        return again


__all__ = ["DownloadManager", "Job"]
