"""The gateway's HTTP API: Ollama's and OpenAI's endpoints, relayed from the cluster's Ollama nodes.

One hop, one serialization, no buffering: a request is forwarded to a backend's own endpoint
(``/api/chat`` for Ollama clients, ``/v1/chat/completions`` for OpenAI clients) and every line
the backend writes - an NDJSON object or an SSE field - is passed to the client the moment it is
complete, as the backend wrote it. What the gateway adds is around the stream, not in it:

* a backend that fails before it starts its reply is tried no more for this request and the
  next eligible one is used; when none is left the client gets a proper HTTP error (or, if a
  keep-alive comment already started the reply, an error event);
* a backend that fails mid-stream ends the stream with an error event (``data: {"error": ...}``
  for SSE, an ``{"error": ...}`` line for NDJSON) - the client never waits on a dead stream;
* while a slow model has produced nothing yet, SSE clients get ``: keep-alive`` comments (Ollama
  sends its response headers with the first token, so these start the reply themselves);
* a client that goes away cancels the upstream request at once, whether it was queued for a
  slot, waiting for the first token or mid-stream (its ``http.disconnect`` is watched for the
  whole request);
* one log line and the metrics per request (:mod:`.record`).

``/v1/ws`` carries the same chat requests over a WebSocket, several at once (:mod:`.websocket`).
This module routes requests and relays the HTTP ones; the reply to a generation request is
:mod:`.reply`, failover across backends :mod:`.upstream`. A streamed reply's first line is
relayed by the request's own task (it stops any keep-alive comments); the rest, when the server
offers a direct writer (:data:`~.http_server.BODY_WRITER`) and the backend connection is a plain
socket, by the relay thread (:mod:`.relay`) - the same lines, counted the same way
(:class:`_Lines`), one read and one write per token.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import httpx
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope

from .. import metrics
from .._version import __version__
from ..asgi import lifespan, presents_key
from ..boundary import report_unexpected
from ..control.serving import RequestTimeout
from .backends import Backend, Backends
from .encoders import ERROR, TOKEN, LineSplitter, line_kind, openai_error, reply_tokens
from .http_client import UpstreamError, UpstreamResponse
from .http_server import BODY_WRITER
from .record import _Record, _report
from .relay import Relay
from .reply import _json, _ollama_fail, _openai_fail, _Reply
from .upstream import MAX_LINE, _attempt_failed, _error_text, _try_backends
from .websocket import WS_ENDPOINT, serve_chat_socket

log = logging.getLogger("tensord.gateway")

MAX_BODY = 8 << 20
Json = dict[str, Any]


class GatewayApp:
    def __init__(
        self,
        backends: Backends,
        *,
        keepalive_seconds: float = 15.0,
        api_keys: set[str] | None = None,
        relay: Relay | None = None,
    ) -> None:
        self.backends = backends
        #: Streams the rest of a streamed reply once it started (None: each request's own task).
        self.relay = relay
        self.client = backends.client
        self.keepalive = keepalive_seconds
        self.api_keys = api_keys
        # Compared as bytes: a header is bytes, and hmac refuses non-ASCII str.
        self._keys = [k.encode() for k in api_keys or ()]

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        if self.api_keys is not None and not self._authorized(scope):
            await _json(send, 401, openai_error("a valid API key is required", "auth_error"),
                        [(b"www-authenticate", b"Bearer")])  # fmt: skip
            return
        route = _ROUTES.get((method, path))
        if route is None:
            await _json(send, 404, {"error": f"no endpoint {method} {path}"})
            return
        started = False

        async def send_started(message: ASGISendEvent) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await route(self, receive, send_started, path, scope)
        except Exception as exc:
            report_unexpected(log, "gateway", f"gateway request {method} {path}", exc)
            if not started:  # else the reply ends cut: the client sees its connection end
                await _json(send, 500, {"error": "internal error: see the gateway's log"})

    def error_document(self, path: str | None, status: int, code: str, message: str) -> object:
        """The body of an error the HTTP server answers itself (a request it refuses before the
        app sees it): in the endpoint's own shape when the path is known, else OpenAI's."""
        if path is not None and not path.startswith("/v1/"):
            return {"error": message}
        kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
        return openai_error(message, kind, code)

    def _authorized(self, scope: Scope) -> bool:
        return presents_key(scope, self._keys)

    # -- WebSocket ---------------------------------------------------------------------------

    async def websocket(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """``/v1/ws``: checked and accepted here, then served by
        :func:`~tensord.gateway.websocket.serve_chat_socket`."""
        if (await receive())["type"] != "websocket.connect":
            return
        path: Any = scope.get("path", "")
        if str(path).rstrip("/") != WS_ENDPOINT:
            await send({"type": "websocket.close", "code": 1008, "reason": "no such endpoint"})
            return
        if self.api_keys is not None and not self._authorized(scope):
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
            return
        await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        await serve_chat_socket(self.backends, receive, send)

    # -- listings ----------------------------------------------------------------------------

    async def _gather(self, path: str) -> list[Json]:
        """``GET path`` from every healthy backend, concurrently."""
        out: list[Json] = []

        async def one(b: Backend) -> None:
            try:
                r = await self.client.get(f"{b.url}{path}", timeout=5)
                if r.status_code == 200:
                    out.append(r.json())
            except (httpx.HTTPError, ValueError):
                pass

        async with trio.open_nursery() as nursery:
            for b in self.backends.healthy():
                nursery.start_soon(one, b)
        return out

    async def metrics(
        self, receive: ASGIReceiveCallable, send: ASGISendCallable, path: str, scope: Scope
    ) -> None:
        body, ctype = metrics.exposition()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", ctype.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def tags(
        self, receive: ASGIReceiveCallable, send: ASGISendCallable, path: str, scope: Scope
    ) -> None:
        seen: dict[str, Json] = {}
        for doc in await self._gather("/api/tags"):
            for m in doc.get("models", []):
                seen.setdefault(str(m.get("name")), m)
        await _json(send, 200, {"models": [seen[k] for k in sorted(seen)]})

    async def ps(
        self, receive: ASGIReceiveCallable, send: ASGISendCallable, path: str, scope: Scope
    ) -> None:
        models = [m for doc in await self._gather("/api/ps") for m in doc.get("models", [])]
        await _json(send, 200, {"models": models})

    async def version(
        self, receive: ASGIReceiveCallable, send: ASGISendCallable, path: str, scope: Scope
    ) -> None:
        # The oldest: a client that checks the version for a feature gets one every backend has.
        versions = sorted({b.version for b in self.backends.healthy() if b.version}, key=_version)
        await _json(send, 200, {"version": versions[0] if versions else "0.0.0"})

    async def models(
        self, receive: ASGIReceiveCallable, send: ASGISendCallable, path: str, scope: Scope
    ) -> None:
        seen: dict[str, Json] = {}
        for doc in await self._gather("/v1/models"):
            for m in doc.get("data", []):
                seen.setdefault(str(m.get("id")), m)
        await _json(send, 200, {"object": "list", "data": [seen[k] for k in sorted(seen)]})

    # -- generation --------------------------------------------------------------------------

    async def generate(
        self, receive: ASGIReceiveCallable, send: ASGISendCallable, path: str, scope: Scope
    ) -> None:
        received = time.perf_counter()
        openai = path.startswith("/v1/")
        record = _Record(path, "-", received)
        try:
            body = await _read_body(receive)
            if body is None:
                _report(record)  # the client went away before it had sent its request
                return
            request = json.loads(body)
            if not isinstance(request, dict) or not isinstance(request.get("model"), str):
                raise ValueError("expected a JSON object with a 'model'")
        except (ValueError, RequestTimeout) as exc:
            record.outcome = "bad_request"
            _report(record)
            if isinstance(exc, RequestTimeout):
                status, text = 408, str(exc)
            else:
                status = 413 if isinstance(exc, BodyTooLarge) else 400
                text = f"bad request: {exc}"
            await (_openai_fail if openai else _ollama_fail)(send, status, text)
            return
        record.model = request["model"]
        # As the backends read it: OpenAI's stream is a bool (absent: false), Ollama's a *bool
        # (absent or null: true).
        stream = request.get("stream") is True if openai else request.get("stream") is not False
        record.streamed = stream
        extensions: Any = scope.get("extensions") or {}
        writer = extensions.get(BODY_WRITER)
        reply = _Reply(send, record, openai=openai, keepalive=stream and openai, writer=writer)
        try:
            async with trio.open_nursery() as nursery:

                async def watch_client() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if reply.ended:
                        return  # hypercorn reports the end of every reply as a disconnect
                    log.info("gateway: the client went away; cancelling the upstream request")
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_client)
                if reply.keeping_alive:
                    nursery.start_soon(reply.keep_alive, self.keepalive)
                await self._serve(path, body, reply, record)
                nursery.cancel_scope.cancel()
        finally:
            _report(record)

    async def _serve(self, path: str, body: bytes, reply: _Reply, record: _Record) -> None:
        """Try the backends that have the model until one relays the reply."""
        model = record.model
        outcome = await _try_backends(
            self.backends,
            model,
            record,
            lambda backend: self._relay(backend, path, body, reply, record),
        )
        if outcome is None:
            return  # relayed
        if outcome == "busy":
            await reply.fail(503, f"every backend with {model!r} is busy; retry shortly",
                             [(b"retry-after", b"1")])  # fmt: skip
            return
        status, error = outcome
        record.outcome = "bad_request" if status == 400 else "no_backend"
        await reply.fail(status if status in (400, 404) else 502, error)

    async def _relay(
        self, backend: Backend, path: str, body: bytes, reply: _Reply, record: _Record
    ) -> tuple[int, str] | None:
        """Relay one backend's reply. Returns ``(status, error)`` if it failed before the reply
        started (the caller tries the next backend), ``None`` once the reply was relayed."""
        try:
            async with self.backends.upstream.post(f"{backend.url}{path}", body) as upstream:
                if upstream.status != 200:
                    status = upstream.status
                    text = (await upstream.read(500)).decode("utf-8", "replace")
                    if status != 400:
                        _attempt_failed(path, backend, f"HTTP {status}")
                    return status, _error_text(text) or f"HTTP {status}"
                ctype = upstream.head.header(b"content-type", b"application/json")
                await reply.start(ctype)
                await self._pump(upstream, reply, record, sse=reply.openai)
        except UpstreamError as exc:  # before its reply (_pump ends a reply it started itself)
            _attempt_failed(path, backend, str(exc))
            return 502, f"backend {backend.node_id} failed: {exc}"
        return None

    async def _pump(
        self, upstream: UpstreamResponse, reply: _Reply, record: _Record, *, sse: bool
    ) -> None:
        """Copy ``upstream`` to the client until it ends or the backend fails (then an error
        event ends the stream), and set the request's outcome. A stream goes on as each socket
        read brings it: its complete lines as they came (one token or a burst, one write), each
        line counted as it passes (:func:`line_kind`), a partial line kept for the rest; a whole
        reply goes as it comes."""
        lines = _Lines(record, sse)
        try:
            if not reply.stream:
                whole = bytearray()
                async for chunk in upstream.chunks():
                    if len(whole) <= MAX_LINE:
                        whole += chunk
                    await reply.body(chunk)
                record.tokens = reply_tokens(bytes(whole))
                record.outcome = "ok"
                await reply.body(b"", more=False)
                return
            relay = self.relay if upstream.fd is not None and reply.writer is not None else None
            async with aclosing(upstream.chunks()) as chunks:
                async for chunk in chunks:
                    complete = lines.take(chunk)
                    if complete:
                        await reply.body(complete)
                        if relay is not None:
                            break  # the first line went out (and any keep-alive stopped)
            if relay is not None and reply.writer is not None and not upstream.done:
                await relay.pump(upstream, lines.take, reply.writer)
            tail = lines.close()
            record.outcome = lines.outcome
            await reply.body(tail, more=False)
        except (UpstreamError, ValueError) as exc:
            log.warning("gateway: backend %s failed mid-stream: %s", record.backend, exc)
            record.outcome = "backend_error"
            if lines.open_event:
                await reply.body(b"\n")  # end the event, so the error is an event of its own
            await reply.fail(502, f"the backend failed mid-stream: {exc}")


class _Lines:
    """A streamed reply's lines as they pass: complete lines out as they came, each counted as
    it passes (:func:`line_kind`), a partial line kept for the rest."""

    def __init__(self, record: _Record, sse: bool) -> None:
        self.splitter = LineSplitter(MAX_LINE)
        self.record = record
        self.sse = sse
        self.outcome = "ok"  # "backend_error" once the backend wrote an error line
        self.open_event = False  # an SSE event's lines were relayed, not yet its blank line

    def take(self, chunk: bytes) -> bytes:
        """The complete lines ``chunk`` brings (with what came before it), as they came."""
        lines, complete = self.splitter.feed_through(chunk)
        if not lines:
            return b""
        sse, record = self.sse, self.record
        for line in lines:
            kind = line_kind(line, sse)
            if kind == TOKEN:
                record.token()
            elif kind == ERROR:
                self.outcome = "backend_error"
        self.open_event = sse and bool(lines[-1].strip())
        return complete

    def close(self) -> bytes:
        """The body's end: its last line if it had no newline (counted if it is a token), as
        a complete line."""
        tail = self.splitter.close()
        for line in tail:
            if line_kind(line, self.sse) == TOKEN:
                self.record.token()
        return b"".join(t + b"\n" for t in tail)


def _version(text: str) -> tuple[int, ...]:
    """``0.10.1`` sorts after ``0.9.0`` (as numbers, not as text)."""
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


class BodyTooLarge(ValueError):
    """A request body over MAX_BODY: refused with 413 before more of it is read."""


async def _read_body(receive: ASGIReceiveCallable) -> bytes | None:
    """The request body; None if the client went away first."""
    body = bytearray()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk: Any = msg.get("body", b"")
        body += chunk
        if len(body) > MAX_BODY:
            raise BodyTooLarge(f"the request body is over {MAX_BODY} bytes")
        if not msg.get("more_body"):
            return bytes(body)


Route = Callable[[GatewayApp, ASGIReceiveCallable, ASGISendCallable, str, Scope], Awaitable[None]]
_ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/metrics"): GatewayApp.metrics,
    ("GET", "/api/tags"): GatewayApp.tags,
    ("GET", "/api/ps"): GatewayApp.ps,
    ("GET", "/api/version"): GatewayApp.version,
    ("GET", "/v1/models"): GatewayApp.models,
    ("POST", "/api/chat"): GatewayApp.generate,
    ("POST", "/api/generate"): GatewayApp.generate,
    ("POST", "/v1/chat/completions"): GatewayApp.generate,
    ("POST", "/v1/completions"): GatewayApp.generate,
}

__all__ = ["GatewayApp", "__version__"]
