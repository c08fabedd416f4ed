"""The gateway's own HTTP/1.1 server: each accepted connection read and written here, the
requests handed to the gateway's ASGI app.

Why not hypercorn for the token path: a relayed token was an ASGI message through hypercorn's
``HTTPStream``, an h11 event and state-machine pass, a shielded cancel scope and a lock around
the write, and hypercorn's reader ran a ``fail_after`` per socket read - some 60 us of CPU per
token, more than the relaying itself. Here a reply's body message is framed as one chunk with
one bytes join and written with one ``send_all``: as many lines as one upstream read brought
go out in one write. The request head is parsed sans-I/O (:func:`~.h1.parse_request_head`).

What it keeps from :mod:`tensord.control.serving`, which the control socket still uses:

- the cap on connections (``gateway.max_connections``, the same :class:`Connections`): a
  newcomer displaces the longest-idle connection, and gets a 503 naming the limit when every
  one is busy; a connection is idle between requests and while its head arrives;
- the request deadline (``gateway.read_timeout``): the head must arrive within
  ``min(KEEP_ALIVE_SECONDS, read_timeout)`` of the connection's start or of the previous reply
  (a silent connection is closed, a half-sent head is answered 408), the body within
  ``read_timeout`` of the head plus a second per MiB received (``MIN_BODY_RATE``): a stalled or
  trickled body is answered 408 and closed. A reply being relayed is never cut by either.
- a client that goes away is an ``http.disconnect`` from ``receive`` as soon as its socket says
  so (the app watches for it for the whole request and cancels the upstream request).

Bounds and refusals: a head over :data:`~.h1.MAX_REQUEST_HEAD`, a body over the app's limit
(413, before any of it is read), a chunked request body (411), anything that is not HTTP/1.x
(400), and a request sent before the reply to the previous one was complete (pipelining: 400)
are answered with a JSON error and the connection is closed. Keep-alive as HTTP/1.1 has it;
HTTP/1.0 clients get a close-delimited stream.

``Upgrade: websocket`` (``/v1/ws``) is handed to hypercorn on the same connection, the bytes
already read replayed to it (:meth:`HTTPConnections.hand_over`): the WebSocket keeps its
handshake, pings and framing from there, and the connection its slot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from email.utils import formatdate
from typing import Any, cast

import trio
from hypercorn.typing import ASGIFramework, ASGIReceiveEvent, ASGISendEvent, Scope

from ..boundary import report_unexpected
from ..control.serving import MIN_BODY_RATE, HTTPConnections, RequestTimeout, _Conn
from .h1 import BadRequest, RequestHead, chunk, parse_request_head, response_head

log = logging.getLogger("tensord.gateway.http")

#: How long an idle kept-alive connection waits for its next request (hypercorn's default).
KEEP_ALIVE_SECONDS = 5.0
#: One socket read of a request.
READ_SIZE = 64 << 10
#: How long a refused client is given to stop sending before its connection is closed (so it
#: reads our answer instead of a reset), and how much of what it sends meanwhile is read.
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 << 20

_DISCONNECT: ASGIReceiveEvent = {"type": "http.disconnect"}
#: The scope extension that carries a request's :class:`~.relay.BodyWriter`.
BODY_WRITER = "tensord.body_writer"


ErrorDocument = Callable[[str | None, int, str, str], object]


def _error_document(path: str | None, status: int, code: str, message: str) -> object:
    return {"error": {"code": code, "message": message}}


class GatewayHTTP:
    """Serves accepted connections (:meth:`serve`, for ``trio.serve_listeners``) with ``app``.

    ``upgrades`` is the hypercorn server WebSocket upgrades are handed to; its
    :class:`Connections` are the cap this server admits connections under too."""

    def __init__(
        self,
        app: ASGIFramework,
        upgrades: HTTPConnections,
        *,
        read_timeout: float,
        max_body: int,
        error_document: ErrorDocument | None = None,
    ) -> None:
        self.app = app
        #: The JSON body of a refusal the server answers itself (the app's error shape for the
        #: request's path, when known).
        self.error_document = error_document or _error_document
        self.upgrades = upgrades
        self.connections = upgrades.connections
        self.read_timeout = read_timeout
        self.head_timeout = min(KEEP_ALIVE_SECONDS, read_timeout)
        self.max_body = max_body

    async def serve(self, stream: trio.SocketStream) -> None:
        """Serve one connection until it ends, is evicted or the server stops."""
        conn = self.connections.admit()
        if conn is None:
            await self.upgrades.refuse_busy(stream)
            return
        try:
            with conn.scope:
                await _Connection(self, conn, stream).run()
        except Exception as exc:  # a bug: this connection ends, the gateway serves on
            report_unexpected(log, "gateway", "a gateway connection", exc)
        finally:
            self.connections.release(conn)
            await trio.aclose_forcefully(stream)


class _Connection:
    """One client connection: its requests, one after another."""

    def __init__(self, server: GatewayHTTP, conn: _Conn, stream: trio.SocketStream) -> None:
        self.server = server
        self.conn = conn
        self.stream = stream
        self.buf = b""  # bytes read and not yet used: the start of the next head, a body
        self.raw_head = b""
        sock = stream.socket
        self.addrs: dict[str, Any] = {"client": _addr(sock, True), "server": _addr(sock, False)}

    async def receive(self) -> bytes:
        """One socket read; ``b""`` when the client closed or broke the connection."""
        try:
            return await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return b""

    async def run(self) -> None:
        while True:
            head = await self._read_head()
            if head is None:
                return
            if head.upgrade:
                replay = _Replayed(self.stream, self.raw_head + self.buf)
                await self.server.upgrades.hand_over(self.conn, replay)
                return
            self.conn.begin()
            try:
                keep_alive = await _Exchange(self, head).run()
            finally:
                self.conn.end()
            if not keep_alive:
                return

    async def _read_head(self) -> RequestHead | None:
        """The next request's head; None when the connection is to be closed (it ended, it
        stayed silent too long, or its head was refused)."""
        with trio.move_on_after(self.server.head_timeout):
            while True:
                try:
                    parsed = parse_request_head(self.buf, self.server.max_body)
                except BadRequest as exc:
                    await self.refuse(exc.status, "bad_request", f"bad request: {exc}", exc.path)
                    return None
                if parsed is not None:
                    head, size = parsed
                    self.raw_head, self.buf = self.buf[:size], self.buf[size:]
                    return head
                data = await self.receive()
                if not data:
                    return None
                self.buf += data
        if self.buf.strip():
            timeout = self.server.head_timeout
            await self.refuse(408, "timeout", f"the request head did not arrive within "
                              f"{timeout:g} s: send the whole head promptly")  # fmt: skip
        return None

    async def refuse(self, status: int, code: str, message: str, path: str | None = None) -> None:
        """Answer a request the server itself refuses, then stop reading it (its connection is
        closed): what the client still sends is read and dropped for a moment, so that it reads
        the answer rather than a reset."""
        log.info("gateway: %s", message)
        body = json.dumps(self.server.error_document(path, status, code, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", b"%d" % len(body)), (b"date", _date())]  # fmt: skip
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.stream.send_all(response_head(status, headers) + body)
            await self.stream.send_eof()
            with trio.move_on_after(LINGER_SECONDS):
                read = 0
                while read < LINGER_BYTES and (data := await self.receive()):
                    read += len(data)


class _Exchange:
    """One request and its reply: the ASGI ``receive`` and ``send`` the app is given."""

    def __init__(self, connection: _Connection, head: RequestHead) -> None:
        self.connection = connection
        self.stream = connection.stream
        self.fd = connection.stream.socket.fileno()
        self.head = head
        self.body_left = head.content_length
        self.body_given = False  # the app has had the (possibly empty) body's last message
        self.deadline = trio.current_time() + connection.server.read_timeout
        self.started = False
        self.complete = False  # the reply's last byte was written
        self.broken = False  # a write failed or was cut: the connection cannot be reused
        #: The client sent more before the reply was complete (answered 400 after it).
        self.pipelined = len(connection.buf) > head.content_length
        self.keep_alive = head.keep_alive
        self.chunked = False
        self.bodiless = head.method == "HEAD"
        self.gone = False

    @property
    def scope(self) -> Scope:
        head = self.head
        raw: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1" if head.http11 else "1.0",
            "method": head.method,
            "scheme": "http",
            "path": head.path,
            "raw_path": head.target.partition(b"?")[0],
            "query_string": head.query,
            "root_path": "",
            "headers": head.headers,
            # A streamed reply's pieces may be written without an ASGI message (.relay).
            "extensions": {BODY_WRITER: self},
            **self.connection.addrs,
        }
        return cast(Scope, raw)

    async def run(self) -> bool:
        """Serve the request; whether the connection may carry another one."""
        try:
            await self.connection.server.app(self.scope, self.receive, self.send)
        except RequestTimeout as exc:  # the app let it through: answer for it
            log.info("gateway: %s", exc)
            await self._error(408, "timeout", str(exc))
        except Exception as exc:
            report_unexpected(log, "gateway", f"gateway request {self.head.method} "
                              f"{self.head.path[:200]}", exc)  # fmt: skip
            await self._error(500, "internal", "internal error: see the gateway's log")
        if self.pipelined and not self.broken:
            await self.connection.refuse(400, "bad_request", "bad request: a request was sent "
                                         "before the reply to the previous one (pipelining is "
                                         "not supported)")  # fmt: skip
            return False
        return self.keep_alive and self.complete and not self.broken and self.body_done

    @property
    def body_done(self) -> bool:
        return self.body_left == 0

    async def _error(self, status: int, code: str, message: str) -> None:
        if not self.started:
            body = json.dumps({"error": {"code": code, "message": message}}).encode()
            await self.send({"type": "http.response.start", "status": status,
                             "headers": [(b"content-type", b"application/json"),
                                         (b"content-length", b"%d" % len(body))]})  # fmt: skip
            await self.send({"type": "http.response.body", "body": body, "more_body": False})
        else:
            self.broken = True  # a reply cut in the middle: the client sees the connection end

    # -- receive -------------------------------------------------------------------------------

    async def receive(self) -> ASGIReceiveEvent:
        if not self.body_given:
            return await self._body()
        if self.gone:
            return _DISCONNECT
        # The whole request was read: what comes now is the client going away (or a request it
        # should not have sent yet, kept for after this one).
        connection = self.connection
        while True:
            data = await connection.receive()
            if not data:
                self.gone = True
                return _DISCONNECT
            if not self.complete:
                self.pipelined = True
            connection.buf += data
            if len(connection.buf) > READ_SIZE:
                await trio.sleep_forever()  # read no more of it: it is answered after the reply

    async def _body(self) -> ASGIReceiveEvent:
        connection = self.connection
        if not self.body_left:
            self.body_given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if self.head.expect_continue:
            self.head = replace(self.head, expect_continue=False)
            await self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not connection.buf:
            with trio.move_on_at(self.deadline):
                data = await connection.receive()
                if not data:
                    self.gone = self.body_given = True
                    return _DISCONNECT
                connection.buf = data
            if not connection.buf:
                timeout = connection.server.read_timeout
                raise RequestTimeout(
                    f"the request body did not arrive within {timeout:g} s of its head: send "
                    "the whole body promptly (read_timeout in the configuration)"
                )
        piece = connection.buf[: self.body_left]
        connection.buf = connection.buf[len(piece) :]
        self.body_left -= len(piece)
        self.deadline += len(piece) / MIN_BODY_RATE
        more = self.body_left > 0
        self.body_given = not more
        return {"type": "http.request", "body": piece, "more_body": more}

    # -- send ----------------------------------------------------------------------------------

    async def send(self, msg: ASGISendEvent) -> None:
        kind = msg["type"]
        if kind == "http.response.body":
            if not self.started:
                raise RuntimeError("a reply's body was sent before its start")
            if self.complete:
                return
            message: Any = msg
            body: bytes = message.get("body", b"")
            more = bool(message.get("more_body", False))
            if self.bodiless:
                body = b""
            if self.chunked:
                data = chunk(body, last=not more) if not self.bodiless else b""
            else:
                data = body
            if not more:
                self.complete = True
            if data:
                await self._write(data)
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("a reply was started twice")
            self.started = True
            start: Any = msg
            await self._write(self._head(int(start["status"]), list(start.get("headers", ()))))
        else:
            raise RuntimeError(f"not an HTTP reply message: {kind!r}")

    def _head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        names = set()
        for name, value in headers:
            name = bytes(name).lower()
            names.add(name)
            if name == b"connection" and b"close" in bytes(value).lower():
                self.keep_alive = False
        if not self.body_done:
            # Answered before the body was read (a refusal): the connection is closed after
            # this reply, so say so, or the client reuses it and gets a reset on its next request.
            self.keep_alive = False
        if status in (204, 304) or 100 <= status < 200:
            self.bodiless = True
        elif b"content-length" not in names:
            if self.head.http11:
                self.chunked = True
                headers.append((b"transfer-encoding", b"chunked"))
            else:
                self.keep_alive = False  # close-delimited
        if not self.keep_alive and b"connection" not in names:
            headers.append((b"connection", b"close"))
        elif self.keep_alive and not self.head.http11:
            headers.append((b"connection", b"keep-alive"))
        headers.append((b"date", _date()))
        return response_head(status, headers)

    def write_nowait(self, body: bytes) -> bytes:
        """:class:`~.relay.BodyWriter`: ``body`` as the reply's next piece (the reply started
        and not ended), written as far as the socket takes it now; the rest, framed. Only
        writes (it may run in the relay's thread): a failed write raises OSError."""
        if self.broken or self.complete or self.bodiless or not body:
            return b""
        data = chunk(body) if self.chunked else body
        sent = self._write_some(data)
        return data[sent:] if sent < len(data) else b""

    async def write_rest(self, rest: bytes) -> None:
        await self._write(rest)

    def lost(self) -> None:
        """Gone, or cut mid-write: the connection cannot carry anything more. Closing its
        socket wakes a task waiting to read it (the app's disconnect watch) at once."""
        self.broken = True
        self.stream.socket.close()

    async def _write(self, data: bytes) -> None:
        """Write ``data`` to the client: one ``write(2)`` when the socket takes it all (a
        token's lines always fit in an idle socket's buffer), else the rest with ``send_all``.
        Not a checkpoint when one write took it all: a relay's checkpoint is its upstream read.
        """
        if self.broken:
            return
        written = False
        try:
            sent = self._write_some(data)
            if sent < len(data):
                await self.stream.send_all(memoryview(data)[sent:])
            written = True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            if not written:
                self.lost()

    def _write_some(self, data: bytes) -> int:
        """One ``write(2)`` of ``data`` to the client: how much the socket took (0 when it is
        full). A failed write raises OSError."""
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0


class _Replayed(trio.abc.HalfCloseableStream):
    """A socket stream whose first reads return ``first`` (bytes already read from it): how a
    WebSocket upgrade is handed to hypercorn after its head was read here."""

    def __init__(self, stream: trio.SocketStream, first: bytes) -> None:
        self._stream = stream
        self._first = first
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._first:
            size = max_bytes or len(self._first)
            out, self._first = self._first[:size], self._first[size:]
            await trio.lowlevel.checkpoint()
            return out
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _addr(sock: trio.socket.SocketType, peer: bool) -> tuple[str, int] | None:
    try:
        addr = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    return None


_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    """The ``Date`` header's value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]


__all__ = ["BODY_WRITER", "KEEP_ALIVE_SECONDS", "GatewayHTTP"]
