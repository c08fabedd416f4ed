"""The mirror's ASGI app: ``/v2/``, manifests and blobs, read-only, from the model directory.

A request is answered from the store when it can be; a miss goes to :class:`~.misses.Misses`
(which fetches through the daemon's download manager): a manifest is answered once resolved, a
blob is streamed as it lands (:mod:`.landing`). A blob is sent from a read-only ``mmap`` of its
file in slices (:class:`~.reply.Reply`): the file is never read into memory.

Every request is an error boundary: a malformed or hostile one gets a 4xx in the OCI error
format (:class:`~.protocol.MirrorError`), a bug a logged 500, and the daemon carries on. A
client that goes away cancels its request (a download it started keeps going: the next client
wants it too).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from ..asgi import lifespan, presents_key
from ..boundary import report_unexpected
from .landing import send_blob, serve_landing
from .misses import Misses
from .protocol import (
    MirrorError,
    Target,
    Upstream,
    choose_upstream,
    media_type,
    parse_target,
)
from .reply import ABORT, Reply
from .store import ModelDir

log = logging.getLogger("tensord.mirror")


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
        reply = Reply(send, head=method == "HEAD", abort=_abort(scope))
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

    async def _serve(self, scope: Scope, target: Target | None, reply: Reply) -> None:
        if target is None:
            await reply.whole(200, b"{}", [(b"content-type", b"application/json")])
            return
        query: Any = scope.get("query_string", b"")
        upstream = choose_upstream(self.upstream, bytes(query))
        if target.kind == "manifests":
            await self._manifest(target, upstream, reply)
        else:
            await self._blob(scope, target, upstream, reply)

    async def _manifest(self, target: Target, upstream: Upstream, reply: Reply) -> None:
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

    async def _blob(self, scope: Scope, target: Target, upstream: Upstream, reply: Reply) -> None:
        digest = target.reference
        wanted = _header(scope, b"range")
        found = self.models.blob(digest)
        if found is not None:
            await send_blob(reply, digest, *found, wanted)
            return
        job_id = await self.misses.bring(upstream, target.name, digest)
        if job_id is None:
            raise MirrorError(404, "BLOB_UNKNOWN", "blob unknown to the mirror", digest)
        await serve_landing(self.models, self.misses, job_id, digest, wanted, reply)


def _abort(scope: Scope) -> Callable[[], None] | None:
    """The server's way to drop the connection (:data:`~.reply.ABORT`), if it gave one."""
    extensions: Any = scope.get("extensions") or {}
    abort = extensions.get(ABORT)
    return abort if callable(abort) else None


def _header(scope: Scope, name: bytes) -> str | None:
    headers: Any = scope.get("headers", [])
    for key, value in headers:
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return None


__all__ = ["MirrorApp"]
