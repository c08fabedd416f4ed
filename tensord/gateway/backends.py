"""The cluster's Ollama nodes as gateway backends: health, models, routing, concurrency limits.

Health is checked in the background (``GET /api/version`` and ``/api/tags``), never on the
request path. A request goes to a healthy backend that has the model, the least busy first; each
backend takes at most ``limit`` requests at once, beyond which a request waits up to
``queue_seconds`` for a slot and then gets a 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import trio

from .. import metrics
from .http_client import UpstreamPool

log = logging.getLogger("tensord.gateway")


def model_key(name: str) -> str:
    """``llama3`` and ``llama3:latest`` are the same model."""
    return name if ":" in name else f"{name}:latest"


class Busy(Exception):
    """Every backend with the model is at its concurrency limit."""


class NoBackend(Exception):
    """No healthy backend has the model."""


@dataclass(eq=False)
class Backend:
    node_id: str
    url: str
    limit: int
    healthy: bool = False
    version: str = ""
    models: set[str] = field(default_factory=set)
    in_flight: int = 0
    last_error: str = ""
    slots: trio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.slots = trio.Semaphore(self.limit)


class Backends:
    def __init__(
        self,
        client: httpx.AsyncClient,
        entries: Iterable[tuple[str, str]],
        *,
        limit: int = 4,
        check_seconds: float = 5.0,
        queue_seconds: float = 2.0,
    ) -> None:
        self.client = client
        #: Generation requests' connections (the token path); ``client`` serves the rest.
        self.upstream = UpstreamPool()
        self.limit = limit
        self.check_seconds = check_seconds
        self.queue_seconds = queue_seconds
        self.backends: dict[str, Backend] = {}
        self._changed = trio.Event()
        self.update(entries)

    def update(self, entries: Iterable[tuple[str, str]]) -> None:
        """Adopt the cluster's Ollama nodes (at start and on reload): new ones are checked at
        once, removed ones take no new requests (those running finish)."""
        wanted = {node_id: url.rstrip("/") for node_id, url in entries}
        for node_id in list(self.backends):
            if node_id not in wanted or self.backends[node_id].url != wanted[node_id]:
                del self.backends[node_id]
        for node_id, url in wanted.items():
            if node_id not in self.backends:
                self.backends[node_id] = Backend(node_id, url, self.limit)
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check every backend now (readiness waits for the first round), then periodically."""
        await self.check_all()
        task_status.started()
        while True:
            with trio.move_on_after(self.check_seconds):
                await self._changed.wait()
            self._changed = trio.Event()
            await self.check_all()

    async def check_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for backend in list(self.backends.values()):
                nursery.start_soon(self.check, backend)

    async def check(self, backend: Backend) -> None:
        try:
            with trio.fail_after(max(1.0, self.check_seconds)):
                version = (await self.client.get(f"{backend.url}/api/version")).json()
                tags = (await self.client.get(f"{backend.url}/api/tags")).json()
            backend.version = str(version.get("version", ""))
            backend.models = {model_key(str(m.get("name"))) for m in tags.get("models", [])}
            if not backend.healthy:
                log.info(
                    "gateway backend %s (%s) is up: %s", backend.node_id, backend.url,
                    ", ".join(sorted(backend.models)) or "no models",
                )  # fmt: skip
            backend.healthy = True
            backend.last_error = ""
        except (httpx.HTTPError, trio.TooSlowError, ValueError, AttributeError) as exc:
            if backend.healthy or not backend.last_error:
                log.warning("gateway backend %s (%s) is down: %s", backend.node_id, backend.url,
                            exc or type(exc).__name__)  # fmt: skip
            backend.healthy = False
            backend.last_error = str(exc) or type(exc).__name__

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends.values() if b.healthy]

    def candidates(self, model: str) -> list[Backend]:
        """Healthy backends with ``model``, least busy first."""
        key = model_key(model)
        found = [b for b in self.healthy() if key in b.models]
        return sorted(found, key=lambda b: b.in_flight / b.limit)

    @asynccontextmanager
    async def acquire(self, model: str, exclude: set[str]) -> AsyncIterator[Backend]:
        """A slot on the best backend for ``model`` not in ``exclude``; waits up to
        ``queue_seconds`` when all are at their limit. Raises NoBackend or Busy."""
        chosen: Backend | None = None
        with trio.move_on_after(self.queue_seconds):
            while chosen is None:
                options = [b for b in self.candidates(model) if b.node_id not in exclude]
                if not options:
                    raise NoBackend(model)
                for b in options:
                    try:
                        b.slots.acquire_nowait()
                    except trio.WouldBlock:
                        continue
                    chosen = b
                    break
                else:
                    # All at their limit: wait for the least busy one to free a slot.
                    async with options[0].slots:
                        pass
        if chosen is None:
            raise Busy(model)
        chosen.in_flight += 1
        gauge = metrics.GATEWAY_IN_FLIGHT.labels(chosen.node_id)
        gauge.inc()
        try:
            yield chosen
        finally:
            gauge.dec()
            chosen.in_flight -= 1
            chosen.slots.release()


__all__ = ["Backend", "Backends", "Busy", "NoBackend", "model_key"]
