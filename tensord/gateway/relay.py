"""One task that relays every streamed reply once its first line went out: a token costs one
``read(2)`` upstream, one ``write(2)`` downstream and no task switch.

Why: with a task per stream, each token woke its task through trio's scheduler (an
``epoll_ctl`` to re-arm the socket, a pass of the run loop, the coroutine layers of the read and
the write) - some 40 us of CPU per token on a small VM, more than the two system calls it is
for. Here every upstream socket of a streamed reply is registered, level-triggered, in one
``epoll`` instance of our own; :meth:`Relay.run` waits on that instance's descriptor (one
trio wait however many streams are ready) and, for each ready socket, reads it, hands the bytes
to the stream's line handler and writes what it returns to the client - synchronously, so the
tokens of every stream that is ready at once cost one wake-up between them.

A stream's own task stays in charge of it (:meth:`Relay.pump`): it sleeps until its stream
ends, fails or needs it, and cancelling it (its client went away) takes the socket out of the
relay at once. It is woken when

- the body ended (the task sends the reply's end),
- the backend or the line handler failed (the error is raised in the task, which ends the reply
  with an error event, as before),
- the client's socket did not take a whole write: the socket is taken out of the relay and the
  task sends the rest with an awaited write before it is put back (TCP backpressure: a slow
  client slows its own backend's reads, nothing is queued).

Nothing here knows HTTP: the line handler (the app's) and the writer (the HTTP server's
:class:`BodyWriter`) are given by the caller.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Callable
from typing import Protocol

import trio

from .http_client import UpstreamResponse


class BodyWriter(Protocol):
    """The client side of a streamed reply, as the HTTP server gives it to the app."""

    def write_nowait(self, body: bytes) -> bytes:
        """Frame ``body`` as the reply's next piece and write what the socket takes now; the
        framed bytes it did not take (b"" when it took all, or when the client is gone)."""
        ...

    async def write_rest(self, rest: bytes) -> None:
        """Write what :meth:`write_nowait` left, waiting for the client to take it."""
        ...


class Relay:
    """The upstream sockets of the streamed replies being relayed, and the task that reads them
    (:meth:`run`, in the gateway's nursery)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._routes: dict[int, _Route] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay until cancelled (the gateway stops)."""
        epoll, routes = self._epoll, self._routes
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, max(1, len(routes))):
                    route = routes.get(fd)
                    if route is not None:
                        route.readable()
        finally:
            for fd in list(routes):
                self._unwatch(fd)
            epoll.close()

    async def pump(
        self,
        upstream: UpstreamResponse,
        lines: Callable[[bytes], bytes],
        writer: BodyWriter,
    ) -> None:
        """Relay the rest of ``upstream``'s body (a plain socket's): each read through
        ``lines`` (bytes in, the complete lines to pass on out) to ``writer``, until the body
        ends. Raises what reading or ``lines`` raised."""
        assert upstream.fd is not None
        route = _Route(self, upstream, lines, writer)
        while True:
            self._watch(upstream.fd, route)
            try:
                await route.wake.wait()
            finally:
                self._unwatch(upstream.fd)
            route.wake = trio.Event()
            if route.pending:
                rest, route.pending = route.pending, b""
                await writer.write_rest(rest)
            if route.error is not None:
                raise route.error
            if route.done:
                return

    def _watch(self, fd: int, route: _Route) -> None:
        self._routes[fd] = route
        self._epoll.register(fd, select.EPOLLIN)

    def _unwatch(self, fd: int) -> None:
        if self._routes.pop(fd, None) is not None:
            # Closed meanwhile: the kernel dropped it already.
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)


class _Route:
    """One stream in the relay: what its socket's reads go through, and why its task is woken."""

    def __init__(
        self,
        relay: Relay,
        upstream: UpstreamResponse,
        lines: Callable[[bytes], bytes],
        writer: BodyWriter,
    ) -> None:
        self.relay = relay
        self.upstream = upstream
        self.lines = lines
        self.writer = writer
        self.wake = trio.Event()
        self.pending = b""  # framed bytes the client's socket did not take
        self.error: Exception | None = None
        self.done = False

    def readable(self) -> None:
        """The upstream socket is readable: relay what one read brings (the relay task)."""
        try:
            body = self.upstream.read_nowait()
            if body is None:
                self.done = True
            else:
                if body:
                    out = self.lines(body)
                    if out:
                        self.pending = self.writer.write_nowait(out)
                self.done = self.upstream.done
        except Exception as exc:  # raised in the stream's task, which reports it
            self.error = exc
        if self.done or self.pending or self.error is not None:
            assert self.upstream.fd is not None
            self.relay._unwatch(self.upstream.fd)  # until the task has dealt with it
            self.wake.set()


__all__ = ["BodyWriter", "Relay"]
