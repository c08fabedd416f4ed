"""The backend side of a generation request, for HTTP and WebSocket alike: failover across the
backends that have the model, what a failed attempt records, the error text a backend replied.

A backend that fails before it starts its reply is tried no more for this request and the next
eligible one is used; a 400 means the request itself is wrong, so no other backend is asked.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from .. import metrics
from .backends import Backend, Backends, Busy, NoBackend
from .record import _Record

log = logging.getLogger("tensord.gateway")

#: The longest line relayed (and the largest whole reply whose token count is read): Ollama's
#: final ``/api/generate`` object carries the context's token ids, which can run to megabytes.
MAX_LINE = 64 << 20


async def _try_backends(
    backends: Backends,
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
            async with backends.acquire(model, tried) as backend:
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


def _attempt_failed(endpoint: str, backend: Backend, problem: str) -> None:
    """A backend failed one attempt (the request may still succeed on another)."""
    metrics.GATEWAY_REQUESTS.labels(endpoint, backend.node_id, "backend_error").inc()
    backend.last_error = problem
    log.warning("gateway: backend %s failed a %s request: %s", backend.node_id, endpoint, problem)


def _error_text(text: str) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return text.strip()
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", ""))
    return str(err or text).strip()
