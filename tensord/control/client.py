"""Clients of the control API (docs/CONTROL.md): ``Client`` (blocking) and ``AsyncClient``.

Both speak HTTP/1.1 over the daemon's Unix socket with httpx, and turn its JSON errors back into
the typed errors the daemon raised (``TensorNotFound``, ``PeerUnreachable``, ...), so a program
using the client handles the same exceptions as one embedding a ``TensorNode``.

Each endpoint is written once (httpx's ``BaseClient`` idea), in :mod:`.endpoints`: a method
describes the request (method, path, body) and how its reply becomes a result, as a
:class:`Call`; the two clients only differ in how they send one (blocking or awaited). What is
I/O beyond one request and reply - writing a tensor to a file, reading the events stream - is
written for each of them; the stream's parser is sans-I/O and shared (:mod:`.sse`).

The client is a separate program from the daemon: it is the one place outside ``config`` that
reads the environment, and only to find the socket the way the daemon does.

Progress is followed on the events stream. Subscribe first, then post: ``events()`` returns only
once the daemon has said ``: subscribed``, so nothing that happens afterwards is missed::

    async with client.subscribe() as events:
        nursery.start_soon(client.send, "b", name="w")
        async for event in events: ...
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeVar

import anyio
import httpx

from .._version import __version__
from ..config import default_control_socket, load_settings
from ..errors import ConfigError, ControlError, DaemonNotRunning, TensorError, error_for_code
from .endpoints import (
    EVENTS,
    AsyncEndpoints,
    Call,
    Endpoints,
    SyncEndpoints,
    absolute,
    tensor_data,
    tensor_path,
)
from .sse import EventQueue, SSEComment, SSEMessage, SSEParser

if TYPE_CHECKING:
    pass

# numpy is imported when needed: a CLI command starts faster without it.

#: Where a system daemon (systemd's ``RuntimeDirectory=tensord``) has its socket.
SYSTEM_SOCKET = Path("/run/tensord/control.sock")
BASE_URL = "http://tensord"
CONNECT_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 60.0
UPLOAD_CHUNK = 1 << 20

Json = dict[str, Any]
T = TypeVar("T")
P = ParamSpec("P")


# --------------------------------------------------------------------------------------------
# Finding the socket


def resolve_socket(
    socket: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Path:
    """The control socket: ``socket`` if given, else where the daemon would put it under
    ``env`` (``TENSORD_CONTROL_SOCKET``, the cluster file's ``control.socket``, the defaults).

    One addition to the daemon's rules: when nothing configures the path and the per-user default
    does not exist but the system daemon's ``/run/tensord/control.sock`` does, that is the one -
    an operator in the service's group runs ``tensord status`` without setting anything.
    """
    if socket is not None:
        return Path(socket)
    env = os.environ if env is None else env
    try:
        # library=True: a CLI user's environment need not name a node of the cluster.
        configured = load_settings(env, library=True).control.socket
    except ConfigError:
        configured = None
    if configured is not None:
        return configured
    default = default_control_socket(env)
    if not default.exists() and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return default


# --------------------------------------------------------------------------------------------
# Errors


def error_from_reply(status: int, body: bytes) -> TensorError:
    """The typed error for a non-2xx reply ``{"error": {"code", "message"}}``."""
    try:
        doc = json.loads(body)
        err = doc["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip().splitlines()
        return ControlError(
            f"the daemon answered HTTP {status}: {text[0][:200] if text else 'no body'}",
            code="http",
            status=status,
        )
    typed = error_for_code(code, message)
    if typed is not None:
        return typed
    return ControlError(message, code=code, status=status)


def _os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` under httpx's and httpcore's wrappers, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def connect_error(socket: Path, exc: BaseException) -> ControlError:
    """Why the socket could not be connected to, and what to do about it."""
    os_err = _os_error(exc)
    code = os_err.errno if os_err is not None else None
    start = "start it with `tensord serve` (or `systemctl start tensord`)"
    if code in (errno.ENOENT, errno.ENOTDIR) or (code is None and not socket.exists()):
        return DaemonNotRunning(f"tensord is not running: no control socket at {socket}; {start}")
    if code == errno.ECONNREFUSED:
        return DaemonNotRunning(
            f"tensord is not running: nothing listens on the control socket at {socket}; {start}"
        )
    if code in (errno.EACCES, errno.EPERM):
        return ControlError(
            f"permission denied on the control socket {socket}: run as root, as the daemon's "
            "user, or as a member of the socket's group",
            code="forbidden",
        )
    return ControlError(f"cannot connect to the control socket {socket}: {exc}", code="connect")


def _transport_error(socket: Path, exc: httpx.TransportError) -> ControlError:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        if isinstance(exc, httpx.ConnectTimeout):
            return ControlError(
                f"the daemon did not accept a connection on {socket} within "
                f"{CONNECT_TIMEOUT:g} s (is it stuck?)",
                code="timeout",
            )
        return connect_error(socket, exc)
    if isinstance(exc, httpx.TimeoutException):
        return ControlError(f"the daemon did not answer in time: {exc}", code="timeout")
    return ControlError(f"lost the connection to the daemon: {exc or type(exc).__name__}")


# --------------------------------------------------------------------------------------------
# Requests, written once for both clients


class _Endpoints(Endpoints):
    """The socket and the timeouts of a client; the endpoints are :class:`Endpoints`'."""

    _http: httpx.Client | httpx.AsyncClient

    def __init__(self, socket: str | os.PathLike[str] | None, timeout: float | None) -> None:
        self.socket = resolve_socket(socket)
        t = DEFAULT_TIMEOUT if timeout is None else timeout
        #: Ordinary calls: a few seconds to connect, ``timeout`` for the rest.
        self._short = httpx.Timeout(t, connect=min(CONNECT_TIMEOUT, t))
        #: Calls that last as long as a transfer (send, pull, put, events): no read limit.
        self._long = httpx.Timeout(None, connect=CONNECT_TIMEOUT)
        self._headers = {"user-agent": f"tensord-client/{__version__}"}

    def _request(
        self, call: Call[Any], content: Iterator[bytes] | AsyncIterator[bytes] | None = None
    ) -> httpx.Request:
        headers = {"content-type": "application/octet-stream"} if content is not None else None
        return self._http.build_request(
            call.method,
            call.url,
            json=call.json,
            content=content,
            headers=headers,
            timeout=self._long if call.long else self._short,
        )


def _raise_for_error(response: httpx.Response) -> None:
    """The typed error a reply carries, if it is one. The body must have been read."""
    if not response.is_success:
        raise error_from_reply(response.status_code, response.content)


def _deprecated_download() -> None:
    warnings.warn(
        "Client.download(name, path) is now Client.get(name, path), as the CLI calls it "
        "(`tensord get`); `download` goes in a later release",
        DeprecationWarning,
        stacklevel=3,
    )


def _download_info(name: str, target: Path, response: httpx.Response, size: int) -> Json:
    return {
        "name": name,
        "path": str(target),
        "dtype": response.headers.get("x-tensord-dtype", ""),
        "file_bytes": size,
    }


def _open_temp(target: Path) -> tuple[int, Path]:
    """A new file next to ``target`` (same filesystem, so the rename is atomic), created with
    the mode a plain ``open()`` would give it rather than ``mkstemp``'s 0600."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:  # name the file asked for, not our temporary one
            raise OSError(exc.errno, exc.strerror, str(target)) from None


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Blocking client


class EventStream(Iterator[Json]):
    """The daemon's events as dicts. ``with`` (or the first ``next``) returns once the
    subscription is live; iteration ends when the daemon closes the stream."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._queue = EventQueue()
        self._response: httpx.Response | None = None
        self._chunks: Iterator[bytes] | None = None
        self._closed = False

    @property
    def subscribed(self) -> bool:
        return self._queue.subscribed

    def open(self) -> Self:
        if self._response is not None or self._closed:
            return self
        http = self._client._http
        request = self._client._request(EVENTS)
        try:
            self._response = http.send(request, stream=True)
            if not self._response.is_success:
                self._response.read()
                _raise_for_error(self._response)
            self._chunks = self._response.iter_bytes()
            while not self._queue.subscribed:
                if not self._pull():
                    raise ControlError("the daemon closed the events stream before subscribing")
        except httpx.TransportError as exc:
            self.close()
            raise _transport_error(self._client.socket, exc) from None
        except BaseException:
            self.close()
            raise
        return self

    def _pull(self) -> bool:
        assert self._chunks is not None
        for chunk in self._chunks:
            self._queue.feed(chunk)
            return True
        return False

    def __next__(self) -> Json:
        self.open()
        while not self._queue.events:
            if self._closed:
                raise StopIteration
            try:
                more = self._pull()
            except httpx.TransportError as exc:
                self.close()
                raise _transport_error(self._client.socket, exc) from None
            if not more:
                self.close()
                raise StopIteration
        return self._queue.events.popleft()

    def close(self) -> None:
        self._closed = True
        if self._response is not None:
            self._response.close()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Client(_Endpoints, SyncEndpoints):
    """Blocking client of a local ``tensord serve``: ``with Client() as c: c.status()``."""

    _http: httpx.Client

    def __init__(
        self, socket: str | os.PathLike[str] | None = None, *, timeout: float | None = None
    ) -> None:
        super().__init__(socket, timeout)
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url=BASE_URL,
            timeout=self._short,
            headers=self._headers,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _execute(self, describe: Callable[[], Call[T]]) -> T:
        call = describe()
        content = _file_chunks(call.upload) if call.upload is not None else None
        try:
            response = self._http.send(self._request(call, content))
        except httpx.TransportError as exc:
            raise _transport_error(self.socket, exc) from None
        _raise_for_error(response)
        return call.parse(response)

    def get(self, name: str, path: str | os.PathLike[str]) -> Json:
        """Write tensor ``name`` to ``path`` as a ``.npy`` file, atomically: whoever opens
        ``path`` sees the old file or the whole new one."""
        target = Path(absolute(path))
        try:
            response = self._http.send(self._request(tensor_data(name)), stream=True)
            try:
                if not response.is_success:
                    response.read()
                    _raise_for_error(response)
                fd, tmp = _open_temp(target)
                try:
                    with open(fd, "wb") as f:
                        for chunk in response.iter_bytes():
                            f.write(chunk)
                        f.flush()
                        os.fsync(f.fileno())
                        size = f.tell()
                    os.replace(tmp, target)
                except BaseException:
                    _unlink(tmp)
                    raise
            finally:
                response.close()
        except httpx.TransportError as exc:
            raise _transport_error(self.socket, exc) from None
        return _download_info(name, target, response, size)

    def download(self, name: str, path: str | os.PathLike[str]) -> Json:
        """Deprecated: :meth:`get`."""
        _deprecated_download()
        return self.get(name, path)

    def events(self) -> EventStream:
        """The events stream: ``with client.events() as events: for e in events: ...``."""
        return EventStream(self)

    subscribe = events


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(UPLOAD_CHUNK):
            yield data


# --------------------------------------------------------------------------------------------
# Async client (trio or asyncio: httpx runs on either through anyio)


class AsyncEventStream(AsyncIterator[Json]):
    """The daemon's events as dicts. ``async with`` returns once the subscription is live;
    iteration ends when the daemon closes the stream."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._queue = EventQueue()
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._closed = False

    @property
    def subscribed(self) -> bool:
        return self._queue.subscribed

    async def open(self) -> Self:
        if self._response is not None or self._closed:
            return self
        http = self._client._http
        request = self._client._request(EVENTS)
        try:
            self._response = await http.send(request, stream=True)
            if not self._response.is_success:
                await self._response.aread()
                _raise_for_error(self._response)
            self._chunks = self._response.aiter_bytes()
            while not self._queue.subscribed:
                if not await self._pull():
                    raise ControlError("the daemon closed the events stream before subscribing")
        except httpx.TransportError as exc:
            await self.aclose()
            raise _transport_error(self._client.socket, exc) from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        return self

    async def _pull(self) -> bool:
        assert self._chunks is not None
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            return False
        self._queue.feed(chunk)
        return True

    async def __anext__(self) -> Json:
        await self.open()
        while not self._queue.events:
            if self._closed:
                raise StopAsyncIteration
            try:
                more = await self._pull()
            except httpx.TransportError as exc:
                await self.aclose()
                raise _transport_error(self._client.socket, exc) from None
            if not more:
                await self.aclose()
                raise StopAsyncIteration
        return self._queue.events.popleft()

    async def aclose(self) -> None:
        self._closed = True
        chunks, self._chunks = self._chunks, None
        if chunks is not None and hasattr(chunks, "aclose"):
            await chunks.aclose()
        if self._response is not None:
            await self._response.aclose()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()


class AsyncClient(_Endpoints, AsyncEndpoints):
    """Async client of a local ``tensord serve``: ``async with AsyncClient() as c: ...``; the
    same methods as :class:`Client`, awaited."""

    _http: httpx.AsyncClient

    def __init__(
        self, socket: str | os.PathLike[str] | None = None, *, timeout: float | None = None
    ) -> None:
        super().__init__(socket, timeout)
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
            base_url=BASE_URL,
            timeout=self._short,
            headers=self._headers,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _execute(self, describe: Callable[[], Call[T]]) -> T:
        call = describe()
        content = _async_file_chunks(call.upload) if call.upload is not None else None
        try:
            response = await self._http.send(self._request(call, content))
        except httpx.TransportError as exc:
            raise _transport_error(self.socket, exc) from None
        _raise_for_error(response)
        return call.parse(response)

    async def get(self, name: str, path: str | os.PathLike[str]) -> Json:
        """Write tensor ``name`` to ``path`` as a ``.npy`` file, atomically (see
        ``Client.get``); the file is written from a worker thread."""
        target = Path(absolute(path))
        try:
            response = await self._http.send(self._request(tensor_data(name)), stream=True)
            try:
                if not response.is_success:
                    await response.aread()
                    _raise_for_error(response)
                fd, tmp = await anyio.to_thread.run_sync(_open_temp, target)
                try:
                    async with await anyio.open_file(fd, "wb") as f:
                        async for chunk in response.aiter_bytes():
                            await f.write(chunk)
                        await f.flush()
                        await anyio.to_thread.run_sync(os.fsync, fd)
                        size = await f.tell()
                    await anyio.to_thread.run_sync(os.replace, tmp, target)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(_unlink, tmp)
                    raise
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
        except httpx.TransportError as exc:
            raise _transport_error(self.socket, exc) from None
        return _download_info(name, target, response, size)

    def download(self, name: str, path: str | os.PathLike[str]) -> Coroutine[Any, Any, Json]:
        """Deprecated: :meth:`get` (warns when called, before it is awaited)."""
        _deprecated_download()
        return self.get(name, path)

    def events(self) -> AsyncEventStream:
        """The events stream: ``async with client.events() as events: async for e in events``;
        the ``async with`` returns once the subscription is live."""
        return AsyncEventStream(self)

    subscribe = events


async def _async_file_chunks(path: str) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        while data := await f.read(UPLOAD_CHUNK):
            yield data


__all__ = [
    "AsyncClient",
    "AsyncEventStream",
    "Call",
    "Client",
    "ControlError",
    "DaemonNotRunning",
    "EventStream",
    "SSEComment",
    "SSEMessage",
    "SSEParser",
    "error_from_reply",
    "resolve_socket",
    "tensor_path",
]
