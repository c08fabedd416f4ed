"""The mirror's ASGI app: ``/v2/``, manifests and blobs, read-only, from the model directory.

A request is answered from the store when it can be; a miss goes to :class:`~.misses.Misses`
(which fetches through the daemon's download manager) and is answered once what it asked for
has landed. A blob is sent from a read-only ``mmap`` of its file in ``CHUNK`` slices: the file
is never read into memory, and the only copy in Python is hypercorn's ``bytes()`` of each chunk
as it hands it to the socket (hypercorn has no file-body extension).

Every request is an error boundary: a malformed or hostile one gets a 4xx in the OCI error
format (:class:`~.protocol.MirrorError`), a bug a logged 500, and the daemon carries on. A
client that goes away cancels its request (a download it started keeps going: the next client
wants it too).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope

from ..asgi import Headers, lifespan, presents_key
from ..boundary import report_unexpected
from .misses import Misses
from .protocol import (
    MirrorError,
    Target,
    Upstream,
    choose_upstream,
    media_type,
    parse_range,
    parse_target,
)
from .store import ModelDir

log = logging.getLogger("tensord.mirror")

#: The slice of a blob handed to the server at a time.
CHUNK = 1 << 20
_API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")


class MirrorApp:
    def __init__(
        self,
        models: ModelDir,
        misses: Misses,
        *,
        upstream: str | None = None,
        api_keys: set[str] | None = None,
    ) -> None:
        self.models = models
        self.misses = misses
        self.upstream = upstream
        self.api_keys = api_keys
        self._keys = [k.encode() for k in api_keys or ()]

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        reply = _Reply(send, head=method == "HEAD")
        try:
            if self.api_keys is not None and not presents_key(scope, self._keys, basic=True):
                raise MirrorError(401, "UNAUTHORIZED", "a valid API key is required")
            if method not in ("GET", "HEAD"):
                raise MirrorError(405, "UNSUPPORTED", "this mirror is read-only (GET and HEAD)")
            target = parse_target(path)
        except MirrorError as exc:
            await reply.error(exc)
            return
        async with trio.open_nursery() as nursery:

            async def watch_client() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not reply.ended:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch_client)
            try:
                await self._serve(scope, target, reply)
            except MirrorError as exc:
                await reply.error(exc)
            except Exception as exc:
                report_unexpected(log, "mirror", f"mirror request {method} {path[:200]}", exc)
                await reply.error(MirrorError(500, "UNKNOWN", "internal error: see the log"))
            nursery.cancel_scope.cancel()

    async def _serve(self, scope: Scope, target: Target | None, reply: _Reply) -> None:
        if target is None:
            await reply.whole(200, b"{}", [(b"content-type", b"application/json")])
            return
        query: Any = scope.get("query_string", b"")
        upstream = choose_upstream(self.upstream, bytes(query))
        if target.kind == "manifests":
            await self._manifest(target, upstream, reply)
        else:
            await self._blob(scope, target, upstream, reply)

    async def _manifest(self, target: Target, upstream: Upstream, reply: _Reply) -> None:
        name, ref = target.name, target.reference
        if target.is_digest:
            body = await trio.to_thread.run_sync(self.models.manifest_by_digest, name, ref)
            if body is None:
                body = await trio.to_thread.run_sync(self.models.index_by_digest, ref)
        else:
            registry = upstream.registry
            body = await trio.to_thread.run_sync(self.models.manifest_by_tag, registry, name, ref)
        if body is None:
            body = await self.misses.manifest(upstream, name, ref)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        headers = [
            (b"content-type", media_type(body).encode()),
            (b"docker-content-digest", digest.encode()),
            (b"etag", f'"{digest}"'.encode()),
        ]
        await reply.whole(200, body, headers)

    async def _blob(self, scope: Scope, target: Target, upstream: Upstream, reply: _Reply) -> None:
        digest = target.reference
        found = self.models.blob(digest)
        if found is None:
            await self.misses.blob(upstream, target.name, digest)
            found = self.models.blob(digest)
            if found is None:
                raise MirrorError(404, "BLOB_UNKNOWN", "blob unknown to the mirror", digest)
        path, size = found
        wanted = parse_range(_header(scope, b"range"), size)
        start, end = wanted or (0, size)
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"docker-content-digest", digest.encode()),
            (b"etag", f'"{digest}"'.encode()),
            (b"accept-ranges", b"bytes"),
            (b"content-length", str(end - start).encode()),
        ]
        if wanted is not None:
            headers.append((b"content-range", f"bytes {start}-{end - 1}/{size}".encode()))
        await reply.start(206 if wanted is not None else 200, headers)
        await reply.file(path, start, end)


class _Reply:
    """One response, started once; a HEAD request's carries the headers and no body."""

    def __init__(self, send: ASGISendCallable, *, head: bool) -> None:
        self.send = send
        self.head = head
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

    async def file(self, path: Path, start: int, end: int) -> None:
        """Bytes ``[start, end)`` of ``path``, from a read-only map of the file."""
        if self.head or end <= start:
            await self.end()
            return
        mapped = await trio.to_thread.run_sync(_map, path)
        with mapped, memoryview(mapped) as view:
            for offset in range(start, end, CHUNK):
                with view[offset : min(offset + CHUNK, end)] as chunk:
                    # hypercorn takes any buffer (it makes bytes of it): no copy here.
                    event = {"type": "http.response.body", "body": chunk, "more_body": True}
                    await self.send(cast(ASGISendEvent, event))
        await self.end()

    async def error(self, exc: MirrorError) -> None:
        if self.started:
            # Headers are out: all that can be said is that the body is cut short.
            log.info("mirror: reply cut short: %s", exc.message)
            return
        if exc.status >= 500:
            log.warning("mirror: %s %s", exc.code, exc.message)
        headers: Headers = [(b"content-type", b"application/json"), *exc.headers]
        if exc.status == 401:
            headers.append((b"www-authenticate", b'Basic realm="tensord mirror"'))
        await self.whole(exc.status, exc.body(), headers)


def _map(path: Path) -> mmap.mmap:
    """A read-only map of the file (which may be closed once mapped)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _header(scope: Scope, name: bytes) -> str | None:
    headers: Any = scope.get("headers", [])
    for key, value in headers:
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return None


__all__ = ["CHUNK", "MirrorApp"]
