"""Clients of the control API (docs/CONTROL.md): ``Client`` (blocking) and ``AsyncClient``.

Both speak HTTP/1.1 over the daemon's Unix socket and turn its JSON errors back into the typed
errors the daemon raised (``TensorNotFound``, ``PeerUnreachable``, ...), so a program using the
client handles the same exceptions as one embedding a ``TensorNode``.

Each endpoint is written once (httpx's ``BaseClient`` idea), in :mod:`.endpoints`: a method
describes the request (method, path, body) and how its reply becomes a result, as a
:class:`Call`; the two clients only differ in how they send one. ``AsyncClient`` (here) sends it
with httpx, on trio or asyncio; ``Client`` (:mod:`.blocking`, re-exported here) with the
standard library's ``http.client``, so that a blocking program - ``tensord download`` - starts
without importing httpx, httpcore, anyio and trio. What is I/O beyond one request and reply -
writing a tensor to a file, reading the events stream - is written for each of them; the
stream's parser is sans-I/O and shared (:mod:`.sse`), and so is the rest (:mod:`.base`: finding
the socket, typed errors).

Progress is followed on the events stream. Subscribe first, then post: ``events()`` returns only
once the daemon has said ``: subscribed``, so nothing that happens afterwards is missed::

    async with client.subscribe() as events:
        nursery.start_soon(client.send, "b", name="w")
        async for event in events: ...
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar

import anyio
import httpx

from ..errors import ControlError, DaemonNotRunning
from .base import (
    BASE_URL,
    CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    SYSTEM_SOCKET,
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
from .blocking import Client, EventStream
from .endpoints import EVENTS, AsyncEndpoints, Call, absolute, tensor_data, tensor_path
from .sse import EventQueue, SSEComment, SSEMessage, SSEParser

# numpy is imported when needed: a CLI command starts faster without it.

Json = dict[str, Any]
T = TypeVar("T")
P = ParamSpec("P")


# --------------------------------------------------------------------------------------------
# Errors


def _transport_error(socket: Path, exc: httpx.TransportError) -> ControlError:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        if isinstance(exc, httpx.ConnectTimeout):
            return connect_timeout(socket)
        return connect_error(socket, exc)
    if isinstance(exc, httpx.TimeoutException):
        return ControlError(f"the daemon did not answer in time: {exc}", code="timeout")
    return ControlError(f"lost the connection to the daemon: {exc or type(exc).__name__}")


# --------------------------------------------------------------------------------------------
# Requests (the endpoints are written once for both clients, in .endpoints)


class _Endpoints:
    """The socket and the timeouts of the async client, and how it builds a request."""

    _http: httpx.AsyncClient

    def __init__(self, socket: str | os.PathLike[str] | None, timeout: float | None) -> None:
        self.socket = resolve_socket(socket)
        t = DEFAULT_TIMEOUT if timeout is None else timeout
        #: Ordinary calls: a few seconds to connect, ``timeout`` for the rest.
        self._short = httpx.Timeout(t, connect=min(CONNECT_TIMEOUT, t))
        #: Calls that last as long as a transfer (send, pull, put, events): no read limit.
        self._long = httpx.Timeout(None, connect=CONNECT_TIMEOUT)
        self._headers = {"user-agent": USER_AGENT}

    def _request(
        self, call: Call[Any], upload: AsyncIterator[bytes] | None = None
    ) -> httpx.Request:
        body = call.body()
        content: bytes | AsyncIterator[bytes] | None = body if body is not None else upload
        headers = None
        if content is not None:
            kind = "application/json" if body is not None else "application/octet-stream"
            headers = {"content-type": kind}
        return self._http.build_request(
            call.method,
            call.url,
            content=content,
            headers=headers,
            timeout=self._long if call.long else self._short,
        )


def _raise_for_error(response: httpx.Response) -> None:
    """The typed error a reply carries, if it is one. The body must have been read."""
    if not response.is_success:
        raise error_from_reply(response.status_code, response.content)


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
                fd, tmp = await anyio.to_thread.run_sync(open_temp, target)
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
                        await anyio.to_thread.run_sync(unlink, tmp)
                    raise
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
        except httpx.TransportError as exc:
            raise _transport_error(self.socket, exc) from None
        return download_info(name, target, response.headers.get("x-tensord-dtype", ""), size)

    def download(self, name: str, path: str | os.PathLike[str]) -> Coroutine[Any, Any, Json]:
        """Deprecated: :meth:`get` (warns when called, before it is awaited)."""
        deprecated_download()
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
    "SYSTEM_SOCKET",
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
    "connect_error",
    "error_from_reply",
    "resolve_socket",
    "tensor_path",
]
