"""The relay: one worker thread that moves every streamed reply's tokens once its first line
went out - a token costs one ``read(2)`` upstream and one ``write(2)`` downstream, and nothing
of trio's run loop.

Why a thread: with a trio task per stream, each token woke its task through trio's scheduler
(an ``epoll_ctl`` to re-arm the socket, a pass of the run loop, the coroutine layers of the read
and the write): about 70 us of CPU per token on a 2-core VM, of which only some 25 us are the
kernel's. Here every upstream socket of a streamed reply is registered, level-triggered, in one
``epoll`` instance that the relay thread waits on; for each ready socket it reads it, passes the
bytes through the stream's line handler and writes what that returns to the client - a plain
``epoll`` loop, the cheapest Python can relay with. The thread is started with
``trio.to_thread.run_sync`` by :meth:`Relay.run`, in the gateway's nursery, and stopped through
a pipe in the same ``epoll`` when the gateway stops: it is supervised like any task.

A stream's own task stays in charge of it (:meth:`Relay.pump`): it sleeps until the stream
ends, fails or needs it, and cancelling it (its client went away) takes the socket out of the
relay at once. The thread wakes it (``TrioToken.run_sync_soon``) when

- the body ended (the task sends the reply's end),
- the backend or the line handler failed (the error is raised in the task, which ends the reply
  with an error event),
- the client's socket did not take a whole write: the socket is taken out of the relay and the
  task sends the rest with an awaited write before it is put back (TCP backpressure: a slow
  client slows its own backend's reads, nothing is queued),
- the client's socket failed (the task closes it; the request ends as its client went away).

Sharing between the two threads: a stream's sockets are used by the relay thread only while
the stream is registered, and registration changes under the stream's lock - so the task never
closes a socket the thread is using, and a file descriptor the kernel reuses is never read as
the old stream's. What the line handler updates (the request's record) is read by the task only
after it took the stream out. Nothing here knows HTTP: the line handler (the app's) and the
writer (the HTTP server's :class:`BodyWriter`) are given by the caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Protocol

import trio

from ..boundary import report_unexpected
from .http_client import UpstreamError, UpstreamResponse

log = logging.getLogger("tensord.gateway")


class BodyWriter(Protocol):
    """The client side of a streamed reply, as the HTTP server gives it to the app."""

    def write_nowait(self, body: bytes) -> bytes:
        """Frame ``body`` as the reply's next piece and write what the socket takes now; the
        framed bytes it did not take (b"" when it took all). Raises OSError if the client's
        socket failed. Safe to call from another thread: it only writes to the socket."""
        ...

    async def write_rest(self, rest: bytes) -> None:
        """Write what :meth:`write_nowait` left, waiting for the client to take it."""
        ...

    def lost(self) -> None:
        """The client's socket failed under :meth:`write_nowait`: close it (in trio's thread),
        which the request's disconnect watch sees at once."""
        ...


class Relay:
    """The upstream sockets of the streamed replies being relayed, and the thread that reads
    them (:meth:`run`, in the gateway's nursery)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._routes: dict[int, _Route] = {}
        self._stop_r, self._stop_w = os.pipe()
        self._epoll.register(self._stop_r, select.EPOLLIN)
        self._token: trio.lowlevel.TrioToken | None = None
        #: Times a client's socket did not take a whole write (the rest was awaited).
        self.backpressured = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the relay thread until cancelled (the gateway stops)."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_cancelled)
                task_status.started()
                await trio.to_thread.run_sync(self._loop, limiter=trio.CapacityLimiter(1))
                nursery.cancel_scope.cancel()
        finally:
            self._epoll.close()  # in trio's thread, as watch() is: no race
            os.close(self._stop_r)
            os.close(self._stop_w)

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            os.write(self._stop_w, b"x")

    def _loop(self) -> None:
        """The relay thread (a worker of trio's thread cache: its scheduling policy is put
        back when it ends)."""
        epoll, routes, stop = self._epoll, self._routes, self._stop_r
        batch = _set_policy(SCHED_BATCH)
        try:
            while True:
                for fd, _ in epoll.poll():
                    if fd == stop:
                        return
                    route = routes.get(fd)
                    if route is not None:
                        try:
                            route.readable()
                        except Exception as exc:  # a bug: this stream ends, the relay goes on
                            report_unexpected(log, "gateway", "the token relay", exc)
                            route.failed(exc)
        finally:
            if batch:
                _set_policy(SCHED_OTHER)

    async def pump(
        self,
        upstream: UpstreamResponse,
        lines: Callable[[bytes], bytes],
        writer: BodyWriter,
    ) -> None:
        """Relay the rest of ``upstream``'s body (a plain socket's): each read through
        ``lines`` (bytes in, the complete lines to pass on out; called in the relay thread) to
        ``writer``, until the body ends. Raises what reading or ``lines`` raised."""
        assert upstream.fd is not None and self._token is not None
        route = _Route(self, upstream, lines, writer, self._token)
        try:
            while True:
                route.watch()
                await route.wake.wait()
                route.wake = trio.Event()
                if route.client_lost:
                    writer.lost()
                    await trio.sleep_forever()  # until the disconnect watch cancels us
                if route.pending:
                    self.backpressured += 1
                    rest, route.pending = route.pending, b""
                    await writer.write_rest(rest)
                if route.error is not None:
                    raise route.error
                if route.done:
                    return
        finally:
            route.unwatch()


SCHED_BATCH: int = getattr(os, "SCHED_BATCH", -1)
SCHED_OTHER: int = getattr(os, "SCHED_OTHER", -1)


def _set_policy(policy: int) -> bool:
    """Put the calling thread under ``policy`` (Linux); whether it could.

    The relay thread runs as ``SCHED_BATCH``: the same share of the CPU as any thread, but its
    wake-up does not preempt a thread that is running. On a machine with an idle core nothing
    changes (it runs at once there). On a busy one, tokens that arrive while the cores are taken
    are read when a core is free - several per stream in one read and one write, and one wake-up
    for all streams - instead of a context switch per token: measured on 2 cores shared with the
    backend and the client, 101 -> 83 us of gateway CPU per token with 200 streams, one fast
    stream 0.92 -> 0.98 x direct, added latency of paced tokens unchanged. What a token can wait
    on a saturated machine is at most the scheduler's time slice (a few ms)."""
    if policy < 0:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True


class _Route:
    """One stream in the relay: what its socket's reads go through, and why its task is woken."""

    def __init__(
        self,
        relay: Relay,
        upstream: UpstreamResponse,
        lines: Callable[[bytes], bytes],
        writer: BodyWriter,
        token: trio.lowlevel.TrioToken,
    ) -> None:
        assert upstream.fd is not None
        self.relay = relay
        self.fd = upstream.fd
        self.upstream = upstream
        self.lines = lines
        self.writer = writer
        self.token = token
        self.lock = threading.Lock()
        self.watched = False
        self.wake = trio.Event()
        self.pending = b""  # framed bytes the client's socket did not take
        self.error: Exception | None = None
        self.client_lost = False
        self.done = False

    def watch(self) -> None:
        """Put the stream in the relay (the task's thread)."""
        relay = self.relay
        with self.lock:
            if relay._epoll.closed:
                raise UpstreamError("the gateway is stopping")
            self.watched = True
            relay._routes[self.fd] = self
            relay._epoll.register(self.fd, select.EPOLLIN)

    def unwatch(self) -> None:
        """Take the stream out of the relay (either thread; the lock is held)."""
        with self.lock:
            self._unwatch()

    def _unwatch(self) -> None:
        if not self.watched:
            return
        self.watched = False
        relay = self.relay
        if relay._routes.get(self.fd) is self:
            del relay._routes[self.fd]
        # The socket closed meanwhile (the kernel dropped it already), or the relay stopped.
        with contextlib.suppress(OSError, ValueError):
            relay._epoll.unregister(self.fd)

    def readable(self) -> None:
        """The upstream socket is readable: relay what one read brings (the relay thread)."""
        with self.lock:
            if not self.watched:
                return  # taken out while this event was on its way
            out = b""
            try:
                body = self.upstream.read_nowait()
                if body is None:
                    self.done = True
                else:
                    if body:
                        out = self.lines(body)
                    self.done = self.upstream.done
            except Exception as exc:  # raised in the stream's task, which reports it
                self.error = exc
            if out:
                try:
                    self.pending = self.writer.write_nowait(out)
                except OSError:
                    self.client_lost = True
            if self.done or self.pending or self.error is not None or self.client_lost:
                self._unwatch()  # until the task has dealt with it
                with contextlib.suppress(trio.RunFinishedError):
                    self.token.run_sync_soon(self._woken)

    def failed(self, exc: Exception) -> None:
        """:meth:`readable` raised ``exc`` (a bug, reported by the caller): out of the relay,
        its task told - as a failed upstream, so that the reply ends with an error event."""
        with self.lock:
            self.error = UpstreamError(f"internal error in the token relay ({type(exc).__name__})")
            self._unwatch()
        with contextlib.suppress(trio.RunFinishedError):
            self.token.run_sync_soon(self._woken)

    def _woken(self) -> None:
        self.wake.set()


__all__ = ["BodyWriter", "Relay"]
