"""Helpers shared by tests: library nodes with fast retries, and the CI rule for missing parts."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tensord.config import SecuritySettings, Settings
from tensord.node import TensorNode

from .daemons import cluster_secret

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip locally when a component is missing; under CI=true a missing component fails."""
    if not condition:
        if IN_CI:
            pytest.fail(f"missing component under CI: {reason}")
        pytest.skip(reason)


def wait_serving(
    probe: Callable[[], object], proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Poll ``probe`` until it stops raising ``OSError``/``httpx.HTTPError`` (a server that
    gives no readiness signal): bounded by ``timeout``, and failing at once, with the server's
    log, if the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except (OSError, httpx.HTTPError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(log.read_text()) from None
            time.sleep(0.02)


def fast_settings(
    *, transport: str = "tcp", authenticated: bool = True, **protocol: Any
) -> Settings:
    """Library settings with quick retries, for tests that exercise failures, and the test run's
    cluster secret (so that these nodes and the test daemons authenticate each other).
    ``transport``: "tcp" or "quic" (a test taking the ``transport`` fixture passes it on).
    ``authenticated=False``: no secret, for peers written by hand that do not authenticate."""
    proto = {"retry_base_delay": 20, "max_retries": 5, **protocol}
    base = replace(Settings.for_library().with_protocol(**proto), transport=transport)
    if not authenticated:
        return base
    return replace(base, security=SecuritySettings(secret_file=cluster_secret()))


@asynccontextmanager
async def running(settings: Settings | None = None, **kwargs: Any) -> AsyncIterator[TensorNode]:
    """A started library node, shut down on exit."""
    async with TensorNode(settings if settings is not None else fast_settings(), **kwargs) as node:
        yield node


class LogWaiter(logging.Handler):
    """Counts the records whose message satisfies ``match`` and sets ``event`` at the first: a
    test waits for a log line without polling. Records may come from any thread (the store's
    sweep logs from a worker thread), so the event is set by the trio loop it was made in."""

    def __init__(self, match: Callable[[str], bool]) -> None:
        super().__init__(logging.INFO)
        self.match = match
        self.event = trio.Event()
        self.count = 0
        self._token = trio.lowlevel.current_trio_token()

    def emit(self, record: logging.LogRecord) -> None:
        if self.match(record.getMessage()):
            self.count += 1
            self._token.run_sync_soon(self.event.set)

    @contextmanager
    def watching(self, logger: str) -> Iterator[LogWaiter]:
        """Attached to ``logger`` (with INFO records let through) for the block."""
        log = logging.getLogger(logger)
        level = log.level
        if not log.isEnabledFor(logging.INFO):
            log.setLevel(logging.INFO)
        log.addHandler(self)
        try:
            yield self
        finally:
            log.removeHandler(self)
            log.setLevel(level)
