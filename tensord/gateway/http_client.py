"""The gateway's HTTP/1.1 client for generation requests: kept-alive connections per backend,
one write per request, and body bytes handed on per socket read.

Why its own: a relayed token should cost one socket read upstream and one write downstream.
httpx/httpcore spent a connection-pool scan (linear in the open connections) per request and an
h11 event plus several awaits per token; here a read of up to :data:`READ_SIZE` bytes - one token
or a burst of them - becomes one ``bytes`` of body (:mod:`.h1`, sans-I/O). Listings and health
checks still use httpx: they are rare and not on the token path.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio

from .h1 import ProtocolError, ResponseHead, ResponseReader, request_bytes

#: One socket read: a burst of tokens goes on in one piece.
READ_SIZE = 64 << 10
#: A read at least this large says the backend writes faster than we read (a burst): the next
#: read is tried at once rather than after a readiness wait.
EAGER_READ = 1024


class UpstreamError(Exception):
    """A backend could not be reached, or broke the HTTP exchange."""


class UpstreamResponse:
    """The reply to one request: :attr:`head`, then the body as it arrives (:meth:`chunks`)."""

    def __init__(self, stream: trio.abc.Stream, reader: ResponseReader, first: bytes) -> None:
        self._stream = stream
        self._reader = reader
        self._first = first  # body bytes that came with the head
        head = reader.head
        assert head is not None
        self.head: ResponseHead = head
        self.status = head.status
        #: The plain socket's file descriptor (None for TLS): what a :class:`~.relay.Relay`
        #: reads the rest of a streamed body from, with :meth:`read_nowait`.
        self.fd: int | None = None
        if isinstance(stream, trio.SocketStream):
            self.fd = stream.socket.fileno()

    @property
    def done(self) -> bool:
        """The whole body was read."""
        return self._reader.done

    def read_nowait(self) -> bytes | None:
        """One ``read(2)`` of the socket (:attr:`fd`), for a caller told it is readable: the
        body bytes it completes (possibly none), or None at the end of the body. Raises
        :class:`UpstreamError` as :meth:`chunks` does."""
        if self._first:
            first, self._first = self._first, b""
            return first
        assert self.fd is not None
        reader = self._reader
        if reader.done:
            return None
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise UpstreamError(_describe(exc)) from exc
        return _body(reader, data)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body's bytes, each piece as soon as a socket read brings it."""
        if self._first:
            first, self._first = self._first, b""
            yield first
        reader, receive = self._reader, self._stream.receive_some
        if isinstance(self._stream, trio.SocketStream):
            async for piece in self._socket_chunks(self._stream.socket.fileno()):
                yield piece
            return
        while not reader.done:
            try:
                data = await receive(READ_SIZE)
            except (OSError, trio.BrokenResourceError) as exc:
                raise UpstreamError(_describe(exc)) from exc
            body = _body(reader, data)
            if body is None:
                return
            if body:
                yield body

    async def _socket_chunks(self, fd: int) -> AsyncGenerator[bytes, None]:
        """:meth:`chunks` on a plain socket, at the cost of one readiness wait and one
        ``read(2)`` per token: the socket is waited on first (between two tokens it has nothing
        to read, so trio's try-then-wait would spend a failed ``recv`` on each), read once it is
        readable. The wait is the loop's checkpoint."""
        reader = self._reader
        wait_readable, read = trio.lowlevel.wait_readable, os.read
        eager = True
        while not reader.done:
            try:
                if eager:
                    try:
                        data = read(fd, READ_SIZE)
                    except BlockingIOError:
                        eager = False
                        continue
                    await trio.lowlevel.checkpoint()
                else:
                    await wait_readable(fd)
                    data = read(fd, READ_SIZE)
            except BlockingIOError:
                continue
            except (OSError, trio.ClosedResourceError) as exc:
                raise UpstreamError(_describe(exc)) from exc
            eager = len(data) >= EAGER_READ
            body = _body(reader, data)
            if body is None:
                return
            if body:
                yield body

    async def read(self, limit: int) -> bytes:
        """The body, or its first ``limit`` bytes (the rest is not read)."""
        out = bytearray()
        async for piece in self.chunks():
            out += piece
            if len(out) >= limit:
                break
        return bytes(out[:limit])


class UpstreamPool:
    """Kept-alive connections to the backends, the most recently used first. At most
    ``max_idle`` are kept: no more are open than requests ran at once (the backends' slots)."""

    def __init__(self, *, connect_timeout: float = 5.0, max_idle: int = 1024) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, str, int], list[trio.abc.Stream]] = {}
        self._idle_count = 0
        self._tls: ssl.SSLContext | None = None

    @asynccontextmanager
    async def post(
        self, url: str, body: bytes, content_type: str = "application/json"
    ) -> AsyncIterator[UpstreamResponse]:
        """POST ``body`` to ``url``; the response once its head is read. The connection goes
        back to the pool only when the whole body was read; leaving early closes it (the
        backend sees the client go away)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = (parts.scheme, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = request_bytes("POST", parts.netloc, target, body, content_type)
        stream, reader, first = await self._exchange(key, request)
        reusable = False
        try:
            response = UpstreamResponse(stream, reader, first)
            yield response
            reusable = reader.done and response.head.keep_alive
        finally:
            if reusable and self._idle_count < self.max_idle:
                self._idle.setdefault(key, []).append(stream)
                self._idle_count += 1
            else:
                await trio.aclose_forcefully(stream)

    async def _exchange(
        self, key: tuple[str, str, int], request: bytes
    ) -> tuple[trio.abc.Stream, ResponseReader, bytes]:
        """Send ``request`` and read the reply's head: on an idle connection if one is still
        open (retried once on a fresh one if the backend had closed it meanwhile), else on a
        new one."""
        while (stream := self._take_idle(key)) is not None:
            try:
                return await self._start(stream, request)
            except _Stale:
                await trio.aclose_forcefully(stream)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        stream = await self._connect(key)
        try:
            return await self._start(stream, request)
        except _Stale as exc:
            await trio.aclose_forcefully(stream)
            raise UpstreamError(str(exc)) from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    def _take_idle(self, key: tuple[str, str, int]) -> trio.abc.Stream | None:
        idle = self._idle.get(key)
        while idle:
            stream = idle.pop()
            self._idle_count -= 1
            sock = _socket_of(stream)
            if sock is None or not sock.is_readable():  # readable while idle: closed (or junk)
                return stream
            stream_close(stream)
        return None

    async def _connect(self, key: tuple[str, str, int]) -> trio.abc.Stream:
        scheme, host, port = key
        try:
            with trio.fail_after(self.connect_timeout):
                sock_stream = await trio.open_tcp_stream(host, port)
                if scheme == "http":
                    return sock_stream
                tls = trio.SSLStream(sock_stream, self._tls_context(), server_hostname=host)
                await tls.do_handshake()
                return tls
        except trio.TooSlowError:
            raise UpstreamError(
                f"could not connect to {host}:{port} within {self.connect_timeout:g} s"
            ) from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamError(f"could not connect to {host}:{port}: {_describe(exc)}") from exc

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            try:
                import certifi  # as httpx verifies: its CA bundle

                self._tls = ssl.create_default_context(cafile=certifi.where())
            except ImportError:  # pragma: no cover - httpx depends on certifi
                self._tls = ssl.create_default_context()
        return self._tls

    async def _start(
        self, stream: trio.abc.Stream, request: bytes
    ) -> tuple[trio.abc.Stream, ResponseReader, bytes]:
        reader = ResponseReader()
        received = False
        try:
            await stream.send_all(request)
            first = b""
            while reader.head is None:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    if not received:
                        raise _Stale("the backend closed the connection without replying")
                    _eof(reader)
                received = True
                first += _feed(reader, data)
        except (OSError, trio.BrokenResourceError) as exc:
            if not received:
                raise _Stale(f"the backend closed the connection: {_describe(exc)}") from exc
            raise UpstreamError(_describe(exc)) from exc
        return stream, reader, first

    def close(self) -> None:
        """Close the idle connections (the gateway stops; requests in flight close their own)."""
        for streams in self._idle.values():
            for stream in streams:
                stream_close(stream)
        self._idle.clear()
        self._idle_count = 0


class _Stale(Exception):
    """The connection broke before any byte of the reply: a kept-alive connection the backend
    had closed meanwhile (the request is sent again on a fresh one)."""


def _feed(reader: ResponseReader, data: bytes | bytearray) -> bytes:
    try:
        return reader.feed(bytes(data))
    except ProtocolError as exc:
        raise UpstreamError(f"the backend's reply is not valid HTTP: {exc}") from exc


def _body(reader: ResponseReader, data: bytes | bytearray) -> bytes | None:
    """What one socket read ``data`` adds to the body (possibly nothing); None when the read
    was the connection's end (an end the reply allowed: else :class:`UpstreamError`)."""
    if not data:
        _eof(reader)
        return None
    return _feed(reader, data)


def _eof(reader: ResponseReader) -> None:
    try:
        reader.eof()
    except ProtocolError as exc:
        raise UpstreamError(str(exc)) from exc


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    return inner.socket if isinstance(inner, trio.SocketStream) else None


def stream_close(stream: trio.abc.Stream) -> None:
    """Close a stream now, without awaiting (a dead idle connection)."""
    sock = _socket_of(stream)
    if sock is not None:
        sock.close()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


__all__ = ["READ_SIZE", "UpstreamError", "UpstreamPool", "UpstreamResponse"]
