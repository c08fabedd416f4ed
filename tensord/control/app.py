"""The control API as a small ASGI application (spec: docs/CONTROL.md).

Plain ASGI with a table of routes rather than a web framework: a dozen endpoints, JSON in and
out, two streaming replies (a tensor's bytes, the events stream). Every error is a typed
exception from the layers below, turned here into one status code and a JSON body
``{"error": {"code", "message"}}`` - the message is the one the exception already carries.

Long calls (send, pull) run while a second task watches for ``http.disconnect``: a client that
goes away (Ctrl-C on ``tensord send``) cancels its transfer instead of leaving it running.

Every request is a trust boundary (docs/SECURITY.md): tensor names (in the URL, ``name``, ``as``)
go through the wire's own :func:`~tensord.wire.meta.check_name` (a bad one is a ``400
bad_name``), a JSON body may hold only the fields its endpoint knows, each of the right type
(``400``), a file named by ``path`` is opened only if it is a regular file the *caller* could
read (tensord/control/files.py: ``400``/``403``), and that file work runs on the app's own small
thread limiter. Anything unexpected in a handler is logged once with the endpoint, counted in
``tensord_unexpected_errors_total{boundary="control"}`` and answered ``500``: the daemon carries on.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import os
import secrets
import struct
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from .. import metrics
from ..asgi import lifespan, send_body
from ..boundary import report_unexpected
from ..cluster.remote_pull import request_pull
from ..download.registry import parse_reference
from ..errors import (
    BadTensor,
    ProtocolError,
    TensorError,
    TensorNotFound,
)
from ..events import ArrivalEvent, DownloadEvent, Event, PeerEvent, TransferEvent
from ..limits import check_name
from ..node import TransferResult
from ..store import PartialReceive, TensorInfo, TensorStore
from ..tensorfile import FileTensor, read_tensor_file
from ..wire.messages import MAX_CHAIN, MODEL_REF_RE
from ..wire.meta import TensorMeta, wire_dtype
from . import status
from .files import FILE_THREADS, open_for_caller
from .server import CALLER_KEY, Caller
from .serving import RequestTimeout

if TYPE_CHECKING:
    from .service import DaemonServices

log = logging.getLogger("tensord.control")

MAX_BODY = 1 << 20
KEEPALIVE_SECONDS = 15.0
DATA_CHUNK = 1 << 20


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def error_for(exc: BaseException) -> HTTPError:
    """The status and code of an error (each typed error states its own: tensord/errors.py)."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, RequestTimeout):
        return HTTPError(408, "timeout", str(exc))
    if isinstance(exc, TensorError):
        status, code = exc.http()
        return HTTPError(status, code, str(exc))
    return HTTPError(
        500, "internal", f"internal error ({type(exc).__name__}): see the daemon's log"
    )


def result_json(r: TransferResult) -> dict[str, Any]:
    """Every field of a :class:`TransferResult`, and its ``rate`` (0 for an instant one)."""
    return {
        **{f.name: getattr(r, f.name) for f in dataclasses.fields(r)},
        "rate": r.rate if r.seconds > 0 else 0.0,
    }


_EVENT_KINDS = {
    TransferEvent: "transfer",
    PeerEvent: "peer",
    ArrivalEvent: "arrival",
    DownloadEvent: "download",
}


def event_json(event: Event) -> dict[str, Any]:
    kind = _EVENT_KINDS.get(type(event), type(event).__name__.lower())
    return {"kind": kind, **dataclasses.asdict(event)}


def sse(event: Event) -> bytes:
    """One Server-Sent Event: ``event: <kind>`` and one ``data:`` line of JSON."""
    body = event_json(event)
    return f"event: {body['kind']}\ndata: {json.dumps(body)}\n\n".encode()


class Request:
    def __init__(self, scope: Scope, receive: ASGIReceiveCallable) -> None:
        self.scope = scope
        self._receive = receive

    async def json(self) -> dict[str, Any]:
        body = bytearray()
        while True:
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                raise HTTPError(499, "cancelled", "the client went away")
            chunk: Any = msg.get("body", b"")
            body += chunk
            if len(body) > MAX_BODY:
                raise HTTPError(413, "bad_request", f"request body over {MAX_BODY} bytes")
            if not msg.get("more_body"):
                break
        if not body:
            return {}
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise HTTPError(400, "bad_request", f"the body is not JSON: {exc}") from None
        except RecursionError:
            raise HTTPError(
                400, "bad_request", "the body is not JSON tensord accepts: nested too deep"
            ) from None
        if not isinstance(doc, dict):
            raise HTTPError(400, "bad_request", "the body must be a JSON object")
        return doc

    async def fields(self, *known: str) -> dict[str, Any]:
        """The JSON body, refused (400) if it has a field the endpoint does not know."""
        doc = await self.json()
        unknown = sorted(k for k in doc if k not in known)
        if unknown:
            raise HTTPError(
                400,
                "bad_request",
                f"unknown field{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(k[:80]) for k in unknown[:5])}: this endpoint takes "
                f"{', '.join(repr(k) for k in known)} (see docs/CONTROL.md)",
            )
        return doc

    @property
    def caller(self) -> Caller | None:
        """Who sent the request (the control socket's SO_PEERCRED), if known."""
        ext: Any = self.scope.get("extensions") or {}
        caller = ext.get(CALLER_KEY)
        return caller if isinstance(caller, Caller) else None

    async def wait_disconnect(self) -> None:
        while True:
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                return


def field(doc: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise HTTPError(400, "bad_request", f"missing field {key!r}")
        return None
    if not isinstance(value, str) or not value:
        raise HTTPError(400, "bad_request", f"field {key!r} must be a non-empty string")
    return value


def tensor_name(value: str, where: str) -> str:
    """A tensor name, checked by the wire's own validator: ``400 bad_name`` if bad."""
    try:
        return check_name(value)
    except (ProtocolError, BadTensor) as exc:
        raise HTTPError(400, "bad_name", f"bad name in {where}: {exc}") from None


def name_field(doc: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = field(doc, key, required=required)
    return None if value is None else tensor_name(value, f"field {key!r}")


def file_path(value: str) -> Path:
    path = Path(value)
    if "\0" in value:
        raise HTTPError(400, "bad_request", f"path {value[:200]!r} holds a NUL character")
    if not path.is_absolute():
        raise HTTPError(
            400, "bad_request", f"path {value!r} must be absolute (the daemon resolves it)"
        )
    return path


Handler = Callable[["ControlApp", Request, ASGISendCallable, list[str]], Awaitable[None]]


class ControlApp:
    """The ASGI app of the control socket, serving a running daemon's services."""

    def __init__(self, daemon: DaemonServices) -> None:
        self.daemon = daemon
        self.node = daemon.node
        #: Threads for the files requests name: never the default limiter the receive path uses.
        self.file_threads = trio.CapacityLimiter(FILE_THREADS)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        raw = scope.get("raw_path") or scope["path"].encode()
        path = raw.split(b"?", 1)[0].decode("ascii", "replace")
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if parts == ["metrics"] and scope["method"] == "GET":
            body, ctype = metrics.exposition()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", ctype.encode())]})  # fmt: skip
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        try:
            handler, args = self._route(scope["method"], parts)
            await handler(self, request, send, args)
        except HTTPError as exc:
            await self._error(send, exc)
        except (TensorError, OSError) as exc:
            await self._error(send, error_for(exc))
        except Exception as exc:  # a bug: log it once, count it, answer 500, carry on
            report_unexpected(log, "control", f"control request {scope['method']} {path}", exc)
            await self._error(send, error_for(exc))

    def _route(self, method: str, parts: list[str]) -> tuple[Handler, list[str]]:
        if len(parts) < 2 or parts[0] != "v1":
            raise HTTPError(404, "not_found", f"no endpoint /{'/'.join(parts)} (see /v1/status)")
        key = parts[1]
        args = parts[2:]
        routes: dict[str, Handler]
        if key == "downloads" and args:
            if len(args) != 1:
                raise HTTPError(404, "not_found", f"no endpoint /{'/'.join(parts)}")
            routes = {"GET": ControlApp.download, "DELETE": ControlApp.cancel_download}
        elif key == "tensors" and args:
            if len(args) == 2 and args[1] == "data":
                routes = {"GET": ControlApp.tensor_data}
            elif len(args) == 1:
                routes = {
                    "GET": ControlApp.tensor,
                    "PUT": ControlApp.put_tensor,
                    "DELETE": ControlApp.delete_tensor,
                }
            else:
                raise HTTPError(404, "not_found", "tensor names go in one %-encoded path segment")
        else:
            if args:
                raise HTTPError(404, "not_found", f"no endpoint /{'/'.join(parts)}")
            routes = _ROUTES.get(key, {})
        if not routes:
            raise HTTPError(404, "not_found", f"no endpoint /{'/'.join(parts)}")
        handler = routes.get(method)
        if handler is None:
            raise HTTPError(
                405, "method_not_allowed", f"{method} not allowed here: use {', '.join(routes)}"
            )
        if key == "tensors" and args:
            tensor_name(args[0], "the URL")
        return handler, args

    # -- replies

    @staticmethod
    async def _json(send: ASGISendCallable, status: int, body: object) -> None:
        data = json.dumps(body).encode() + b"\n"
        await send_body(send, status, data, b"application/json", [])

    async def _error(self, send: ASGISendCallable, exc: HTTPError) -> None:
        try:
            await self._json(send, exc.status, {"error": {"code": exc.code, "message": str(exc)}})
        except Exception:  # the reply had started (a stream failed midway): just close
            log.debug("control API: could not send the error reply", exc_info=True)

    async def _until_disconnect(self, request: Request, work: Awaitable[Any]) -> Any:
        """Run ``work``; cancel it if the client disconnects first."""
        results: list[Any] = []
        errors: list[Exception] = []

        async with trio.open_nursery() as nursery:

            async def run() -> None:
                try:
                    results.append(await work)
                except Exception as exc:  # raised below as itself, not in an ExceptionGroup
                    errors.append(exc)
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                await request.wait_disconnect()
                log.info("control API: the client went away; cancelling its request")
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            nursery.start_soon(watch)
        if errors:
            raise errors[0]
        if not results:
            raise HTTPError(499, "cancelled", "the client went away")
        return results[0]

    # -- handlers

    async def status(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        await self._json(send, 200, await status.status(self.daemon))

    async def peers(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        await self._json(send, 200, {"peers": status.peer_list(self.daemon)})

    async def tensors(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        infos = await trio.to_thread.run_sync(self.node.tensors)
        await self._json(send, 200, {"tensors": [i.to_json() for i in infos]})

    async def tensor(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        await self._json(send, 200, self.node.tensor_info(args[0]).to_json())

    async def tensor_data(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        store = self.daemon.store
        name = args[0]
        info = store.meta(name)
        for _ in range(3):
            try:
                f = await trio.open_file(store.path(name), "rb")
                break
            except FileNotFoundError:
                continue  # replaced by a newer version between the two calls
        else:
            raise TensorNotFound(f"tensor {name!r} kept changing while it was being read")
        async with f:
            size = os.fstat(f.fileno()).st_size
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/octet-stream"),
                        (b"content-length", str(size).encode()),
                        (b"x-tensord-dtype", info.dtype.encode()),
                    ],
                }
            )
            while data := await f.read(DATA_CHUNK):
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def put_tensor(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        raw_headers: Any = req.scope.get("headers", [])
        headers: dict[bytes, bytes] = dict(raw_headers)
        if headers.get(b"content-type", b"").startswith(b"application/octet-stream"):
            info = await receive_npy_upload(self.daemon.store, args[0], req)
            await self._json(send, 201, info.to_json())
            return
        doc = await req.fields("path")
        path = file_path(str(field(doc, "path")))
        name = args[0]
        found = await self._read_file(req, path, name)
        if len(found) != 1:
            raise HTTPError(
                400,
                "bad_request",
                f"{path} holds {len(found)} tensors: upload needs a file with exactly one "
                "(use `tensord send` to send them all)",
            )
        ft = found[0]
        await trio.to_thread.run_sync(
            lambda: self.node.put_tensor(name, ft.array, dtype=ft.dtype),
            limiter=self.file_threads,
            abandon_on_cancel=True,  # a hung mount must not hold up the daemon's shutdown
        )
        await self._json(send, 201, self.node.tensor_info(name).to_json())

    async def _read_file(self, req: Request, path: Path, name: str | None) -> list[FileTensor]:
        """The tensors of the file at ``path``, opened for the request's caller (files.py), on
        the app's own thread limiter."""
        caller = req.caller

        def read() -> list[FileTensor]:
            fd, opened = open_for_caller(path, caller)
            try:
                return read_tensor_file(opened, name)
            except (EOFError, ValueError, RecursionError, OSError, struct.error) as exc:
                # A file the parser did not expect (an empty .npy raises EOFError, a deeply
                # nested safetensors header RecursionError): the file is bad, not the daemon.
                if isinstance(exc, BadTensor):
                    raise
                raise BadTensor(
                    f"{path}: not a readable .npy or .safetensors file "
                    f"({type(exc).__name__}: {exc or 'no detail'})"
                ) from None
            finally:
                os.close(fd)

        found: list[FileTensor] = await trio.to_thread.run_sync(
            read, limiter=self.file_threads, abandon_on_cancel=True
        )
        return found

    async def delete_tensor(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        self.node.delete_tensor(args[0])
        await self._json(send, 200, {"deleted": args[0]})

    async def send_(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        doc = await req.fields("peer", "to", "name", "path")
        name = name_field(doc, "name", required=False)
        path_value = field(doc, "path", required=False)
        path = None if path_value is None else file_path(path_value)
        if "to" in doc:
            if "peer" in doc:
                raise HTTPError(400, "bad_request", "give 'peer' or 'to', not both")
            await self._broadcast(req, send, self._chain_peers(doc["to"]), name, path)
            return
        peer = str(field(doc, "peer"))

        async def work() -> list[dict[str, Any]]:
            if path is None:
                if name is None:
                    raise HTTPError(400, "bad_request", "give the tensor's 'name' or a 'path'")
                return [result_json(await self.node.send_stored(peer, name))]
            found = await self._read_file(req, path, name)
            return [
                result_json(await self.node.send_tensor(peer, ft.name, ft.array, dtype=ft.dtype))
                for ft in found
            ]

        results = await self._until_disconnect(req, work())
        await self._json(send, 200, {"transfers": results})

    def _chain_peers(self, to: object) -> list[str]:
        """``"to"``: a list of peers (node ids, tickets or host:port), or ``"all"``: every
        other node of the cluster file. At most :data:`MAX_CHAIN`, none twice."""
        if to == "all":
            me = self.node.node_id
            peers = [n.id for n in self.node.settings.nodes if n.id != me]
            if not peers:
                raise HTTPError(400, "bad_request", "'to': 'all': the cluster file has no peers")
            return peers
        if (
            not isinstance(to, list)
            or not 1 <= len(to) <= MAX_CHAIN
            or not all(isinstance(p, str) and 0 < len(p) <= 512 for p in to)
        ):
            raise HTTPError(
                400,
                "bad_request",
                f"field 'to' must be \"all\" or a list of 1-{MAX_CHAIN} peers "
                "(node ids, tickets or host:port)",
            )
        if len(set(to)) != len(to):
            raise HTTPError(400, "bad_request", "field 'to' names a peer twice")
        return list(to)

    async def _broadcast(
        self,
        req: Request,
        send: ASGISendCallable,
        peers: list[str],
        name: str | None,
        path: Path | None,
    ) -> None:
        """``POST /v1/send`` with ``"to"``: a chain broadcast per tensor, each peer's outcome."""

        async def work() -> list[dict[str, Any]]:
            if path is None:
                if name is None:
                    raise HTTPError(400, "bad_request", "give the tensor's 'name' or a 'path'")
                return [(await self.node.send_stored_to_all(peers, name)).to_json()]
            found = await self._read_file(req, path, name)
            return [
                (
                    await self.node.broadcast_tensor(peers, ft.name, ft.array, dtype=ft.dtype)
                ).to_json()
                for ft in found
            ]

        results = await self._until_disconnect(req, work())
        await self._json(send, 200, {"broadcasts": results})

    async def pull(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        doc = await req.fields("peer", "name", "as")
        peer = str(field(doc, "peer"))
        name = str(name_field(doc, "name"))
        local = name_field(doc, "as", required=False) or name
        started = time.perf_counter()
        await self._until_disconnect(req, self.node.pull_tensor(peer, name, as_name=local))
        seconds = time.perf_counter() - started
        info = self.node.tensor_info(local)
        transfer = {
            "name": name,
            "peer": peer,
            "nbytes": info.nbytes,
            "seconds": seconds,
            "rate": info.nbytes / seconds if seconds > 0 else 0.0,
        }
        await self._json(send, 200, {"tensor": info.to_json(), "transfer": transfer})

    async def transfers(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        table = self.daemon.transfers
        await self._json(send, 200, {"transfers": table.in_flight() + table.recent()})

    async def reload(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        peers = self.daemon.reload_or_raise()
        await self._json(send, 200, {"reloaded": True, "peers": peers})

    async def downloads(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        jobs = self.daemon.downloads.list()
        await self._json(send, 200, {"downloads": [j.to_json() for j in jobs]})

    async def start_download(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        doc = await req.fields("model", "url", "sha256", "on")
        model = field(doc, "model", required=False)
        url = field(doc, "url", required=False)
        if (model is None) == (url is None):
            raise HTTPError(400, "bad_request", "give exactly one of 'model' or 'url'")
        manager = self.daemon.downloads
        if "on" in doc:
            if model is None:
                raise HTTPError(400, "bad_request", "'on' goes with a 'model' pull, not a 'url'")
            await self._json(send, 202, await self._pull_on(model, self._pull_nodes(doc["on"])))
            return
        if model is not None:
            job = manager.start("model", model)
        else:
            job = manager.start("url", str(url), field(doc, "sha256"))
        await self._json(send, 202, job.to_json())

    def _pull_nodes(self, on: object) -> list[str]:
        """``"on"``: ``"all"`` (every node of the cluster file, this one included) or a list of
        node ids of the cluster file, none twice."""
        known = [n.id for n in self.node.settings.nodes]
        if on == "all":
            return known or [self.node.node_id]
        if (
            not isinstance(on, list)
            or not 1 <= len(on) <= MAX_CHAIN
            or not all(isinstance(n, str) and 0 < len(n) <= 256 for n in on)
        ):
            raise HTTPError(
                400,
                "bad_request",
                f"field 'on' must be \"all\" or a list of 1-{MAX_CHAIN} node ids",
            )
        if len(set(on)) != len(on):
            raise HTTPError(400, "bad_request", "field 'on' names a node twice")
        me = self.node.node_id
        unknown = [n for n in on if n != me and n not in known]
        if unknown:
            raise HTTPError(
                404,
                "unknown_peer",
                f"unknown node {unknown[0][:80]!r} in 'on': the cluster file names "
                f"{', '.join(known) or 'no nodes'} (nothing was started)",
            )
        return list(on)

    async def _pull_on(self, model: str, nodes: list[str]) -> dict[str, Any]:
        """``POST /v1/downloads`` with ``"on"``: this node starts the pull if named, each peer
        named is asked to over the peer protocol (``remote_pull``); the nodes then share the
        pieces. One entry per node: the job id, or the error."""
        parse_reference(model)  # a bad reference is refused here, before any node is asked
        if not MODEL_REF_RE.match(model):
            raise HTTPError(400, "bad_request", f"model reference {model[:80]!r} is too long")
        me = self.node.node_id
        out: dict[str, dict[str, Any]] = {}
        local = None
        if me in nodes:
            local = self.daemon.downloads.start("model", model)
            out[me] = {"node": me, "id": local.id}

        async def ask(peer: str) -> None:
            try:
                out[peer] = {"node": peer, "id": await request_pull(self.node, peer, model)}
            except TensorError as exc:
                _, code = exc.http()
                out[peer] = {"node": peer, "error": {"code": code, "message": str(exc)}}
            except Exception as exc:  # a connection that broke: this peer's outcome only
                log.info("asking %s to pull %s failed: %s", peer, model, exc)
                text = f"peer {peer}: {type(exc).__name__}: {exc}"
                out[peer] = {"node": peer, "error": {"code": "peer_unreachable", "message": text}}

        async with trio.open_nursery() as nursery:
            for peer in nodes:
                if peer != me:
                    nursery.start_soon(ask, peer)
        return {
            "model": model,
            "nodes": [out[n] for n in nodes],
            "job": None if local is None else local.to_json(),
        }

    async def download(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        await self._json(send, 200, self.daemon.downloads.get(args[0]).to_json())

    async def cancel_download(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        await self._json(send, 200, (await self.daemon.downloads.cancel(args[0])).to_json())

    async def events(self, req: Request, send: ASGISendCallable, args: list[str]) -> None:
        async with self.node.events.subscribe() as events:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            await send(
                {"type": "http.response.body", "body": b": subscribed\n\n", "more_body": True}
            )

            async def pump() -> None:
                while True:
                    event = None
                    with trio.move_on_after(KEEPALIVE_SECONDS):
                        event = await events.receive()
                    body = b": keep-alive\n\n" if event is None else sse(event)
                    await send({"type": "http.response.body", "body": body, "more_body": True})

            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    await req.wait_disconnect()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                nursery.start_soon(pump)


async def receive_npy_upload(store: TensorStore, name: str, req: Request) -> TensorInfo:
    """Store a ``.npy`` streamed in the request body, written straight into a partial file.

    For files the daemon cannot open itself (systemd's ``ProtectHome``/``PrivateTmp`` hide the
    user's home and /tmp from it): the client streams the bytes instead of naming a path. The
    header is parsed as soon as it has arrived, then the data goes into the memory-mapped
    partial as it comes - one pass, no temp file, no copy of the whole tensor in memory.
    """
    head = bytearray()
    partial: PartialReceive | None = None
    offset = 0
    try:
        while True:
            msg = await req._receive()
            if msg["type"] == "http.disconnect":
                raise HTTPError(499, "cancelled", "the client went away mid-upload")
            chunk: Any = msg.get("body", b"")
            data = memoryview(chunk)
            if partial is None:
                head += data
                parsed = parse_npy_header(name, head)
                if parsed is not None:
                    meta, header_len = parsed
                    partial = await trio.to_thread.run_sync(
                        store.begin_receive, meta, f"upload/{secrets.token_hex(8)}"
                    )
                    data = memoryview(bytes(head[header_len:]))
            if partial is not None and len(data):
                end = offset + len(data)
                if end > partial.meta.nbytes:
                    raise HTTPError(
                        400, "bad_request", "the body is longer than its .npy header says"
                    )
                partial.buffer[offset:end] = data
                offset = end
            if not msg.get("more_body"):
                break
        if partial is None:
            raise HTTPError(400, "bad_request", "the body is not a complete .npy header")
        if offset != partial.meta.nbytes:
            raise HTTPError(
                400,
                "bad_request",
                f"the body ended after {offset} of {partial.meta.nbytes} bytes of tensor data",
            )
        done = partial
        return await trio.to_thread.run_sync(lambda: done.commit(""))
    finally:
        if partial is not None and not partial.closed:
            partial.discard()


def parse_npy_header(name: str, head: bytes | bytearray) -> tuple[TensorMeta, int] | None:
    """``(meta, header length)`` once ``head`` holds a whole ``.npy`` header, else ``None``."""
    if len(head) < 10:
        return None
    if bytes(head[:6]) != b"\x93NUMPY":
        raise HTTPError(400, "bad_request", "the body is not a .npy file (no \\x93NUMPY magic)")
    major = head[6]
    size_len = 2 if major == 1 else 4
    if len(head) < 8 + size_len:
        return None
    hlen = int.from_bytes(head[8 : 8 + size_len], "little")
    total = 8 + size_len + hlen
    if hlen > 1 << 20:
        raise HTTPError(400, "bad_request", f"the .npy header is {hlen} bytes long")
    if len(head) < total:
        return None
    try:
        d = ast.literal_eval(bytes(head[8 + size_len : total]).decode("latin1"))
        dtype = np.dtype(d["descr"])
        shape = tuple(int(x) for x in d["shape"])
        if d["fortran_order"]:
            raise ValueError("Fortran-order arrays are not supported: save it C-ordered")
        meta = TensorMeta(
            check_name(name), wire_dtype(dtype), shape, dtype.itemsize * math.prod(shape)
        )
    except (ValueError, SyntaxError, KeyError, TypeError, ProtocolError) as exc:
        raise HTTPError(400, "bad_request", f"bad .npy header: {exc}") from None
    return meta, total


_ROUTES: dict[str, dict[str, Handler]] = {
    "status": {"GET": ControlApp.status},
    "peers": {"GET": ControlApp.peers},
    "tensors": {"GET": ControlApp.tensors},
    "send": {"POST": ControlApp.send_},
    "pull": {"POST": ControlApp.pull},
    "transfers": {"GET": ControlApp.transfers},
    "reload": {"POST": ControlApp.reload},
    "events": {"GET": ControlApp.events},
    "downloads": {"GET": ControlApp.downloads, "POST": ControlApp.start_download},
}

__all__ = ["ControlApp", "HTTPError", "error_for", "event_json", "result_json", "sse"]
