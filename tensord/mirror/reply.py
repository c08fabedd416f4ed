"""One mirror response: started once, a body sent in slices of a memory map, or cut short.

A blob's bytes are handed to hypercorn as ``memoryview`` slices of a read-only ``mmap`` of its
file, ``CHUNK`` at a time: the file is never read into memory, and the only copy in Python is
hypercorn's ``bytes()`` of each slice as it hands it to the socket (hypercorn has no file-body
extension).

Once the headers are out, an error can only be said by cutting the body short - and it must be
*seen* as cut: a response that just stops leaves the client waiting for bytes that never come
(hypercorn keeps a connection whose response is unfinished open). So the server puts a callable
under :data:`ABORT` in the scope's extensions that drops the connection; the client sees the
connection close before ``Content-Length`` bytes, an error every HTTP client reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

from hypercorn.typing import ASGISendCallable, ASGISendEvent

from ..asgi import Headers
from .protocol import MirrorError

log = logging.getLogger("tensord.mirror")

#: The slice of a blob handed to the server at a time.
CHUNK = 1 << 20
#: The scope extension holding the callable that drops the connection.
ABORT = "tensord.abort"
_API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")


class Reply:
    """One response, started once; a HEAD request's carries the headers and no body."""

    def __init__(
        self, send: ASGISendCallable, *, head: bool, abort: Callable[[], None] | None = None
    ) -> None:
        self.send = send
        self.head = head
        self.abort = abort
        self.started = False
        self.ended = False  # the last byte is on its way: a disconnect now is the normal end

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        await self.send(
            {"type": "http.response.start", "status": status, "headers": [_API_VERSION, *headers]}
        )

    async def end(self, body: bytes = b"") -> None:
        self.ended = True
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def whole(self, status: int, body: bytes, headers: Headers) -> None:
        await self.start(status, [*headers, (b"content-length", str(len(body)).encode())])
        await self.end(b"" if self.head else body)

    async def slices(self, view: memoryview, start: int, end: int) -> None:
        """Bytes ``[start, end)`` of ``view`` (a map of the blob's file), the body going on."""
        for offset in range(start, end, CHUNK):
            with view[offset : min(offset + CHUNK, end)] as chunk:
                # hypercorn takes any buffer (it makes bytes of it): no copy here.
                event = {"type": "http.response.body", "body": chunk, "more_body": True}
                await self.send(cast(ASGISendEvent, event))

    async def error(self, exc: MirrorError) -> None:
        if self.started:
            # Headers are out: all that can be said is that the body is cut short.
            log.warning("mirror: reply cut short: %s", exc.message)
            if self.abort is not None:
                self.abort()
            return
        if exc.status >= 500:
            log.warning("mirror: %s %s", exc.code, exc.message)
        headers: Headers = [(b"content-type", b"application/json"), *exc.headers]
        if exc.status == 401:
            headers.append((b"www-authenticate", b'Basic realm="tensord mirror"'))
        await self.whole(exc.status, exc.body(), headers)


__all__ = ["ABORT", "CHUNK", "Reply"]
