"""Logging to stderr, in a form journald and humans both read well."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: Library loggers kept at WARNING unless log_level is debug.
_CHATTY = ("httpx", "httpcore", "hpack", "hypercorn.access")
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


class _JournalFormatter(logging.Formatter):
    """``<priority>logger: message``: journald reads the priority and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 2)
        return f"<{priority}>{record.name}: {super().format(record)}"


def setup_logging(level: str, env: Mapping[str, str]) -> None:
    """Log to stderr at ``level``; no timestamps under systemd (``JOURNAL_STREAM`` set)."""
    handler = logging.StreamHandler(sys.stderr)
    if env.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # Libraries log every request at INFO (httpx: one line per download range): their chatter
    # reaches the daemon's log only when debugging.
    quiet = logging.DEBUG if level == "debug" else logging.WARNING
    for name in _CHATTY:
        logging.getLogger(name).setLevel(quiet)
