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
* one log line and the metrics per request (:class:`_Record`).

``/v1/ws`` carries the same chat requests over a WebSocket, several at once (:meth:`websocket`).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from .. import metrics
from .._version import __version__
from ..asgi import Headers, lifespan, send_json
from ..boundary import report_unexpected
from ..control.serving import RequestTimeout
from .backends import Backend, Backends, Busy, NoBackend
from .encoders import (
    ERROR,
    KEEPALIVE,
    TOKEN,
    LineSplitter,
    carries_output,
    line_kind,
    openai_error,
    reply_tokens,
    sse,
)

log = logging.getLogger("tensord.gateway")

MAX_BODY = 8 << 20
#: The longest line relayed (and the largest whole reply whose token count is read): Ollama's
#: final ``/api/generate`` object carries the context's token ids, which can run to megabytes.
MAX_LINE = 64 << 20
WS_ENDPOINT = "/v1/ws"
Json = dict[str, Any]
Say = Callable[[Json], Awaitable[None]]
RequestId = str | int


@dataclass
class _Record:
    """One generation request as its log line and the metrics see it."""

    endpoint: str
    model: str
    received: float  # time.perf_counter() when the gateway had the request
    streamed: bool = True
    backend: str = ""  # the backend that relayed it ("" if none did)
    #: ok, client_gone, cancelled (WebSocket), backend_error, no_backend, busy, bad_request;
    #: it stays client_gone when the request is cancelled because its client left.
    outcome: str = "client_gone"
    tokens: int = 0  # token chunks relayed (a whole reply: the completion tokens it reports)
    first: float | None = None
    last: float = 0.0
    gaps: list[float] = field(default_factory=list)
    reported: bool = False

    def token(self, now: float | None = None) -> None:
        """One token chunk relayed (at ``now``, the time it arrived from the backend)."""
        now = time.perf_counter() if now is None else now
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now
        self.tokens += 1

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.received

    def line(self, took: float) -> str:
        """The log line's fields, ``key=value`` (logfmt)."""
        gaps = sorted(self.gaps)
        mean = sum(gaps) / len(gaps) if gaps else None
        p99 = gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] if gaps else None
        fields = (
            ("endpoint", self.endpoint),
            ("model", self.model),
            ("backend", self.backend or "-"),
            ("outcome", self.outcome),
            ("stream", "true" if self.streamed else "false"),
            ("tokens", str(self.tokens)),
            ("ttft_ms", _ms(self.ttft)),
            ("inter_token_mean_ms", _ms(mean, 2)),
            ("inter_token_p99_ms", _ms(p99, 2)),
            ("tokens_per_s", f"{self.tokens / took:.1f}" if took > 0 else "-"),
            ("duration_ms", _ms(took)),
        )
        return " ".join(f"{k}={_logfmt(v)}" for k, v in fields)


def _ms(seconds: float | None, digits: int = 1) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.{digits}f}"


_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+\-]+")


def _logfmt(value: str) -> str:
    """A value as is when it is plain, else JSON-quoted (no spaces or newlines from clients)."""
    return value if _PLAIN.fullmatch(value) else json.dumps(value)


def _report(record: _Record) -> None:
    """The request's metrics and its log line, once: just before the reply's last byte is sent
    (so a client that has read it sees the metrics counted), or when the request ends."""
    if record.reported:
        return
    record.reported = True
    took = time.perf_counter() - record.received
    metrics.GATEWAY_REQUESTS.labels(record.endpoint, record.backend, record.outcome).inc()
    if record.backend:
        metrics.GATEWAY_TOKENS.labels(record.backend).inc(record.tokens)
    ttft = record.ttft
    if ttft is not None:
        metrics.GATEWAY_TTFT.labels(record.endpoint).observe(ttft)
    if record.gaps:
        inter = metrics.GATEWAY_INTER_TOKEN.labels(record.endpoint)
        for gap in record.gaps:
            inter.observe(gap)
    if log.isEnabledFor(logging.INFO):
        log.info("gateway request: %s", record.line(took))


class _Reply:
    """The HTTP reply to one generation request, started exactly once: by the first backend
    reply relayed, by the first keep-alive comment, or by an error.

    Keep-alive comments (SSE only) run in their own task until the first line is relayed; sends
    that could race with them take ``lock``, so a comment never lands after the end of the reply.
    """

    def __init__(
        self, send: ASGISendCallable, record: _Record, *, openai: bool, keepalive: bool
    ) -> None:
        self.send = send
        self.record = record
        self.openai = openai
        self.stream = record.streamed
        self.started = False
        self.ended = False  # the last byte is on its way: a disconnect now is the normal end
        self.lock = trio.Lock()
        self.waiting = trio.CancelScope()  # the keep-alive task, until the first line
        self.keeping_alive = keepalive  # set before the task starts: it may start late

    async def keep_alive(self, interval: float) -> None:
        with self.waiting:
            while True:
                await trio.sleep(interval)
                async with self.lock:
                    await self._start(b"text/event-stream")
                    await self.send({"type": "http.response.body", "body": KEEPALIVE,
                                     "more_body": True})  # fmt: skip

    async def _stop_keepalive(self) -> None:
        if self.keeping_alive:
            async with self.lock:
                self.waiting.cancel()
                self.keeping_alive = False

    async def _start(self, content_type: bytes) -> None:
        if self.started:
            return
        self.started = True
        headers = [(b"content-type", content_type)]
        if self.stream:
            headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})

    async def start(self, content_type: bytes) -> None:
        """Start the reply with the backend's content type (unless a keep-alive did)."""
        async with self.lock:
            await self._start(content_type)

    async def body(self, data: bytes, *, more: bool = True) -> None:
        await self._stop_keepalive()
        if not more:
            self.ended = True
            _report(self.record)
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def fail(self, status: int, message: str, headers: Headers | None = None) -> None:
        """An HTTP error if the reply has not started, else an error event that ends it."""
        await self._stop_keepalive()
        if not self.started:
            self.started = self.ended = True
            _report(self.record)
            fail = _openai_fail if self.openai else _ollama_fail
            await fail(self.send, status, message, headers)
        else:
            await self.body(_error_event(message, openai=self.openai), more=False)


def _error_event(message: str, *, openai: bool) -> bytes:
    if openai:
        return sse(openai_error(message))
    return json.dumps({"error": message}).encode() + b"\n"


class GatewayApp:
    def __init__(
        self,
        backends: Backends,
        *,
        keepalive_seconds: float = 15.0,
        api_keys: set[str] | None = None,
    ) -> None:
        self.backends = backends
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
        try:
            await route(self, receive, send, path)
        except Exception as exc:
            report_unexpected(log, "gateway", f"gateway request {method} {path}", exc)
            await _json(send, 500, {"error": "internal error: see the gateway's log"})

    def _authorized(self, scope: Scope) -> bool:
        headers: Any = scope.get("headers", [])
        for name, value in headers:
            if name.lower() == b"authorization":
                scheme, _, key = bytes(value).partition(b" ")
                key = key.strip()
                # Every key is compared, so the time taken says nothing about which one matched.
                matches = [hmac.compare_digest(key, k) for k in self._keys]
                return scheme.lower() == b"bearer" and any(matches)
        return False

    # -- WebSocket ---------------------------------------------------------------------------

    async def websocket(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """``/v1/ws``: chat requests in; ``token``, ``done``, ``cancelled``, ``error`` out.

        Each request is a JSON object with ``model`` and ``messages`` as for Ollama's
        ``/api/chat``, optionally ``"type": "chat"`` and an ``id`` (a string or an integer,
        echoed in every message about the request; without one the n-th such request on the
        socket is ``"n"``). Several may run at once; ``{"type": "cancel", "id": ...}`` stops one.
        Every request ends with exactly one ``done``, ``cancelled`` or ``error`` message. An
        ``error`` about a message that started nothing (not JSON, an unknown ``type``, an ``id``
        already running) leaves every running request alone; the socket stays usable.

        The socket is usable as soon as the handshake completes. Messages are sent one at a
        time as the backends produce them: a client that reads slowly slows its own requests'
        upstream reads (TCP backpressure), nothing is queued without bound.
        """
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
        lock = trio.Lock()
        running: dict[RequestId, trio.CancelScope] = {}
        counter = 0

        async def say(msg: Json) -> None:
            async with lock:
                await send({"type": "websocket.send", "text": json.dumps(msg), "bytes": None})

        async with trio.open_nursery() as nursery:
            while True:
                event = await receive()
                if event["type"] == "websocket.disconnect":
                    nursery.cancel_scope.cancel()  # every running request: upstream cancelled
                    return
                if event["type"] != "websocket.receive":
                    continue
                received = time.perf_counter()
                try:
                    msg = _ws_message(event)
                except ValueError as exc:
                    await say(_ws_error(None, "bad_message", f"bad message: {exc}"))
                    continue
                kind = msg.get("type", "chat")
                rid: RequestId | None = msg.get("id")
                if rid is not None and not _valid_id(rid):
                    problem = "'id' must be a non-empty string or an integer"
                    await say(_ws_error(None, "bad_message", problem))
                    continue
                if kind == "cancel":
                    if rid is None:
                        await say(
                            _ws_error(None, "bad_message", "a cancel needs the request's 'id'")
                        )
                    elif (scope_ := running.get(rid)) is not None:
                        scope_.cancel()
                    continue  # a cancel for a request that has ended is not an error: it raced
                if kind != "chat":
                    problem = f"unknown message type {kind!r}: expected 'chat' or 'cancel'"
                    await say(_ws_error(rid, "unknown_type", problem))
                    continue
                if rid is None:
                    counter += 1
                    rid = str(counter)
                if rid in running:
                    problem = f"a request with id {rid!r} is still running on this socket"
                    await say(_ws_error(rid, "duplicate_id", problem))
                    continue
                cancel = trio.CancelScope()
                running[rid] = cancel
                nursery.start_soon(self._ws_chat, rid, msg, say, cancel, running, received)

    async def _ws_chat(
        self,
        rid: RequestId,
        msg: Json,
        say: Say,
        cancel: trio.CancelScope,
        running: dict[RequestId, trio.CancelScope],
        received: float,
    ) -> None:
        """One request of a WebSocket, to its one final message (sent outside ``cancel``, so a
        cancel that races the end cannot make a request end twice)."""
        model = msg.get("model")
        record = _Record(WS_ENDPOINT, model if isinstance(model, str) else "-", received)
        try:
            final: Json | None = None
            with cancel:
                final = await self._ws_serve(rid, msg, say, record)
            if final is None:  # cancelled by the client's cancel message
                record.outcome = "cancelled"
                final = {"type": "cancelled", "id": rid, "tokens": record.tokens}
            if running.get(rid) is cancel:
                del running[rid]  # before the final message: the client may reuse the id at once
            _report(record)
            await say(final)
        finally:
            if running.get(rid) is cancel:
                del running[rid]
            _report(record)

    async def _ws_serve(self, rid: RequestId, msg: Json, say: Say, record: _Record) -> Json:
        """Failover as for HTTP, tokens as messages; the final message (done or error)."""
        model = msg.get("model")
        if not isinstance(model, str) or not model:
            record.outcome = "bad_request"
            return _ws_error(rid, "bad_request", "the request has no 'model'")
        body = {k: v for k, v in msg.items() if k not in ("type", "id")} | {"stream": True}
        final: list[Json] = []

        async def attempt(backend: Backend) -> tuple[int, str] | None:
            result = await self._ws_relay(rid, backend, body, say, record)
            if isinstance(result, dict):
                record.outcome = "ok"
                final.append(result)
                return None
            status, problem = result
            if record.tokens:  # mid-stream: the client has part of a reply, no failover
                record.outcome = "backend_error"
                final.append(
                    _ws_error(rid, "backend_error", f"the backend failed mid-stream: {problem}")
                )
                return None
            if status != 400:
                _attempt_failed(WS_ENDPOINT, backend, problem)
            return result

        outcome = await self._try_backends(model, record, attempt)
        if outcome is None:
            return final[0]
        if outcome == "busy":
            return _ws_error(rid, "busy", f"every backend with {model!r} is busy; retry shortly")
        status, problem = outcome
        code = {400: "bad_request", 404: "no_backend"}.get(status, "backend_error")
        record.outcome = "no_backend" if code == "backend_error" else code
        return _ws_error(rid, code, problem)

    async def _try_backends(
        self,
        model: str,
        record: _Record,
        attempt: Callable[[Backend], Awaitable[tuple[int, str] | None]],
    ) -> tuple[int, str] | Literal["busy"] | None:
        """Failover, for HTTP and WebSocket alike: run ``attempt`` on the healthy backends that
        have ``model`` (least busy first) until one returns ``None`` (done) or a 400 says the
        request itself is wrong. Returns ``None``, ``"busy"`` (every one at its limit), or the
        last ``(status, problem)`` when none is left."""
        tried: set[str] = set()
        status, problem = 404, f"no healthy backend has the model {model!r}"
        while True:
            try:
                async with self.backends.acquire(model, tried) as backend:
                    tried.add(backend.node_id)
                    record.backend = backend.node_id
                    failed = await attempt(backend)
            except NoBackend:
                break
            except Busy:
                record.backend, record.outcome = "", "busy"
                return "busy"
            if failed is None:
                return None
            status, problem = failed
            if status == 400:
                break  # the request itself is wrong: no other backend would take it
        record.backend = ""
        return status, problem

    async def _ws_relay(
        self, rid: RequestId, backend: Backend, body: Json, say: Say, record: _Record
    ) -> Json | tuple[int, str]:
        """Stream one backend's ``/api/chat`` as token messages: the ``done`` message, or
        ``(status, problem)`` if the backend failed."""
        try:
            async with self.client.stream("POST", f"{backend.url}/api/chat", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread())[:500].decode("utf-8", "replace")
                    return r.status_code, _error_text(text) or f"HTTP {r.status_code}"
                splitter = LineSplitter(MAX_LINE)
                async for chunk in r.aiter_raw():
                    for line in splitter.feed(chunk):
                        if not line.strip():
                            continue
                        obj = json.loads(line)
                        if not isinstance(obj, dict):
                            continue
                        if "error" in obj:
                            return 502, _error_text(line.decode("utf-8", "replace"))
                        if carries_output(obj):
                            now = time.perf_counter()
                            await say(_ws_token(rid, obj))
                            record.token(now)  # once sent: a cancel's count is what was sent
                        if obj.get("done") is True:
                            return _ws_done(rid, obj, record)
        except (httpx.HTTPError, ValueError) as exc:
            return 502, f"the backend failed: {exc}"
        return 502, "the backend ended the stream early"

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
        self, receive: ASGIReceiveCallable, send: ASGISendCallable, path: str
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

    async def tags(self, receive: ASGIReceiveCallable, send: ASGISendCallable, path: str) -> None:
        seen: dict[str, Json] = {}
        for doc in await self._gather("/api/tags"):
            for m in doc.get("models", []):
                seen.setdefault(str(m.get("name")), m)
        await _json(send, 200, {"models": [seen[k] for k in sorted(seen)]})

    async def ps(self, receive: ASGIReceiveCallable, send: ASGISendCallable, path: str) -> None:
        models = [m for doc in await self._gather("/api/ps") for m in doc.get("models", [])]
        await _json(send, 200, {"models": models})

    async def version(
        self, receive: ASGIReceiveCallable, send: ASGISendCallable, path: str
    ) -> None:
        # The oldest: a client that checks the version for a feature gets one every backend has.
        versions = sorted({b.version for b in self.backends.healthy() if b.version}, key=_version)
        await _json(send, 200, {"version": versions[0] if versions else "0.0.0"})

    async def models(self, receive: ASGIReceiveCallable, send: ASGISendCallable, path: str) -> None:
        seen: dict[str, Json] = {}
        for doc in await self._gather("/v1/models"):
            for m in doc.get("data", []):
                seen.setdefault(str(m.get("id")), m)
        await _json(send, 200, {"object": "list", "data": [seen[k] for k in sorted(seen)]})

    # -- generation --------------------------------------------------------------------------

    async def generate(
        self, receive: ASGIReceiveCallable, send: ASGISendCallable, path: str
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
        reply = _Reply(send, record, openai=openai, keepalive=stream and openai)
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
        outcome = await self._try_backends(
            model, record, lambda backend: self._relay(backend, path, body, reply, record)
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
        request = self.client.build_request(
            "POST", f"{backend.url}{path}", content=body,
            headers={"content-type": "application/json"},
        )  # fmt: skip
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            _attempt_failed(path, backend, str(exc))
            return 502, f"backend {backend.node_id} failed: {exc}"
        try:
            if upstream.status_code != 200:
                text = (await upstream.aread())[:500].decode("utf-8", "replace")
                if upstream.status_code != 400:
                    _attempt_failed(path, backend, f"HTTP {upstream.status_code}")
                return upstream.status_code, _error_text(text) or f"HTTP {upstream.status_code}"
            await reply.start(upstream.headers.get("content-type", "application/json").encode())
            await self._pump(upstream, reply, record, sse=reply.openai)
        finally:
            await upstream.aclose()
        return None

    async def _pump(
        self, upstream: httpx.Response, reply: _Reply, record: _Record, *, sse: bool
    ) -> None:
        """Copy ``upstream`` to the client until it ends or the backend fails (then an error
        event ends the stream), and set the request's outcome. A stream goes line by line, each
        line counted as it passes (:func:`line_kind`); a whole reply goes as it comes."""
        outcome = "ok"
        open_event = False  # an SSE event's lines were relayed, not yet its blank line
        try:
            if not reply.stream:
                whole = bytearray()
                async for chunk in upstream.aiter_raw():
                    if len(whole) <= MAX_LINE:
                        whole += chunk
                    await reply.body(chunk)
                record.tokens = reply_tokens(bytes(whole))
                record.outcome = outcome
                await reply.body(b"", more=False)
                return
            splitter = LineSplitter(MAX_LINE)
            async for chunk in upstream.aiter_raw():
                lines = splitter.feed(chunk)
                if not lines:
                    continue
                for line in lines:
                    kind = line_kind(line, sse)
                    if kind == TOKEN:
                        record.token()
                    elif kind == ERROR:
                        outcome = "backend_error"
                open_event = sse and bool(lines[-1].strip())
                await reply.body(b"\n".join(lines) + b"\n")
            tail = splitter.close()
            for line in tail:
                if line_kind(line, sse) == TOKEN:
                    record.token()
            record.outcome = outcome
            await reply.body(b"".join(t + b"\n" for t in tail), more=False)
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("gateway: backend %s failed mid-stream: %s", record.backend, exc)
            record.outcome = "backend_error"
            if open_event:
                await reply.body(b"\n")  # end the event, so the error is an event of its own
            await reply.fail(502, f"the backend failed mid-stream: {exc}")


def _version(text: str) -> tuple[int, ...]:
    """``0.10.1`` sorts after ``0.9.0`` (as numbers, not as text)."""
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def _attempt_failed(endpoint: str, backend: Backend, problem: str) -> None:
    """A backend failed one attempt (the request may still succeed on another)."""
    metrics.GATEWAY_REQUESTS.labels(endpoint, backend.node_id, "backend_error").inc()
    backend.last_error = problem
    log.warning("gateway: backend %s failed a %s request: %s", backend.node_id, endpoint, problem)


def _valid_id(value: object) -> bool:
    return (isinstance(value, str) and value != "") or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def _ws_message(event: Any) -> Json:
    """A WebSocket message (text or UTF-8 bytes) as a JSON object; ValueError if it is not one."""
    raw: Any = event.get("text")
    if raw is None:
        raw = event.get("bytes") or b""
    text = bytes(raw).decode() if isinstance(raw, bytes | bytearray) else str(raw)
    msg = json.loads(text)
    if not isinstance(msg, dict):
        raise ValueError("expected a JSON object")
    return msg


def _ws_error(rid: RequestId | None, code: str, text: str) -> Json:
    return {"type": "error", "id": rid, "code": code, "error": text}


def _ws_token(rid: RequestId, obj: Json) -> Json:
    """A ``token`` message from one ``/api/chat`` stream object: its content, and its thinking
    and tool calls when it has them."""
    message = obj.get("message")
    message = message if isinstance(message, dict) else {}
    content = message.get("content")
    out: Json = {"type": "token", "id": rid, "content": content if isinstance(content, str) else ""}
    for extra in ("thinking", "tool_calls"):
        if message.get(extra):
            out[extra] = message[extra]
    return out


def _ws_done(rid: RequestId, obj: Json, record: _Record) -> Json:
    prompt = _count(obj.get("prompt_eval_count"))
    completion = _count(obj.get("eval_count"))
    total = time.perf_counter() - record.received
    ttft = record.ttft
    return {
        "type": "done",
        "id": rid,
        "done_reason": obj.get("done_reason"),
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "timings": {
            "ttft_ms": None if ttft is None else ttft * 1e3,
            "total_ms": total * 1e3,
            "tokens_per_s": completion / total if total > 0 else None,
        },
    }


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


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


def _error_text(text: str) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return text.strip()
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", ""))
    return str(err or text).strip()


async def _json(
    send: ASGISendCallable, status: int, doc: object, headers: Headers | None = None
) -> None:
    await send_json(send, status, doc, headers)


async def _ollama_fail(
    send: ASGISendCallable,
    status: int,
    message: str,
    headers: Headers | None = None,
) -> None:
    await _json(send, status, {"error": message}, headers)


async def _openai_fail(
    send: ASGISendCallable,
    status: int,
    message: str,
    headers: Headers | None = None,
) -> None:
    kind = {
        400: "invalid_request_error",
        404: "not_found_error",
        408: "invalid_request_error",
        413: "invalid_request_error",
        503: "server_error",
    }.get(status, "server_error")
    await _json(send, status, openai_error(message, kind), headers)


Route = Callable[[GatewayApp, ASGIReceiveCallable, ASGISendCallable, str], Awaitable[None]]
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
