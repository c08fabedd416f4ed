"""Small ASGI helpers shared by the control API, the token gateway and the OCI mirror."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from pathlib import Path
from typing import Any

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from .config import HostPort, unauthenticated_listener
from .errors import ConfigError

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


def load_api_keys(
    path: Path | None, listen: HostPort, section: str, *, client_certs: bool | None = None
) -> set[str] | None:
    """The API keys clients of ``section`` (``gateway``, ``mirror``) must present, or None when
    the server is open: an open endpoint on the network is a hole in the cluster, so it may be
    open only on loopback - or when TLS verifies every client's certificate (``client_certs``;
    None for a server that has no such option): :func:`~tensord.config.unauthenticated_listener`.

    The file holds one key per line; blank lines and lines starting with ``#`` are ignored."""
    if path is None:
        why = unauthenticated_listener(section, listen, api_keys=False, client_certs=client_certs)
        if why is not None:
            raise ConfigError(why)
        return None
    try:
        lines = (line.strip() for line in path.read_text().splitlines())
        keys = {line for line in lines if line and not line.startswith("#")}
    except OSError as exc:
        raise ConfigError(f"{section}.api_keys_file: cannot read {path}: {exc}") from None
    if not keys:
        raise ConfigError(f"{section}.api_keys_file: {path} holds no keys")
    return keys


def presents_key(scope: Scope, keys: list[bytes], *, basic: bool = False) -> bool:
    """Does the request carry one of ``keys``: ``Authorization: Bearer KEY`` or, with
    ``basic``, HTTP Basic with the key as the password (what registry clients send when given
    a username and password)? Keys are bytes: a header is bytes, and hmac refuses non-ASCII
    str."""
    headers: Any = scope.get("headers", [])
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, key = bytes(value).partition(b" ")
        key = key.strip()
        scheme = scheme.lower()
        if basic and scheme == b"basic":
            try:
                key = base64.b64decode(key, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        elif scheme != b"bearer":
            return False
        # Every key is compared, so the time taken says nothing about which one matched.
        matches = [hmac.compare_digest(key, k) for k in keys]
        return any(matches)
    return False


__all__ = ["Headers", "lifespan", "load_api_keys", "presents_key", "send_body", "send_json"]
