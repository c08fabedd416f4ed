"""Small ASGI helpers shared by the control API and the token gateway."""

from __future__ import annotations

import json

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable

Headers = list[tuple[bytes, bytes]]


async def lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Answer the server's lifespan events (neither app has start-up work of its own)."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def send_body(
    send: ASGISendCallable, status: int, body: bytes, content_type: bytes, headers: Headers
) -> None:
    """A whole (non-streamed) reply."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(
    send: ASGISendCallable, status: int, doc: object, headers: Headers | None = None
) -> None:
    await send_body(send, status, json.dumps(doc).encode(), b"application/json", headers or [])


__all__ = ["Headers", "lifespan", "send_body", "send_json"]
