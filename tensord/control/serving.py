"""Serving HTTP connections with hypercorn under two limits hypercorn does not have.

Both local HTTP front ends (the control socket, the token gateway) accept connections in their
own loop and hand each stream to hypercorn's per-connection ``TCPServer``; this module is what
they share between the accept and the hand-over:

- **A cap on connections** (``max_connections``). When every slot is taken, the connection that
  has been *idle* longest (no request in progress: a keep-alive connection between requests, or
  one still sending its request head) is closed to make room; when none is idle, the newcomer
  gets a ``503`` naming the limit and is closed. So a client that opens connections and sends
  nothing cannot lock others out, while a connection doing real work (a relayed stream, a
  transfer) is never dropped for a newcomer.
- **A deadline on the request** (``read_timeout``). The head must arrive within it (hypercorn's
  keep-alive timer runs until a request head is complete, and is set no longer than
  ``read_timeout``), and the body within ``read_timeout`` of the head, plus one second per MiB
  received (``MIN_BODY_RATE``: a large upload that keeps coming is never cut): a client that
  announces a ``Content-Length`` and then trickles or stalls gets a ``408`` and is closed.
  hypercorn's own ``read_timeout`` is not used: it bounds the gap between any two reads, which a
  trickle defeats, and it would also cut a client that legitimately sends nothing while a long
  reply streams to it (an SSE token stream, the events stream, a ``send`` that takes minutes).

The wrapped ASGI app also receives the connection's extras in ``scope["extensions"]`` (the
control socket puts the caller's credentials there).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from hypercorn.utils import wrap_app

from ..config import HostPort

log = logging.getLogger("tensord.http")

#: How long a refused client is given to finish sending its request head before the refusal
#: (reading it first means the client reads our answer instead of a reset).
REFUSAL_READ_SECONDS = 2.0
#: Each byte of body received extends the body's deadline by 1/MIN_BODY_RATE seconds.
MIN_BODY_RATE = float(1 << 20)


class RequestTimeout(TimeoutError):
    """The request body did not arrive within ``read_timeout`` of its head (answered ``408``)."""


class _Conn:
    """One accepted connection: whether a request is in progress, since when it is idle, and
    the scope that closes it."""

    def __init__(self) -> None:
        self.busy = 0
        self.idle_since = trio.current_time()
        self.scope = trio.CancelScope()

    def begin(self) -> None:
        self.busy += 1

    def end(self) -> None:
        self.busy -= 1
        if not self.busy:
            self.idle_since = trio.current_time()


class Connections:
    """The open connections of one server, at most ``limit`` of them."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.open: set[_Conn] = set()
        self.evicted = 0
        self.refused = 0

    def admit(self) -> _Conn | None:
        """A slot for a new connection, made by closing the longest-idle one if need be; None
        when every connection is busy."""
        if len(self.open) >= self.limit:
            idle = [c for c in self.open if not c.busy]
            if not idle:
                self.refused += 1
                return None
            oldest = min(idle, key=lambda c: c.idle_since)
            oldest.scope.cancel()
            self.open.discard(oldest)
            self.evicted += 1
            if _worth_logging(self.evicted):
                log.info(
                    "%s: %d connections (the limit): closed the longest-idle one for a new "
                    "client (%d times so far)",
                    self.what,
                    self.limit,
                    self.evicted,
                )
        conn = _Conn()
        self.open.add(conn)
        return conn

    def release(self, conn: _Conn) -> None:
        self.open.discard(conn)

    def refusal(self) -> str:
        return (
            f"{self.what}: all {self.limit} connections are busy with requests: retry later, "
            "or raise max_connections in the configuration"
        )


def _worth_logging(count: int) -> bool:
    """The 1st, 10th, 100th... time, then every 1000th: a flood of connections is seen in the
    log without flooding it."""
    return count in (1, 10, 100) or count % 1000 == 0


class _Guarded:
    """The ASGI app of one connection: marks the connection busy while a request runs, puts
    the connection's extras in the scope, and enforces the body deadline."""

    def __init__(
        self,
        app: ASGIFramework,
        conn: _Conn,
        read_timeout: float,
        extensions: Mapping[str, object],
    ) -> None:
        self.app = app
        self.conn = conn
        self.read_timeout = read_timeout
        self.extensions = dict(extensions)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        raw: dict[str, Any] = dict(scope)
        raw["extensions"] = {**(raw.get("extensions") or {}), **self.extensions}
        scope = cast(Scope, raw)
        self.conn.begin()
        try:
            if scope["type"] == "http":
                await self._http(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            self.conn.end()

    async def _http(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        deadline = trio.current_time() + self.read_timeout
        body_done = not _has_body(scope)
        started = False
        timeout = self.read_timeout

        async def timed_receive() -> ASGIReceiveEvent:
            nonlocal body_done, deadline
            if body_done:
                return await receive()
            with trio.move_on_at(deadline):
                msg = await receive()
                if msg["type"] != "http.request" or not msg.get("more_body"):
                    body_done = True
                else:
                    chunk: Any = msg.get("body", b"")
                    deadline += len(chunk) / MIN_BODY_RATE
                return msg
            raise RequestTimeout(
                f"the request body did not arrive within {timeout:g} s of its head: send the "
                "whole body promptly (read_timeout in the configuration)"
            )

        async def tracked_send(msg: ASGISendEvent) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                if not body_done:
                    # Answered before the body was read (a refusal): hypercorn will close the
                    # connection after this reply, so say so, or the client reuses it and gets a
                    # reset on its next request.
                    headers = [*msg.get("headers", ()), (b"connection", b"close")]
                    msg = {**msg, "headers": headers}
            await send(msg)

        try:
            await self.app(scope, timed_receive, tracked_send)
        except RequestTimeout as exc:  # the app let it through: answer for it
            log.info("%s", exc)
            if not started:
                doc = {"error": {"code": "timeout", "message": str(exc)}}
                await _send_json(send, 408, doc)


def _has_body(scope: Scope) -> bool:
    headers: Any = scope.get("headers", ())
    for name, value in headers:
        key = bytes(name).lower()
        if key == b"transfer-encoding" or (
            key == b"content-length" and bytes(value).strip() != b"0"
        ):
            return True
    return False


async def _send_json(send: ASGISendCallable, status: int, doc: object) -> None:
    body = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def http_config(config: Config, read_timeout: float) -> Config:
    """``config`` with the request-head deadline: hypercorn's keep-alive timer (which runs until
    a request head is complete) no longer than ``read_timeout``; its own per-read timeout off."""
    config.keep_alive_timeout = min(config.keep_alive_timeout, read_timeout)
    config.read_timeout = None
    return config


async def refuse(stream: trio.abc.Stream, status: int, reason: bytes, doc: object) -> None:
    """Read the request head (briefly), answer ``status`` with a JSON body, and close."""
    body = json.dumps(doc).encode()
    reply = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n" % (status, reason, len(body))
    ) + body
    with trio.move_on_after(REFUSAL_READ_SECONDS):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = await stream.receive_some(65536)
                if not data:
                    break
                head += data
            await stream.send_all(reply)
    await trio.aclose_forcefully(stream)


class HTTPConnections:
    """Hands accepted streams to hypercorn, under the connection cap and the request deadline."""

    def __init__(
        self,
        app: ASGIFramework,
        config: Config,
        *,
        max_connections: int,
        read_timeout: float,
        what: str,
    ) -> None:
        self.app = app
        self.config = http_config(config, read_timeout)
        self.read_timeout = read_timeout
        self.connections = Connections(max_connections, what)
        self.context = WorkerContext(None)
        self.state: dict[str, Any] = {}

    async def serve(
        self, stream: trio.SocketStream, extensions: Mapping[str, object] | None = None
    ) -> None:
        """Serve one connection until it ends, is evicted or the server stops."""
        conn = self.connections.admit()
        if conn is None:
            await self.refuse_busy(stream)
            return
        try:
            with conn.scope:
                await self.hand_over(conn, stream, extensions)
        finally:
            self.connections.release(conn)
            # Closed here too: an evicted connection's own close was cut by the cancellation.
            await trio.aclose_forcefully(stream)

    async def refuse_busy(self, stream: trio.abc.Stream) -> None:
        """Answer a connection no slot was found for with a 503 naming the limit, and close it."""
        message = self.connections.refusal()
        if _worth_logging(self.connections.refused):
            log.warning("%s (%d refused so far)", message, self.connections.refused)
        doc = {"error": {"code": "busy", "message": message}}
        await refuse(stream, 503, b"Service Unavailable", doc)

    async def hand_over(
        self,
        conn: _Conn,
        stream: trio.abc.Stream,
        extensions: Mapping[str, object] | None = None,
    ) -> None:
        """Serve ``stream``, admitted as ``conn``, with hypercorn until it ends (the caller
        releases and closes it). The gateway's own HTTP/1.1 server hands its WebSocket upgrades
        here, the bytes it has already read replayed by ``stream``."""
        guarded = _Guarded(self.app, conn, self.read_timeout, extensions or {})
        wrapped = wrap_app(guarded, self.config.wsgi_max_body_size, "asgi")
        # TCPServer tells plain streams from TLS ones itself (its hint names only TLS).
        server = TCPServer(wrapped, self.config, self.context, self.state, stream)  # type: ignore[arg-type]
        await server


async def open_http_listeners(listen: HostPort) -> tuple[list[trio.SocketListener], str]:
    """The TCP listeners of an HTTP service on ``listen`` (port 0: the kernel picks one) and
    the base URL it is reachable at, as the gateway and the mirror log and report it."""
    listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    host, port = listeners[0].socket.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return listeners, url


__all__ = [
    "MIN_BODY_RATE",
    "Connections",
    "HTTPConnections",
    "RequestTimeout",
    "http_config",
    "open_http_listeners",
    "refuse",
]
