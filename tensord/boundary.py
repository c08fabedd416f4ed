"""Error boundaries: what happens when a handler meets an exception nobody planned for.

Every connection and job runs under a boundary (DESIGN.md): a typed, expected error ends that
connection or job with a logged reason; anything else is a bug in tensord, and the boundary logs
it loudly with its traceback, counts it in ``tensord_unexpected_errors{boundary=...}`` and closes
only what it hit. Boundaries catch ``Exception``, never ``BaseException``: cancellation (and
``KeyboardInterrupt``) must pass through.
"""

from __future__ import annotations

import logging

from . import metrics


def report_unexpected(log: logging.Logger, boundary: str, what: str, exc: BaseException) -> None:
    """Log (with the traceback) and count a bug caught at ``boundary``; ``what`` names who and
    what was being done ("peer gpu-2, request 'w'"). The caller closes only its own connection."""
    metrics.UNEXPECTED_ERRORS.labels(boundary).inc()
    log.error(
        "%s: unexpected %s: %s (a bug in tensord: only this %s was closed, the daemon carries on; "
        "please report it with this traceback)",
        what,
        type(exc).__name__,
        exc,
        "job" if boundary == "download" else "connection",
        exc_info=exc,
    )


__all__ = ["report_unexpected"]
