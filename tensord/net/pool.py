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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

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

    def connection(self) -> _Checkout:
        """Check out a connection (``async with pool.connection() as conn``); it returns to the
        pool if the body succeeds, else is closed.

        A free slot is taken without a scheduler pass (trio's ``Semaphore.acquire`` yields even
        when a slot is free, and a small tensor's whole send costs about three such passes);
        the body checkpoints anyway when it sends. A cancelled caller still takes nothing.
        """
        return _Checkout(self)

    def _returned(self, conn: Connection) -> bool:
        """``conn`` came back from a body that succeeded: keep it idle (or close it if the pool
        or the connection closed meanwhile: returns False then)."""
        conn.last_used = trio.current_time()
        if self.closed or conn.closed:
            return False
        self._idle.append(conn)
        scope = self._reaper_scope
        if scope is not None and scope.deadline == math.inf:
            # Nothing else was idle: this connection's expiry is the earliest.
            scope.deadline = conn.last_used + self.max_idle
        return True

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


class _Checkout:
    """``PeerPool.connection()``: a class rather than an ``asynccontextmanager`` (no generator
    to drive on the way in and out of every send)."""

    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: PeerPool) -> None:
        self._pool = pool
        self._conn: Connection | None = None

    async def __aenter__(self) -> Connection:
        pool = self._pool
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            pool._slots.acquire_nowait()
        except trio.WouldBlock:
            await pool._slots.acquire()
        try:
            conn = await pool._checkout()
        except BaseException:
            pool._slots.release()
            raise
        pool._in_use += 1
        self._conn = conn
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, conn = self._pool, self._conn
        assert conn is not None
        self._conn = None
        try:
            pool._in_use -= 1
            if exc_type is not None:
                pool.stats.evictions += 1
                await conn.aclose()
            elif not pool._returned(conn):
                await conn.aclose()
        finally:
            pool._slots.release()
