"""The HTTP reply to one generation request, and the error replies in Ollama's and OpenAI's forms.

A reply is started exactly once - by the first backend line relayed, a keep-alive comment or an
error - so an error is an HTTP status while nothing was sent, and an error event that ends the
stream once something was.
"""

from __future__ import annotations

import json

import trio
from hypercorn.typing import ASGISendCallable

from ..asgi import Headers, send_json
from .encoders import KEEPALIVE, openai_error, sse
from .record import _Record, _report
from .relay import BodyWriter


class _Reply:
    """The HTTP reply to one generation request, started exactly once: by the first backend
    reply relayed, by the first keep-alive comment, or by an error.

    Keep-alive comments (SSE only) run in their own task until the first line is relayed; sends
    that could race with them take ``lock``, so a comment never lands after the end of the reply.
    """

    def __init__(
        self,
        send: ASGISendCallable,
        record: _Record,
        *,
        openai: bool,
        keepalive: bool,
        writer: BodyWriter | None = None,
    ) -> None:
        self.send = send
        #: The server's direct writer for the reply's pieces, when it has one (:mod:`.relay`).
        self.writer = writer
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
        if self.keeping_alive:
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
