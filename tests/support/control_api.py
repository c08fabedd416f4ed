"""A test's own view of a daemon's control API: raw ``httpx`` over its Unix socket (no client
library, so the tests see the HTTP the daemon speaks), its readiness, and its events stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from .daemons import Daemon

#: One event of the stream: (when this process received it, the event).
Seen = tuple[float, dict[str, Any]]


def http(d: Daemon) -> httpx.AsyncClient:
    """An HTTP client of ``d``'s control socket (generous timeouts: a busy machine is slow)."""
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(d.socket)),
        base_url="http://tensord",
        timeout=httpx.Timeout(120, connect=5),
    )


async def ready(d: Daemon) -> None:
    """Until ``d`` logs that its control socket is listening."""
    await d.wait_for("control socket")


@asynccontextmanager
async def events(d: Daemon) -> AsyncIterator[trio.MemoryReceiveChannel[Seen]]:
    """The daemon's SSE stream as (time received, event) pairs; yields once subscribed."""
    send, recv = trio.open_memory_channel[Seen](100_000)
    subscribed = trio.Event()

    async def pump() -> None:
        async with http(d) as c, c.stream("GET", "/v1/events") as r:
            assert r.headers["content-type"] == "text/event-stream"
            async for line in r.aiter_lines():
                if line == ": subscribed":
                    subscribed.set()
                elif line.startswith("data: "):
                    send.send_nowait((time.time(), json.loads(line[6:])))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump)
        await subscribed.wait()
        yield recv
        nursery.cancel_scope.cancel()


async def wait_download(
    seen: trio.MemoryReceiveChannel[Seen], job: str, state: str
) -> dict[str, Any]:
    """The download event of job ``job`` reaching ``state`` (within 60 s)."""
    with trio.fail_after(60):
        async for _, ev in seen:
            if ev["kind"] == "download" and ev["id"] == job and ev["state"] == state:
                return ev  # type: ignore[no-any-return]
    raise AssertionError("the events stream ended")
