"""The blocking client of the control API, ``tensord.Client``: HTTP/1.1 over the daemon's Unix
socket with the standard library's ``http.client``.

Why not httpx, as :class:`~tensord.control.client.AsyncClient` uses: a CLI command's start-up
is mostly imports, and httpx with httpcore costs a few tenths of a second of CPU to import
(httpcore imports trio and anyio whenever they are installed, to pick its locks, and h2),
``http.client`` a few hundredths. Every CLI command runs on this client (``tensord download``
is timed against aria2c, which starts in 0.06 s; ``tensord send`` against the transfer it asks
for). The endpoints are the async client's (:mod:`.endpoints`); only sending differs.

One connection per call (connecting to a Unix socket costs microseconds, and nothing stale is
ever reused); an events stream holds its own until it is closed. A call interrupted (Ctrl-C, an
error) shuts its connection down at once: the daemon cancels what a client that went away asked
for (a send, a pull), and it must see that before the process exits.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket as _socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

from ..errors import ControlError
from .base import (
    CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    UPLOAD_CHUNK,
    USER_AGENT,
    connect_error,
    connect_timeout,
    deprecated_download,
    download_info,
    error_from_reply,
    open_temp,
    resolve_socket,
    unlink,
)
from .endpoints import EVENTS, Call, SyncEndpoints, absolute, tensor_data
from .sse import EventQueue

Json = dict[str, Any]
T = TypeVar("T")

#: Bytes asked of the socket at a time when streaming a reply (a tensor, the events).
READ_SIZE = 1 << 20


class _UnixConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket: ``CONNECT_TIMEOUT`` to connect, then ``timeout``
    (``None``: no limit) for each read and write."""

    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("tensord", timeout=timeout)
        self._path = path
        #: The socket, kept after ``http.client`` hands it to a reply that ends the connection
        #: (``self.sock`` is then ``None``): what :meth:`abort` shuts down.
        self.unix_socket: _socket.socket | None = None

    def connect(self) -> None:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            limit = self.timeout
            sock.settimeout(CONNECT_TIMEOUT if limit is None else min(CONNECT_TIMEOUT, limit))
            sock.connect(str(self._path))
            sock.settimeout(limit)
        except BaseException:
            sock.close()
            raise
        self.sock = self.unix_socket = sock

    def abort(self) -> None:
        """Shut the connection down, from any thread: the daemon sees the client go at once
        (``close`` alone leaves the socket open while a reply's file still refers to it), and a
        read blocked on it in another thread returns (the end of the stream)."""
        if self.unix_socket is not None:
            with contextlib.suppress(OSError):
                self.unix_socket.shutdown(_socket.SHUT_RDWR)


class _Reply:
    """A successful reply whose body has been read: what an endpoint parses."""

    def __init__(self, status: int, content: bytes) -> None:
        self.status_code = status
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)


def _ok(status: int) -> bool:
    return 200 <= status < 300


class Client(SyncEndpoints):
    """Blocking client of a local ``tensord serve``: ``with Client() as c: c.status()``."""

    def __init__(
        self, socket: str | os.PathLike[str] | None = None, *, timeout: float | None = None
    ) -> None:
        self.socket = resolve_socket(socket)
        #: Ordinary calls: ``CONNECT_TIMEOUT`` to connect, ``timeout`` for each read after.
        #: Calls that last as long as a transfer (send, pull, put, events): no read limit.
        self._timeout = DEFAULT_TIMEOUT if timeout is None else timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: each call closes its own connection (kept for ``with``)."""

    # -- sending one request -----------------------------------------------------------------

    def _open(
        self, call: Call[Any], upload: IO[bytes] | None = None
    ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        """Connect, send ``call`` (its JSON body, or ``upload``'s bytes, chunked) and read the
        reply's head. The caller reads the body and closes the connection."""
        conn = _UnixConnection(self.socket, None if call.long else self._timeout)
        try:
            conn.connect()
        except TimeoutError:
            conn.close()
            raise connect_timeout(self.socket) from None
        except OSError as exc:
            conn.close()
            raise connect_error(self.socket, exc) from None
        headers = {"user-agent": USER_AGENT, "accept": "*/*"}
        body: bytes | Iterator[bytes] | None = call.body()
        if body is not None:
            headers["content-type"] = "application/json"
        elif upload is not None:
            headers["content-type"] = "application/octet-stream"
            body = iter(lambda: upload.read(UPLOAD_CHUNK), b"")
        chunked = upload is not None
        try:
            # The daemon may answer (an error: too large, a full store) and hang up before it
            # has read the whole body: its answer is the one to report, as httpcore does.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request(call.method, call.url, body, headers, encode_chunked=chunked)
            return conn, conn.getresponse()
        except BaseException as exc:
            conn.abort()
            conn.close()
            if isinstance(exc, OSError | http.client.HTTPException):
                raise _lost(exc) from None
            raise

    def _execute(self, describe: Callable[[], Call[T]]) -> T:
        call = describe()
        upload = open(call.upload, "rb") if call.upload is not None else None  # noqa: SIM115
        try:
            conn, response = self._open(call, upload)
            try:
                content = _read(response)
            finally:
                _close(conn, response)
        finally:
            if upload is not None:
                upload.close()
        if not _ok(response.status):
            raise error_from_reply(response.status, content)
        return call.parse(_Reply(response.status, content))

    # -- what is more than one request and its reply -----------------------------------------

    def get(self, name: str, path: str | os.PathLike[str]) -> Json:
        """Write tensor ``name`` to ``path`` as a ``.npy`` file, atomically: whoever opens
        ``path`` sees the old file or the whole new one."""
        target = Path(absolute(path))
        conn, response = self._open(tensor_data(name))
        try:
            if not _ok(response.status):
                raise error_from_reply(response.status, _read(response))
            fd, tmp = open_temp(target)
            try:
                with open(fd, "wb") as f:
                    while chunk := _read(response, READ_SIZE):
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                    size = f.tell()
                os.replace(tmp, target)
            except BaseException:
                unlink(tmp)
                raise
        finally:
            _close(conn, response)
        return download_info(name, target, response.getheader("x-tensord-dtype", ""), size)

    def download(self, name: str, path: str | os.PathLike[str]) -> Json:
        """Deprecated: :meth:`get`."""
        deprecated_download()
        return self.get(name, path)

    def events(self) -> EventStream:
        """The events stream: ``with client.events() as events: for e in events: ...``."""
        return EventStream(self)

    subscribe = events


def _close(conn: _UnixConnection, response: http.client.HTTPResponse) -> None:
    """Close both: a reply that ends its connection (``Connection: close``, an events stream)
    holds the socket itself, and ``conn.close()`` alone leaves it open."""
    response.close()
    conn.close()


def _lost(exc: BaseException) -> ControlError:
    if isinstance(exc, TimeoutError):
        return ControlError(f"the daemon did not answer in time: {exc}", code="timeout")
    return ControlError(f"lost the connection to the daemon: {exc or type(exc).__name__}")


def _read(
    response: http.client.HTTPResponse, size: int | None = None, *, some: bool = False
) -> bytes:
    """The reply's body (``size`` bytes of it; with ``some``, what has come, up to ``size``),
    a broken connection or a timeout raised as a :class:`ControlError`."""
    try:
        if some:
            return response.read1(READ_SIZE if size is None else size)
        return response.read(size)
    except (OSError, http.client.HTTPException) as exc:
        raise _lost(exc) from None


class EventStream(Iterator[Json]):
    """The daemon's events as dicts. ``with`` (or the first ``next``) returns once the
    subscription is live; iteration ends when the daemon closes the stream."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._queue = EventQueue()
        self._conn: _UnixConnection | None = None
        self._response: http.client.HTTPResponse | None = None
        self._closed = False

    @property
    def subscribed(self) -> bool:
        return self._queue.subscribed

    def open(self) -> Self:
        if self._response is not None or self._closed:
            return self
        self._conn, self._response = self._client._open(EVENTS)
        try:
            if not _ok(self._response.status):
                raise error_from_reply(self._response.status, _read(self._response))
            while not self._queue.subscribed:
                if not self._pull():
                    raise ControlError("the daemon closed the events stream before subscribing")
        except BaseException:
            self.close()
            raise
        return self

    def _pull(self) -> bool:
        """Feed the parser what has come; ``False`` at the end of the stream."""
        assert self._response is not None
        chunk = _read(self._response, some=True)
        if not chunk:
            return False
        self._queue.feed(chunk)
        return True

    def __next__(self) -> Json:
        self.open()
        while not self._queue.events:
            if self._closed:
                raise StopIteration
            try:
                more = self._pull()
            except ControlError:
                stopped = self._closed  # the connection cut by stop(): the end, not an error
                self.close()
                if stopped:
                    raise StopIteration from None
                raise
            except BaseException:
                self.close()
                raise
            if not more:
                self.close()
                raise StopIteration
        return self._queue.events.popleft()

    def stop(self) -> None:
        """End the stream from another thread: a ``next`` blocked in this one's place returns
        what had already come, then iteration stops. ``close`` (``with``) still releases it."""
        self._closed = True
        if self._conn is not None:
            self._conn.abort()

    def close(self) -> None:
        self._closed = True
        if self._conn is not None and self._response is not None:
            _close(self._conn, self._response)

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["Client", "EventStream"]
