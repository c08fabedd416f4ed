"""Clients of the control API (docs/CONTROL.md): ``Client`` (blocking) and ``AsyncClient``.

Both speak HTTP/1.1 over the daemon's Unix socket with httpx, and turn its JSON errors back into
the typed errors the daemon raised (``TensorNotFound``, ``PeerUnreachable``, ...), so a program
using the client handles the same exceptions as one embedding a ``TensorNode``.

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
import io
import json
import os
import re
import secrets
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import httpx

from .._version import __version__
from ..config import default_control_socket, load_settings
from ..errors import (
    ConfigError,
    TensorError,
    error_for_code,
)

if TYPE_CHECKING:
    import numpy as np

# numpy and the store are imported when needed: a CLI command starts faster without them.

#: Where a system daemon (systemd's ``RuntimeDirectory=tensord``) has its socket.
SYSTEM_SOCKET = Path("/run/tensord/control.sock")
BASE_URL = "http://tensord"
CONNECT_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 60.0
UPLOAD_CHUNK = 1 << 20

Json = dict[str, Any]


class ControlError(TensorError):
    """The daemon refused a request (``code`` and HTTP ``status`` as it answered them), or could
    not be talked to at all (``status`` 0)."""

    def __init__(self, message: str, *, code: str = "error", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class DaemonNotRunning(ControlError):
    """Nothing listens on the control socket: the message says where it looked and how to start
    the daemon."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="not_running")


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


def tensor_path(name: str, *rest: str) -> str:
    """``/v1/tensors/<name>``: the name is one percent-encoded path segment, ``/`` included
    (and a name of dots encoded too, or the URL would be normalised to its parent)."""
    segment = urllib.parse.quote(name, safe="")
    if segment.strip(".") == "":
        segment = segment.replace(".", "%2E")
    return "/".join(["/v1/tensors", segment, *rest])


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
# Server-Sent Events


@dataclass(frozen=True, slots=True)
class SSEMessage:
    """One dispatched event: its ``event:`` type (``message`` if none) and its joined data."""

    event: str
    data: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class SSEComment:
    """A ``:`` line: the daemon's ``: subscribed`` and ``: keep-alive``."""

    text: str


_EOL = re.compile(rb"\r\n|\r|\n")


class SSEParser:
    """Incremental ``text/event-stream`` parser (the WHATWG rules): feed it bytes as they come,
    get back the messages and comments completed so far. Pure, so it is tested on byte strings.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False  # the last chunk ended in "\r": a "\n" starting the next is its pair
        self._first = True
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEMessage | SSEComment]:
        out: list[SSEMessage | SSEComment] = []
        if not chunk:
            return out
        if self._skip_lf:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        buf = self._buf + chunk
        start = 0
        for m in _EOL.finditer(buf):
            if m.group() == b"\r" and m.end() == len(buf):
                self._skip_lf = True
            self._line(buf[start : m.start()], out)
            start = m.end()
        self._buf = buf[start:]
        return out

    def _line(self, raw: bytes, out: list[SSEMessage | SSEComment]) -> None:
        line = raw.decode("utf-8", "replace")
        if self._first:
            self._first = False
            line = line.removeprefix("\ufeff")
        if not line:
            if self._data:
                out.append(SSEMessage(self._event or "message", "\n".join(self._data), self._id))
            self._event, self._data = "", []
            return
        if line.startswith(":"):
            out.append(SSEComment(line[1:].removeprefix(" ")))
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields are ignored, as the standard says.


def event_dict(message: SSEMessage) -> Json:
    """A node event as a dict: the message's JSON data, with ``kind`` from ``event:`` if absent."""
    try:
        doc = json.loads(message.data)
    except ValueError as exc:
        raise ControlError(
            f"the events stream sent data that is not JSON: {exc}", code="protocol"
        ) from None
    if not isinstance(doc, dict):
        doc = {"data": doc}
    doc.setdefault("kind", message.event)
    return doc


class _EventQueue:
    """Parser plus what it produced and was not consumed yet."""

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.events: deque[Json] = deque()
        self.subscribed = False

    def feed(self, chunk: bytes) -> None:
        for item in self.parser.feed(chunk):
            if isinstance(item, SSEComment):
                if item.text == "subscribed":
                    self.subscribed = True
            else:
                self.events.append(event_dict(item))


# --------------------------------------------------------------------------------------------
# Shared request plumbing


class _Base:
    def __init__(self, socket: str | os.PathLike[str] | None, timeout: float | None) -> None:
        self.socket = resolve_socket(socket)
        t = DEFAULT_TIMEOUT if timeout is None else timeout
        #: Ordinary calls: a few seconds to connect, ``timeout`` for the rest.
        self._short = httpx.Timeout(t, connect=min(CONNECT_TIMEOUT, t))
        #: Calls that last as long as a transfer (send, pull, put, events): no read limit.
        self._long = httpx.Timeout(None, connect=CONNECT_TIMEOUT)
        self._headers = {"user-agent": f"tensord-client/{__version__}"}

    @staticmethod
    def _send_body(peer: str, name: str | None, path: str | os.PathLike[str] | None) -> Json:
        if path is None:
            if name is None:
                raise ValueError("send() needs a stored tensor's name or a file's path")
            return {"peer": peer, "name": name}
        body: Json = {"peer": peer, "path": _absolute(path)}
        if name is not None:
            body["name"] = name
        return body

    @staticmethod
    def _pull_body(peer: str, name: str, as_name: str | None) -> Json:
        body: Json = {"peer": peer, "name": name}
        if as_name is not None:
            body["as"] = as_name
        return body


def _check(response: httpx.Response) -> Any:
    """The reply's JSON, or the typed error it carries. The body must have been read."""
    if not response.is_success:
        raise error_from_reply(response.status_code, response.content)
    try:
        return response.json()
    except ValueError as exc:
        raise ControlError(f"the daemon's reply is not JSON: {exc}", code="protocol") from None


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


def _absolute(path: str | os.PathLike[str]) -> str:
    """The daemon resolves paths from its own directory: send it an absolute one (``getcwd``,
    no I/O on the file)."""
    return os.path.abspath(path)


def _load_npy(data: bytes) -> np.ndarray[Any, Any]:
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# Blocking client


class EventStream(Iterator[Json]):
    """The daemon's events as dicts. ``with`` (or the first ``next``) returns once the
    subscription is live; iteration ends when the daemon closes the stream."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._queue = _EventQueue()
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
        request = http.build_request("GET", "/v1/events", timeout=self._client._long)
        try:
            self._response = http.send(request, stream=True)
            if not self._response.is_success:
                self._response.read()
                _check(self._response)
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


class Client(_Base):
    """Blocking client of a local ``tensord serve``: ``with Client() as c: c.status()``."""

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

    def _call(self, method: str, url: str, *, long: bool = False, **kwargs: Any) -> Any:
        try:
            response = self._http.request(
                method, url, timeout=self._long if long else self._short, **kwargs
            )
        except httpx.TransportError as exc:
            raise _transport_error(self.socket, exc) from None
        return _check(response)

    def status(self) -> Json:
        result: Json = self._call("GET", "/v1/status")
        return result

    def peers(self) -> list[Json]:
        result: list[Json] = self._call("GET", "/v1/peers")["peers"]
        return result

    def tensors(self) -> list[Json]:
        result: list[Json] = self._call("GET", "/v1/tensors")["tensors"]
        return result

    def tensor(self, name: str) -> Json:
        result: Json = self._call("GET", tensor_path(name))
        return result

    def download(self, name: str, path: str | os.PathLike[str]) -> Json:
        """Write tensor ``name`` to ``path`` as a ``.npy`` file, atomically: whoever opens
        ``path`` sees the old file or the whole new one."""
        target = Path(_absolute(path))
        try:
            with self._http.stream("GET", tensor_path(name, "data")) as response:
                if not response.is_success:
                    response.read()
                    _check(response)
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
        except httpx.TransportError as exc:
            raise _transport_error(self.socket, exc) from None
        return _download_info(name, target, response, size)

    def load(self, name: str) -> np.ndarray[Any, Any]:
        """Tensor ``name`` as an array (bf16/fp8 come as same-size unsigned ints)."""
        try:
            response = self._http.get(tensor_path(name, "data"))
        except httpx.TransportError as exc:
            raise _transport_error(self.socket, exc) from None
        if not response.is_success:
            _check(response)
        return _load_npy(response.content)

    def put(self, name: str, path: str | os.PathLike[str]) -> Json:
        """Store the tensor in the file at ``path`` (``.npy``, or ``.safetensors`` holding one)
        as ``name``. The daemon opens the file itself: see ``upload`` for files it cannot see."""
        result: Json = self._call(
            "PUT", tensor_path(name), json={"path": _absolute(path)}, long=True
        )
        return result

    def upload(self, name: str, path: str | os.PathLike[str]) -> Json:
        """Store a ``.npy`` file by streaming its bytes to the daemon, for a file the daemon
        cannot open (another user's home, ``PrivateTmp=``)."""

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while data := f.read(UPLOAD_CHUNK):
                    yield data

        headers = {"content-type": "application/octet-stream"}
        result: Json = self._call(
            "PUT", tensor_path(name), content=chunks(), headers=headers, long=True
        )
        return result

    def delete(self, name: str) -> None:
        self._call("DELETE", tensor_path(name))

    def send(
        self,
        peer: str,
        *,
        name: str | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> list[Json]:
        """Send stored tensor ``name``, or the tensors of the file at ``path`` (then ``name`` is
        the remote name, or prefix for a ``.safetensors``), to ``peer``. Returns once the peer
        has verified and stored everything."""
        result: list[Json] = self._call(
            "POST", "/v1/send", json=self._send_body(peer, name, path), long=True
        )["transfers"]
        return result

    def pull(self, peer: str, name: str, *, as_name: str | None = None) -> Json:
        """Fetch ``name`` from ``peer`` into the daemon's store (as ``as_name``)."""
        result: Json = self._call(
            "POST", "/v1/pull", json=self._pull_body(peer, name, as_name), long=True
        )
        return result

    def transfers(self) -> list[Json]:
        result: list[Json] = self._call("GET", "/v1/transfers")["transfers"]
        return result

    def reload(self) -> Json:
        result: Json = self._call("POST", "/v1/reload")
        return result

    def downloads(self) -> list[Json]:
        """Background downloads, newest first."""
        result: list[Json] = self._call("GET", "/v1/downloads")["downloads"]
        return result

    def pull_model(self, reference: str) -> Json:
        """Start pulling a model (``[REGISTRY/]NAME[:TAG]``) in the background; returns the job
        (an existing job for the same model if one runs). Follow it on :meth:`events`."""
        result: Json = self._call("POST", "/v1/downloads", json={"model": reference})
        return result

    def download_url(self, url: str, sha256: str) -> Json:
        """Start downloading ``url`` (checked against ``sha256``) in the background."""
        result: Json = self._call("POST", "/v1/downloads", json={"url": url, "sha256": sha256})
        return result

    def download_job(self, job_id: str) -> Json:
        result: Json = self._call("GET", f"/v1/downloads/{urllib.parse.quote(job_id, safe='')}")
        return result

    def cancel_download(self, job_id: str) -> Json:
        result: Json = self._call("DELETE", f"/v1/downloads/{urllib.parse.quote(job_id, safe='')}")
        return result

    def events(self) -> EventStream:
        """The events stream: ``with client.events() as events: for e in events: ...``."""
        return EventStream(self)

    subscribe = events


# --------------------------------------------------------------------------------------------
# Async client (trio or asyncio: httpx runs on either through anyio)


class AsyncEventStream(AsyncIterator[Json]):
    """The daemon's events as dicts. ``async with`` returns once the subscription is live;
    iteration ends when the daemon closes the stream."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._queue = _EventQueue()
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
        request = http.build_request("GET", "/v1/events", timeout=self._client._long)
        try:
            self._response = await http.send(request, stream=True)
            if not self._response.is_success:
                await self._response.aread()
                _check(self._response)
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


class AsyncClient(_Base):
    """Async client of a local ``tensord serve``: ``async with AsyncClient() as c: ...``."""

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

    async def _call(self, method: str, url: str, *, long: bool = False, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(
                method, url, timeout=self._long if long else self._short, **kwargs
            )
        except httpx.TransportError as exc:
            raise _transport_error(self.socket, exc) from None
        return _check(response)

    async def status(self) -> Json:
        result: Json = await self._call("GET", "/v1/status")
        return result

    async def peers(self) -> list[Json]:
        result: list[Json] = (await self._call("GET", "/v1/peers"))["peers"]
        return result

    async def tensors(self) -> list[Json]:
        result: list[Json] = (await self._call("GET", "/v1/tensors"))["tensors"]
        return result

    async def tensor(self, name: str) -> Json:
        result: Json = await self._call("GET", tensor_path(name))
        return result

    async def download(self, name: str, path: str | os.PathLike[str]) -> Json:
        """Write tensor ``name`` to ``path`` as a ``.npy`` file, atomically (see
        ``Client.download``); the file is written from a worker thread."""
        target = Path(_absolute(path))
        try:
            async with self._http.stream("GET", tensor_path(name, "data")) as response:
                if not response.is_success:
                    await response.aread()
                    _check(response)
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
        except httpx.TransportError as exc:
            raise _transport_error(self.socket, exc) from None
        return _download_info(name, target, response, size)

    async def load(self, name: str) -> np.ndarray[Any, Any]:
        """Tensor ``name`` as an array (bf16/fp8 come as same-size unsigned ints)."""
        try:
            response = await self._http.get(tensor_path(name, "data"))
        except httpx.TransportError as exc:
            raise _transport_error(self.socket, exc) from None
        if not response.is_success:
            _check(response)
        return _load_npy(response.content)

    async def put(self, name: str, path: str | os.PathLike[str]) -> Json:
        """Store the tensor in the file at ``path`` as ``name`` (see ``Client.put``)."""
        result: Json = await self._call(
            "PUT", tensor_path(name), json={"path": _absolute(path)}, long=True
        )
        return result

    async def upload(self, name: str, path: str | os.PathLike[str]) -> Json:
        """Store a ``.npy`` file by streaming its bytes (see ``Client.upload``)."""

        async def chunks() -> AsyncIterator[bytes]:
            async with await anyio.open_file(path, "rb") as f:
                while data := await f.read(UPLOAD_CHUNK):
                    yield data

        headers = {"content-type": "application/octet-stream"}
        result: Json = await self._call(
            "PUT", tensor_path(name), content=chunks(), headers=headers, long=True
        )
        return result

    async def delete(self, name: str) -> None:
        await self._call("DELETE", tensor_path(name))

    async def send(
        self,
        peer: str,
        *,
        name: str | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> list[Json]:
        """Send a stored tensor or a file's tensors to ``peer`` (see ``Client.send``)."""
        body = self._send_body(peer, name, path)
        result: list[Json] = (await self._call("POST", "/v1/send", json=body, long=True))[
            "transfers"
        ]
        return result

    async def pull(self, peer: str, name: str, *, as_name: str | None = None) -> Json:
        """Fetch ``name`` from ``peer`` into the daemon's store (as ``as_name``)."""
        body = self._pull_body(peer, name, as_name)
        result: Json = await self._call("POST", "/v1/pull", json=body, long=True)
        return result

    async def transfers(self) -> list[Json]:
        result: list[Json] = (await self._call("GET", "/v1/transfers"))["transfers"]
        return result

    async def reload(self) -> Json:
        result: Json = await self._call("POST", "/v1/reload")
        return result

    async def downloads(self) -> list[Json]:
        result: list[Json] = (await self._call("GET", "/v1/downloads"))["downloads"]
        return result

    async def pull_model(self, reference: str) -> Json:
        result: Json = await self._call("POST", "/v1/downloads", json={"model": reference})
        return result

    async def download_url(self, url: str, sha256: str) -> Json:
        body = {"url": url, "sha256": sha256}
        result: Json = await self._call("POST", "/v1/downloads", json=body)
        return result

    async def download_job(self, job_id: str) -> Json:
        result: Json = await self._call(
            "GET", f"/v1/downloads/{urllib.parse.quote(job_id, safe='')}"
        )
        return result

    async def cancel_download(self, job_id: str) -> Json:
        result: Json = await self._call(
            "DELETE", f"/v1/downloads/{urllib.parse.quote(job_id, safe='')}"
        )
        return result

    def events(self) -> AsyncEventStream:
        """The events stream: ``async with client.events() as events: async for e in events``;
        the ``async with`` returns once the subscription is live."""
        return AsyncEventStream(self)

    subscribe = events


__all__ = [
    "AsyncClient",
    "AsyncEventStream",
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
