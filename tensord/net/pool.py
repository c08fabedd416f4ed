"""A pool of connections to one peer.

Connections are checked out exclusively (one transfer at a time per connection, so frames of
two transfers never interleave on a stream), at most ``max_connections`` exist at once (the
next caller waits for one to come back), an idle connection is closed after ``max_idle`` seconds
by a reaper task that sleeps until the next expiry (so ``autojump_clock`` tests it instantly),
and a connection that failed, or that has something to read while idle (EOF, a stray error
frame), is evicted and the next checkout dials anew.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from .connection import Connection

Dialer = Callable[[], Awaitable[Connection]]


@dataclass
class PoolStats:
    dials: int = 0
    reuses: int = 0
    evictions: int = 0
    idle_closed: int = 0


class PeerPool:
    def __init__(self, dial: Dialer, *, max_connections: int, max_idle: float) -> None:
        self._dial = dial
        self.max_connections = max_connections
        self.max_idle = max_idle
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[Connection] = []  # most recently used last
        self._in_use = 0
        #: The reaper's sleep. A connection returned while nothing else was idle sets its
        #: deadline rather than waking the reaper: a task switch per send otherwise (the
        #: reaper ran while the connection was out, found nothing idle and disarmed).
        self._reaper_scope: trio.CancelScope | None = None
        self.stats = PoolStats()
        self.closed = False

    def size(self) -> int:
        """Open connections: idle plus in use."""
        return len(self._idle) + self._in_use

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        return self._in_use

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """Check out a connection; it returns to the pool if the body succeeds, else is closed.

        A free slot is taken without a scheduler pass (trio's ``Semaphore.acquire`` yields even
        when a slot is free, and a small tensor's whole send costs about three such passes);
        the body checkpoints anyway when it sends. A cancelled caller still takes nothing.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            conn = await self._checkout()
            self._in_use += 1
            try:
                yield conn
            except BaseException:
                self._in_use -= 1
                self.stats.evictions += 1
                await conn.aclose()
                raise
            self._in_use -= 1
            conn.last_used = trio.current_time()
            if self.closed or conn.closed:
                await conn.aclose()
            else:
                self._idle.append(conn)
                scope = self._reaper_scope
                if scope is not None and scope.deadline == math.inf:
                    # Nothing else was idle: this connection's expiry is the earliest.
                    scope.deadline = conn.last_used + self.max_idle
        finally:
            self._slots.release()

    async def _checkout(self) -> Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.looks_alive():
                self.stats.reuses += 1
                return conn
            self.stats.evictions += 1
            await conn.aclose()
        if self.closed:
            raise trio.ClosedResourceError("the pool is closed")
        self.stats.dials += 1
        return await self._dial()

    async def reap_idle(self) -> None:
        """Run forever: close connections idle for longer than ``max_idle``.

        It sleeps until the earliest expiry it knows of. A connection returned later expires
        later, so the reaper need not hear of it, unless nothing was idle: then the return sets
        the sleep's deadline (no task switch). A connection reused meanwhile is found unexpired
        when the reaper wakes, and it sleeps again until the next expiry.
        """
        while True:
            now = trio.current_time()
            expired = [c for c in self._idle if now - c.last_used >= self.max_idle]
            keep = [c for c in self._idle if now - c.last_used < self.max_idle]
            self._idle = keep
            for conn in expired:
                self.stats.idle_closed += 1
                await conn.aclose()
            next_expiry = min((c.last_used + self.max_idle for c in self._idle), default=math.inf)
            with trio.CancelScope(deadline=next_expiry) as scope:
                self._reaper_scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._reaper_scope = None

    async def aclose(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()
