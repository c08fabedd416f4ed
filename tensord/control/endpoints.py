"""Every endpoint of the control API, written once for both clients (httpx's ``BaseClient``
idea): a method of :class:`Endpoints` describes the request (method, path, body) and how its
reply becomes a result, as a :class:`Call`; :mod:`.client`'s ``Client`` and ``AsyncClient``
only differ in how they send one (blocking or awaited). No I/O here, and no HTTP library:
a reply is anything with the body's bytes (``content``) and ``json()`` - an ``httpx.Response``
for ``AsyncClient``, :mod:`.blocking`'s own for ``Client``, which starts without httpx.
"""

from __future__ import annotations

import functools
import io
import os
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from json import dumps as json_dumps
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    NamedTuple,
    ParamSpec,
    Protocol,
    Self,
    TypeVar,
    overload,
)

from ..errors import ControlError

if TYPE_CHECKING:
    import numpy as np

Json = dict[str, Any]
T = TypeVar("T")
P = ParamSpec("P")


def tensor_path(name: str, *rest: str) -> str:
    """``/v1/tensors/<name>``: the name is one percent-encoded path segment, ``/`` included
    (and a name of dots encoded too, or the URL would be normalised to its parent)."""
    segment = urllib.parse.quote(name, safe="")
    if segment.strip(".") == "":
        segment = segment.replace(".", "%2E")
    return "/".join(["/v1/tensors", segment, *rest])


class Reply(Protocol):
    """What an endpoint reads of a successful reply (whose body has been read)."""

    @property
    def content(self) -> bytes: ...

    def json(self) -> Any: ...


class Call(NamedTuple, Generic[T]):
    """One request of the control API and what its reply means: everything about an endpoint
    except how the request is sent. (A named tuple, not a dataclass: ``dataclasses`` imports
    ``inspect``, a tenth of a blocking CLI command's imports.)"""

    method: str
    url: str
    #: The result, from a successful reply (whose body has been read).
    parse: Callable[[Reply], T]
    json: Json | None = None
    #: The body is this file's bytes, streamed (``application/octet-stream``).
    upload: str | None = None
    #: As long as a transfer (send, pull, put, events): no read timeout.
    long: bool = False

    def body(self) -> bytes | None:
        """The ``json`` body's bytes (``application/json``), encoded as httpx encodes them, so
        that both clients send the same bytes."""
        if self.json is None:
            return None
        text = json_dumps(self.json, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode()


def _json(response: Reply) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ControlError(f"the daemon's reply is not JSON: {exc}", code="protocol") from None


def _reply(response: Reply) -> Json:
    doc: Json = _json(response)
    return doc


def _listed(key: str) -> Callable[[Reply], list[Json]]:
    """The list under ``key`` of a reply such as ``{"peers": [...]}``."""

    def parse(response: Reply) -> list[Json]:
        items: list[Json] = _json(response)[key]
        return items

    return parse


def _no_result(response: Reply) -> None:
    _json(response)


def _array(response: Reply) -> np.ndarray[Any, Any]:
    """A ``.npy`` reply as an array (bf16/fp8 come as same-size unsigned ints)."""
    import numpy as np

    return np.load(io.BytesIO(response.content), allow_pickle=False)  # type: ignore[no-any-return]


#: The events stream: its reply is read as it comes (``EventStream``), never parsed whole.
EVENTS: Call[None] = Call("GET", "/v1/events", _no_result, long=True)


class endpoint(Generic[P, T]):
    """Turns a method of :class:`Endpoints` that builds a :class:`Call` into the client's
    method that makes it: on a ``Client`` it returns the result, on an ``AsyncClient`` an
    awaitable of it (each client's ``_execute`` decides)."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[T]]) -> None:
        self._build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, client: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, client: SyncEndpoints, owner: type[Any]) -> Callable[P, T]: ...
    @overload
    def __get__(
        self, client: AsyncEndpoints, owner: type[Any]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, client: Endpoints | None, owner: type[Any]) -> Any:
        if client is None:
            return self
        build = self._build

        @functools.wraps(build)
        def call(*args: P.args, **kwargs: P.kwargs) -> Any:
            # Built by the executor, so that an async call's bad arguments raise when awaited.
            return client._execute(functools.partial(build, client, *args, **kwargs))

        return call


class Endpoints:
    """Every endpoint of the control API as a :class:`Call`; a client sends them
    (``_execute``)."""

    def _execute(self, describe: Callable[[], Call[Any]]) -> Any:
        """Send the call ``describe()`` builds and return its result (an awaitable of it, for
        the async client)."""
        raise NotImplementedError

    @endpoint
    def status(self) -> Call[Json]:
        """The node: id, version, store, peers, transfers in flight."""
        return Call("GET", "/v1/status", _reply)

    @endpoint
    def peers(self) -> Call[list[Json]]:
        return Call("GET", "/v1/peers", _listed("peers"))

    @endpoint
    def tensors(self) -> Call[list[Json]]:
        return Call("GET", "/v1/tensors", _listed("tensors"))

    @endpoint
    def tensor(self, name: str) -> Call[Json]:
        return Call("GET", tensor_path(name), _reply)

    @endpoint
    def load(self, name: str) -> Call[np.ndarray[Any, Any]]:
        """Tensor ``name`` as an array (bf16/fp8 come as same-size unsigned ints)."""
        return Call("GET", tensor_path(name, "data"), _array)

    @endpoint
    def put(self, name: str, path: str | os.PathLike[str]) -> Call[Json]:
        """Store the tensor in the file at ``path`` (``.npy``, or ``.safetensors`` holding one)
        as ``name``. The daemon opens the file itself: see ``upload`` for files it cannot see."""
        return Call("PUT", tensor_path(name), _reply, json={"path": absolute(path)}, long=True)

    @endpoint
    def upload(self, name: str, path: str | os.PathLike[str]) -> Call[Json]:
        """Store a ``.npy`` file by streaming its bytes to the daemon, for a file the daemon
        cannot open (another user's home, ``PrivateTmp=``)."""
        return Call("PUT", tensor_path(name), _reply, upload=os.fspath(path), long=True)

    @endpoint
    def delete(self, name: str) -> Call[None]:
        return Call("DELETE", tensor_path(name), _no_result)

    @endpoint
    def send(
        self,
        peer: str | None = None,
        *,
        to: Sequence[str] | str | None = None,
        name: str | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> Call[list[Json]]:
        """Send stored tensor ``name``, or the tensors of the file at ``path`` (then ``name`` is
        the remote name, or prefix for a ``.safetensors``), to ``peer``. Returns once the peer
        has verified and stored everything: one transfer result per tensor.

        With ``to`` (a list of peers, or ``"all"``: every other node of the cluster file)
        instead of ``peer``: a pipelined broadcast down that chain, one result per tensor
        listing each peer's outcome under ``"peers"`` (docs/CONTROL.md)."""
        if (peer is None) == (to is None):
            raise ValueError("send() needs a peer or to=[peers], not both")
        body: Json = {"peer": peer} if to is None else {"to": to if to == "all" else list(to)}
        if path is None:
            if name is None:
                raise ValueError("send() needs a stored tensor's name or a file's path")
            body["name"] = name
        else:
            body["path"] = absolute(path)
            if name is not None:
                body["name"] = name
        listed = _listed("transfers" if to is None else "broadcasts")
        return Call("POST", "/v1/send", listed, json=body, long=True)

    @endpoint
    def pull(self, peer: str, name: str, *, as_name: str | None = None) -> Call[Json]:
        """Fetch ``name`` from ``peer`` into the daemon's store (as ``as_name``)."""
        body: Json = {"peer": peer, "name": name}
        if as_name is not None:
            body["as"] = as_name
        return Call("POST", "/v1/pull", _reply, json=body, long=True)

    @endpoint
    def transfers(self) -> Call[list[Json]]:
        return Call("GET", "/v1/transfers", _listed("transfers"))

    @endpoint
    def reload(self) -> Call[Json]:
        return Call("POST", "/v1/reload", _reply)

    @endpoint
    def downloads(self) -> Call[list[Json]]:
        """Background downloads, newest first."""
        return Call("GET", "/v1/downloads", _listed("downloads"))

    @endpoint
    def pull_model(self, reference: str, *, on: Sequence[str] | str | None = None) -> Call[Json]:
        """Start pulling a model (``[REGISTRY/]NAME[:TAG]``) in the background; returns the job
        (an existing job for the same model if one runs). Follow it on :meth:`events`.

        With ``on`` (node ids of the cluster file, or ``"all"``): those nodes start the pull,
        this one too if named, and share the pieces; returns ``{"model", "nodes": [{"node",
        "id"} or {"node", "error"}], "job"}`` with ``job`` this node's (``None`` if not named)."""
        body: Json = {"model": reference}
        if on is not None:
            body["on"] = on if on == "all" else list(on)
        return Call("POST", "/v1/downloads", _reply, json=body)

    @endpoint
    def download_url(self, url: str, sha256: str) -> Call[Json]:
        """Start downloading ``url`` (checked against ``sha256``) in the background."""
        return Call("POST", "/v1/downloads", _reply, json={"url": url, "sha256": sha256})

    @endpoint
    def download_job(self, job_id: str) -> Call[Json]:
        return Call("GET", _job_path(job_id), _reply)

    @endpoint
    def cancel_download(self, job_id: str) -> Call[Json]:
        return Call("DELETE", _job_path(job_id), _reply)


class SyncEndpoints(Endpoints):
    """A client whose endpoint methods return their results (``Client``)."""


class AsyncEndpoints(Endpoints):
    """A client whose endpoint methods return awaitables of their results (``AsyncClient``)."""


def tensor_data(name: str) -> Call[None]:
    """The request of :meth:`Client.get`: its reply is streamed, not parsed."""
    return Call("GET", tensor_path(name, "data"), _no_result)


def _job_path(job_id: str) -> str:
    return f"/v1/downloads/{urllib.parse.quote(job_id, safe='')}"


def absolute(path: str | os.PathLike[str]) -> str:
    """The daemon resolves paths from its own directory: send it an absolute one (``getcwd``,
    no I/O on the file)."""
    return os.path.abspath(path)


__all__ = [
    "EVENTS",
    "AsyncEndpoints",
    "Call",
    "Endpoints",
    "Json",
    "Reply",
    "SyncEndpoints",
    "absolute",
    "endpoint",
    "tensor_data",
    "tensor_path",
]
