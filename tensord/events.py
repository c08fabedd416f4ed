"""Node events, pushed to subscribers as they happen (the control API's SSE stream, progress
bars, tests that wait for "the first connection attempt failed" without sleeping).

Publishing never blocks a transfer: each subscriber has a bounded buffer, and a subscriber that
falls behind loses events (counted in ``dropped``) rather than slowing the data path.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio


@dataclass(frozen=True, slots=True)
class Event:
    at: float = field(default_factory=time.time, kw_only=True)

    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclass(frozen=True, slots=True)
class PeerEvent(Event):
    """A peer's state changed: ``connected``, ``connect_failed``, ``disconnected``."""

    peer: str
    state: str
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferEvent(Event):
    """Progress of a transfer: ``started``, ``progress``, ``retry``, ``done``, ``failed``.
    Built with keywords only: nine fields, several of them strings, are easy to swap."""

    id: str
    name: str
    peer: str
    direction: str  # "send" | "receive"
    state: str
    bytes_done: int
    bytes_total: int
    retries: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ArrivalEvent(Event):
    """A tensor was received and stored."""

    name: str
    sender: str
    nbytes: int


@dataclass(frozen=True, slots=True)
class DownloadEvent(Event):
    """A background download (a model pull or a URL): ``queued``, ``running``, ``progress``,
    ``done``, ``failed``, ``cancelled``. ``connections`` is the parallel connections in use."""

    id: str
    source: str
    state: str
    bytes_done: int
    bytes_total: int | None
    connections: int = 0
    retries: int = 0
    detail: str = ""
    #: Per blob: (digest, bytes done, bytes total), for per-layer progress.
    layers: tuple[tuple[str, int, int], ...] = ()
    #: Per blob and source: (digest, "origin" or a peer's id, bytes) (peer-first downloads).
    sources: tuple[tuple[str, str, int], ...] = ()


class EventBus:
    def __init__(self, buffer: int = 1024) -> None:
        self._buffer = buffer
        self._subscribers: set[trio.MemorySendChannel[Event]] = set()
        self.dropped = 0

    @property
    def active(self) -> bool:
        """Is anyone listening? Callers skip building events nobody will read."""
        return bool(self._subscribers)

    def publish(self, event: Event) -> None:
        for chan in list(self._subscribers):
            try:
                chan.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(chan)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[Event]]:
        send, receive = trio.open_memory_channel[Event](self._buffer)
        self._subscribers.add(send)
        try:
            async with receive:
                yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
