"""The gateway's HTTP API: Ollama's and OpenAI's endpoints, relayed from the cluster's Ollama nodes.

One hop, one serialization, no buffering: a streaming request is forwarded to a backend's own
endpoint (``/api/chat`` for Ollama clients, ``/v1/chat/completions`` for OpenAI clients) and every
line the backend writes - an NDJSON object or an SSE field - is passed to the client the moment
it is complete, as the backend wrote it. What the gateway adds is around the stream, not in it:

* a backend that fails before the first byte of its reply is tried no more for this request and
  the next eligible one is used; when none is left the client gets a proper HTTP error;
* a backend that fails mid-stream ends the stream with an error event (``data: {"error": ...}``
  for SSE, an ``{"error": ...}`` line for NDJSON) - the client never waits on a dead stream;
* while a slow model has produced nothing yet, SSE clients get ``: keep-alive`` comments;
* a client that goes away cancels the upstream request at once (its ``http.disconnect`` is
  watched alongside the relay).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from .. import metrics
from .._version import __version__
from ..asgi import Headers, lifespan, send_json
from .backends import Backend, Backends, Busy, NoBackend
from .encoders import KEEPALIVE, LineSplitter, openai_error, sse

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
    ) -> None:
        self.backends = backends
        self.client = backends.client
        self.keepalive = keepalive_seconds
        self.api_keys = api_keys

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
        method, path = scope["method"], scope["path"].rstrip("/")
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
        except Exception:
            log.exception("gateway: %s %s failed", method, path)
            await _json(send, 500, {"error": "internal error: see the gateway's log"})

    def _authorized(self, scope: Scope) -> bool:
        headers: Any = scope.get("headers", [])
        for name, value in headers:
            if name.lower() == b"authorization":
                scheme, _, key = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and any(
                    hmac.compare_digest(key.strip(), k) for k in self.api_keys or ()
                )
        return False

    # -- WebSocket ---------------------------------------------------------------------------

    async def websocket(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """``/v1/ws``: chat requests in, ``token`` / ``done`` / ``error`` messages out.

        Several requests may run at once on one socket, each named by the ``id`` its request
        carried (or a number the gateway gives it); ``{"type": "cancel", "id": ...}`` stops one.
        The socket is usable as soon as the handshake completes.
        """
        if (await receive())["type"] != "websocket.connect":
            return
        path: Any = scope.get("path", "")
        if str(path).rstrip("/") != "/v1/ws" or (
            self.api_keys is not None and not self._authorized(scope)
        ):
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
            return
        await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        lock = trio.Lock()
        running: dict[str, trio.CancelScope] = {}
        counter = 0

        async def say(msg: Json) -> None:
            async with lock:
                await send({"type": "websocket.send", "text": json.dumps(msg), "bytes": None})

        async with trio.open_nursery() as nursery:
            while True:
                event = await receive()
                if event["type"] == "websocket.disconnect":
                    nursery.cancel_scope.cancel()
                    return
                raw: Any = event.get("text") or event.get("bytes") or b""
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                try:
                    msg = json.loads(text)
                    if not isinstance(msg, dict):
                        raise ValueError("expected a JSON object")
                except ValueError as exc:
                    await say({"type": "error", "id": None, "error": f"bad message: {exc}"})
                    continue
                counter += 1
                rid = str(msg.get("id") or counter)
                if msg.get("type") == "cancel":
                    scope_ = running.get(rid)
                    if scope_ is not None:
                        scope_.cancel()
                    continue
                cancel = trio.CancelScope()
                running[rid] = cancel
                nursery.start_soon(self._ws_chat, rid, msg, say, cancel, running)

    async def _ws_chat(
        self,
        rid: str,
        msg: Json,
        say: Callable[[Json], Awaitable[None]],
        cancel: trio.CancelScope,
        running: dict[str, trio.CancelScope],
    ) -> None:
        """One chat request of a WebSocket: failover as for HTTP, tokens as messages."""

        async def error(text: str) -> None:
            await say({"type": "error", "id": rid, "error": text})

        model = msg.get("model")
        body = {k: v for k, v in msg.items() if k not in ("type", "id")} | {"stream": True}
        sent = [0]
        try:
            with cancel:
                if not isinstance(model, str):
                    await error("the request has no 'model'")
                    return
                tried: set[str] = set()
                while True:
                    try:
                        async with self.backends.acquire(model, tried) as backend:
                            tried.add(backend.node_id)
                            problem = await self._ws_relay(rid, backend, body, say, sent)
                    except NoBackend:
                        await error(f"no healthy backend has the model {model!r}")
                        return
                    except Busy:
                        await error(f"every backend with {model!r} is busy; retry shortly")
                        return
                    if problem is None:
                        return
                    if sent[0] or len(tried) >= len(self.backends.candidates(model)):
                        await error(problem)
                        return
            if cancel.cancelled_caught:
                await say({"type": "cancelled", "id": rid, "tokens": sent[0]})
        finally:
            running.pop(rid, None)

    async def _ws_relay(
        self,
        rid: str,
        backend: Backend,
        body: Json,
        say: Callable[[Json], Awaitable[None]],
        sent: list[int],
    ) -> str | None:
        """Stream one backend's ``/api/chat`` as token messages; the problem, if it failed."""
        started = time.perf_counter()
        ttft: float | None = None
        try:
            async with self.client.stream("POST", f"{backend.url}/api/chat", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread())[:500].decode("utf-8", "replace")
                    return _error_text(text) or f"HTTP {r.status_code}"
                splitter = LineSplitter()
                async for chunk in r.aiter_raw():
                    for line in splitter.feed(chunk):
                        if not line.strip():
                            continue
                        obj = json.loads(line)
                        content = (obj.get("message") or {}).get("content", "")
                        if content:
                            if ttft is None:
                                ttft = time.perf_counter() - started
                            sent[0] += 1
                            await say({"type": "token", "id": rid, "content": content})
                        if obj.get("done"):
                            await say(_ws_done(rid, obj, ttft, started))
                            return None
        except (httpx.HTTPError, ValueError) as exc:
            return f"the backend failed: {exc}"
        return "the backend ended the stream early"

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
        versions = sorted({b.version for b in self.backends.healthy() if b.version})
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
        openai = path.startswith("/v1/")
        fail = _openai_fail if openai else _ollama_fail
        try:
            body = await _read_body(receive)
            request = json.loads(body)
            if not isinstance(request, dict) or not isinstance(request.get("model"), str):
                raise ValueError("expected a JSON object with a 'model'")
        except ValueError as exc:
            await fail(send, 400, f"bad request: {exc}")
            return
        model = request["model"]
        stream = bool(request.get("stream", not openai))  # Ollama streams by default
        tried: set[str] = set()
        last_error = f"no healthy backend has the model {model!r}"
        status = 404
        while True:
            try:
                async with self.backends.acquire(model, tried) as backend:
                    tried.add(backend.node_id)
                    outcome = await self._relay(
                        backend, path, body, stream, openai, receive, send, model
                    )
                    if outcome is None:
                        return  # relayed (or the client went away)
                    status, last_error = outcome
            except NoBackend:
                break
            except Busy:
                metrics.GATEWAY_REQUESTS.labels(path, "", "busy").inc()
                await fail(send, 503, f"every backend with {model!r} is busy; retry shortly",
                           headers=[(b"retry-after", b"1")])  # fmt: skip
                return
        metrics.GATEWAY_REQUESTS.labels(path, "", "no_backend").inc()
        await fail(send, status if status in (400, 404) else 502, last_error)

    async def _relay(
        self,
        backend: Backend,
        path: str,
        body: bytes,
        stream: bool,
        openai: bool,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        model: str,
    ) -> tuple[int, str] | None:
        """Relay one backend's reply. Returns ``(status, error)`` if it failed before the reply
        started (the caller tries the next backend), ``None`` once the reply was relayed."""
        url = f"{backend.url}{path}"
        started = time.perf_counter()
        request = self.client.build_request(
            "POST", url, content=body, headers={"content-type": "application/json"}
        )
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            metrics.GATEWAY_REQUESTS.labels(path, backend.node_id, "backend_error").inc()
            backend.last_error = str(exc)
            log.warning("gateway: %s failed before replying: %s", backend.node_id, exc)
            return 502, f"backend {backend.node_id} failed: {exc}"
        try:
            if upstream.status_code != 200:
                metrics.GATEWAY_REQUESTS.labels(path, backend.node_id, "backend_error").inc()
                text = (await upstream.aread())[:500].decode("utf-8", "replace")
                return upstream.status_code, _error_text(text) or f"HTTP {upstream.status_code}"
            ctype = upstream.headers.get("content-type", "application/json")
            headers = [(b"content-type", ctype.encode())]
            if stream:
                headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            gauge = metrics.GATEWAY_IN_FLIGHT.labels(backend.node_id)
            gauge.inc()
            try:
                stats = await self._pump(upstream, send, receive, stream and openai, openai)
            finally:
                gauge.dec()
        finally:
            await upstream.aclose()
        ttft, gaps, tokens = stats
        took = time.perf_counter() - started
        metrics.GATEWAY_REQUESTS.labels(path, backend.node_id, "ok").inc()
        metrics.GATEWAY_TOKENS.labels(backend.node_id).inc(tokens)
        if ttft is not None:
            metrics.GATEWAY_TTFT.labels(path).observe(ttft)
        inter = metrics.GATEWAY_INTER_TOKEN.labels(path)
        for gap in gaps:
            inter.observe(gap)
        if tokens:
            gaps.sort()
            log.info(
                "gateway: %s %s via %s: ttft %.1f ms, %d chunks, inter-token mean %.2f ms "
                "p99 %.2f ms, %.1f chunks/s",
                path, model, backend.node_id, (ttft or 0) * 1e3, tokens,
                (sum(gaps) / len(gaps) * 1e3) if gaps else 0.0,
                (gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] * 1e3) if gaps else 0.0,
                tokens / took if took > 0 else 0.0,
            )  # fmt: skip
        return None

    async def _pump(
        self,
        upstream: httpx.Response,
        send: ASGISendCallable,
        receive: ASGIReceiveCallable,
        keepalive: bool,
        openai: bool,
    ) -> tuple[float | None, list[float], int]:
        """Copy ``upstream`` to the client line by line until it ends, the client leaves, or the
        backend fails (then an error event ends the stream)."""
        splitter = LineSplitter()
        ttft: float | None = None
        gaps: list[float] = []
        lines = 0
        t0 = last = time.perf_counter()

        async with trio.open_nursery() as nursery:

            async def watch_client() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                log.info("gateway: the client went away; cancelling the upstream request")
                nursery.cancel_scope.cancel()

            async def keep_alive() -> None:
                while True:
                    await trio.sleep(self.keepalive)
                    await send({"type": "http.response.body", "body": KEEPALIVE,
                                "more_body": True})  # fmt: skip

            nursery.start_soon(watch_client)
            waiting = trio.CancelScope()
            if keepalive:

                async def keep_alive_until_first() -> None:
                    with waiting:
                        await keep_alive()

                nursery.start_soon(keep_alive_until_first)
            try:
                async for chunk in upstream.aiter_raw():
                    out = bytearray()
                    for line in splitter.feed(chunk):
                        out += line + b"\n"
                        if line.strip():
                            now = time.perf_counter()
                            if ttft is None:
                                ttft = now - t0
                                waiting.cancel()
                            else:
                                gaps.append(now - last)
                            last = now
                            lines += 1
                    if out:
                        await send({"type": "http.response.body", "body": bytes(out),
                                    "more_body": True})  # fmt: skip
                tail = splitter.close()
                end = b"".join(t + b"\n" for t in tail)
                await send({"type": "http.response.body", "body": end, "more_body": False})
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("gateway: backend failed mid-stream: %s", exc)
                error = (
                    sse(openai_error(f"the backend failed mid-stream: {exc}"))
                    if openai
                    else json.dumps({"error": f"the backend failed mid-stream: {exc}"}).encode()
                    + b"\n"
                )
                await send({"type": "http.response.body", "body": error, "more_body": False})
            nursery.cancel_scope.cancel()
        return ttft, gaps, lines


def _ws_done(rid: str, obj: Json, ttft: float | None, started: float) -> Json:
    prompt = int(obj.get("prompt_eval_count") or 0)
    completion = int(obj.get("eval_count") or 0)
    total = time.perf_counter() - started
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


async def _read_body(receive: ASGIReceiveCallable) -> bytes:
    body = bytearray()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ValueError("the client went away")
        chunk: Any = msg.get("body", b"")
        body += chunk
        if len(body) > MAX_BODY:
            raise ValueError(f"the request body is over {MAX_BODY} bytes")
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
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "server_error"}.get(
        status, "server_error"
    )
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
