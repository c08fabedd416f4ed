"""One generation request as its log line and the metrics see it: time to first token, the gaps
between tokens, the backend that relayed it and how it ended - counted once per request
(:func:`_report`), for HTTP and WebSocket requests alike.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field

from .. import metrics

log = logging.getLogger("tensord.gateway")


@dataclass
class _Record:
    """One generation request as its log line and the metrics see it."""

    endpoint: str
    model: str
    received: float  # time.perf_counter() when the gateway had the request
    streamed: bool = True
    backend: str = ""  # the backend that relayed it ("" if none did)
    #: ok, client_gone, cancelled (WebSocket), backend_error, no_backend, busy, bad_request;
    #: it stays client_gone when the request is cancelled because its client left.
    outcome: str = "client_gone"
    tokens: int = 0  # token chunks relayed (a whole reply: the completion tokens it reports)
    first: float | None = None
    last: float = 0.0
    gaps: list[float] = field(default_factory=list)
    reported: bool = False

    def token(self, now: float | None = None) -> None:
        """One token chunk relayed (at ``now``, the time it arrived from the backend)."""
        now = time.perf_counter() if now is None else now
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now
        self.tokens += 1

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.received

    def line(self, took: float) -> str:
        """The log line's fields, ``key=value`` (logfmt)."""
        gaps = sorted(self.gaps)
        mean = sum(gaps) / len(gaps) if gaps else None
        p99 = gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] if gaps else None
        fields = (
            ("endpoint", self.endpoint),
            ("model", self.model),
            ("backend", self.backend or "-"),
            ("outcome", self.outcome),
            ("stream", "true" if self.streamed else "false"),
            ("tokens", str(self.tokens)),
            ("ttft_ms", _ms(self.ttft)),
            ("inter_token_mean_ms", _ms(mean, 2)),
            ("inter_token_p99_ms", _ms(p99, 2)),
            ("tokens_per_s", f"{self.tokens / took:.1f}" if took > 0 else "-"),
            ("duration_ms", _ms(took)),
        )
        return " ".join(f"{k}={_logfmt(v)}" for k, v in fields)


def _ms(seconds: float | None, digits: int = 1) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.{digits}f}"


_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+\-]+")


def _logfmt(value: str) -> str:
    """A value as is when it is plain, else JSON-quoted (no spaces or newlines from clients)."""
    return value if _PLAIN.fullmatch(value) else json.dumps(value)


def _report(record: _Record) -> None:
    """The request's metrics and its log line, once: just before the reply's last byte is sent
    (so a client that has read it sees the metrics counted), or when the request ends."""
    if record.reported:
        return
    record.reported = True
    took = time.perf_counter() - record.received
    metrics.GATEWAY_REQUESTS.labels(record.endpoint, record.backend, record.outcome).inc()
    if record.backend:
        metrics.GATEWAY_TOKENS.labels(record.backend).inc(record.tokens)
    ttft = record.ttft
    if ttft is not None:
        metrics.GATEWAY_TTFT.labels(record.endpoint).observe(ttft)
    if record.gaps:
        inter = metrics.GATEWAY_INTER_TOKEN.labels(record.endpoint)
        for gap in record.gaps:
            inter.observe(gap)
    if log.isEnabledFor(logging.INFO):
        log.info("gateway request: %s", record.line(took))
