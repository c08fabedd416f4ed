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

The gateway app accepts the socket (path and API key checked); :func:`serve_chat_socket` serves
it. Failover is the HTTP endpoints' (:func:`~tensord.gateway.upstream._try_backends`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable

from .backends import Backend, Backends
from .encoders import LineSplitter, carries_output
from .http_client import UpstreamError
from .record import _Record, _report
from .upstream import MAX_LINE, _attempt_failed, _error_text, _try_backends

WS_ENDPOINT = "/v1/ws"
Json = dict[str, Any]
Say = Callable[[Json], Awaitable[None]]
RequestId = str | int


async def serve_chat_socket(
    backends: Backends, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """Serve the chat requests of one accepted WebSocket until its client goes away."""
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
                    await say(_ws_error(None, "bad_message", "a cancel needs the request's 'id'"))
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
            nursery.start_soon(_ws_chat, backends, rid, msg, say, cancel, running, received)


async def _ws_chat(
    backends: Backends,
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
            final = await _ws_serve(backends, rid, msg, say, record)
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


async def _ws_serve(
    backends: Backends, rid: RequestId, msg: Json, say: Say, record: _Record
) -> Json:
    """Failover as for HTTP, tokens as messages; the final message (done or error)."""
    model = msg.get("model")
    if not isinstance(model, str) or not model:
        record.outcome = "bad_request"
        return _ws_error(rid, "bad_request", "the request has no 'model'")
    body = {k: v for k, v in msg.items() if k not in ("type", "id")} | {"stream": True}
    final: list[Json] = []

    async def attempt(backend: Backend) -> tuple[int, str] | None:
        result = await _ws_relay(backends, rid, backend, body, say, record)
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

    outcome = await _try_backends(backends, model, record, attempt)
    if outcome is None:
        return final[0]
    if outcome == "busy":
        return _ws_error(rid, "busy", f"every backend with {model!r} is busy; retry shortly")
    status, problem = outcome
    code = {400: "bad_request", 404: "no_backend"}.get(status, "backend_error")
    record.outcome = "no_backend" if code == "backend_error" else code
    return _ws_error(rid, code, problem)


async def _ws_relay(
    backends: Backends, rid: RequestId, backend: Backend, body: Json, say: Say, record: _Record
) -> Json | tuple[int, str]:
    """Stream one backend's ``/api/chat`` as token messages: the ``done`` message, or
    ``(status, problem)`` if the backend failed."""
    try:
        async with backends.upstream.post(
            f"{backend.url}/api/chat", json.dumps(body).encode()
        ) as r:
            if r.status != 200:
                text = (await r.read(500)).decode("utf-8", "replace")
                return r.status, _error_text(text) or f"HTTP {r.status}"
            splitter = LineSplitter(MAX_LINE)
            async for chunk in r.chunks():
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
    except (UpstreamError, ValueError) as exc:
        return 502, f"the backend failed: {exc}"
    return 502, "the backend ended the stream early"


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
