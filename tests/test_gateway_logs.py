"""The gateway's per-request log line and metrics, checked against what the client received.

A backend that emits a known number of tokens at a known interval after a known "prompt
evaluation" delay: the line must name the endpoint, model and backend, count exactly the token
chunks the client got (not the final metrics object, the usage chunk or ``[DONE]``), time the
first token from the request and the gaps at about the backend's interval; the Prometheus
metrics must move by the same amounts, for HTTP and the WebSocket alike.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from tensord import metrics
from tensord.gateway.encoders import ERROR, OTHER, TOKEN, line_kind

from .support.gateway import MSG, gateway
from .support.ollama_backend import BackendConfig

PREFIX = "gateway request: "
N = 12  # tokens per reply
INTERVAL = 0.02  # seconds between them at the backend
DELAY = 0.1  # seconds before the first one
PACED = BackendConfig(n_tokens=N, interval=INTERVAL, first_token_delay=DELAY)
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse(text: str) -> dict[str, str]:
    """A logfmt line's fields (quoted values are JSON strings)."""
    fields = {k: json.loads(v) if v.startswith('"') else v for k, v in _FIELD.findall(text)}
    assert " ".join(f"{k}={v}" for k, v in _FIELD.findall(text)) == text  # nothing else in it
    return fields


class RequestLog(logging.Handler):
    """Collects the gateway's request lines; ``wait`` blocks until there are ``n``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.raw: list[str] = []
        self.lines: list[dict[str, str]] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith(PREFIX):
            self.raw.append(text)
            self.lines.append(parse(text[len(PREFIX) :]))
            self._changed.set()
            self._changed = trio.Event()

    async def wait(self, n: int) -> list[dict[str, str]]:
        with trio.fail_after(5):
            while len(self.lines) < n:
                await self._changed.wait()
        return self.lines


@pytest.fixture
def request_log() -> Iterator[RequestLog]:
    logger = logging.getLogger("tensord.gateway")
    handler, level = RequestLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def snapshot(endpoint: str, outcome: str = "ok") -> dict[str, float]:
    return {
        "requests": sample(
            "tensord_gateway_requests_total", endpoint=endpoint, backend="gpu-0", outcome=outcome
        ),
        "tokens": sample("tensord_gateway_tokens_total", backend="gpu-0"),
        "ttft_count": sample(
            "tensord_gateway_time_to_first_token_seconds_count", endpoint=endpoint
        ),
        "ttft_sum": sample("tensord_gateway_time_to_first_token_seconds_sum", endpoint=endpoint),
        "gaps": sample("tensord_gateway_inter_token_seconds_count", endpoint=endpoint),
    }


def idle() -> bool:
    """No request holds a backend slot (the gauge falls when the slot is released: after the
    reply's last byte, so check it once the gateway has stopped)."""
    return sample("tensord_gateway_in_flight", backend="gpu-0") == 0


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def tokens_received(path: str, text: str) -> int:
    """Token chunks in a reply as a client reads them (independently of the gateway's code)."""
    count = 0
    for line in text.splitlines():
        if path.startswith("/v1/"):
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            piece = (
                choices[0].get("delta", {}).get("content") or choices[0].get("text")
                if choices
                else ""
            )
        elif line.strip():
            obj = json.loads(line)
            piece = obj.get("response") or obj.get("message", {}).get("content")
        count += bool(piece)
    return count


def assert_timed(line: dict[str, str]) -> None:
    """The timings of a reply of N tokens INTERVAL apart after DELAY, generously."""
    assert DELAY * 1e3 <= float(line["ttft_ms"]) < DELAY * 1e3 + 500  # from the request
    mean = float(line["inter_token_mean_ms"])
    assert INTERVAL * 1e3 * 0.5 < mean < INTERVAL * 1e3 * 2, line
    assert float(line["inter_token_p99_ms"]) >= mean
    duration = float(line["duration_ms"])
    assert duration >= float(line["ttft_ms"]) + (N - 1) * INTERVAL * 1e3 * 0.5
    assert float(line["tokens_per_s"]) == pytest.approx(N / duration * 1e3, rel=0.05)


STREAMS: dict[str, dict[str, Any]] = {
    "/api/chat": {"messages": MSG},
    "/api/generate": {"prompt": "hi"},
    "/v1/chat/completions": {
        "messages": MSG,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    "/v1/completions": {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}},
}


@pytest.mark.parametrize("path", list(STREAMS))
async def test_one_line_per_streamed_request_counts_the_tokens_the_client_got(
    path: str, request_log: RequestLog
) -> None:
    async with gateway(PACED) as (g, _), httpx.AsyncClient(timeout=30) as client:
        before = snapshot(path)
        r = await client.post(f"{g.url}{path}", json={"model": "tiny", **STREAMS[path]})
        assert r.status_code == 200
        after = snapshot(path)
    assert tokens_received(path, r.text) == N
    # The line is written before the reply's last byte: it is there when the client has it.
    (line,) = request_log.lines
    assert line["endpoint"] == path and line["model"] == "tiny" and line["backend"] == "gpu-0"
    assert (line["outcome"], line["stream"], line["tokens"]) == ("ok", "true", str(N))
    assert_timed(line)
    changed = delta(before, after)
    assert changed["ttft_sum"] >= DELAY
    assert {k: changed[k] for k in ("requests", "tokens", "ttft_count", "gaps")} == {
        "requests": 1,
        "tokens": N,
        "ttft_count": 1,
        "gaps": N - 1,
    }
    assert idle()


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_a_whole_reply_counts_the_tokens_it_reports(
    path: str, request_log: RequestLog
) -> None:
    fast = BackendConfig(n_tokens=N, interval=0.0)
    async with gateway(fast) as (g, _), httpx.AsyncClient(timeout=30) as client:
        before = snapshot(path)
        r = await client.post(f"{g.url}{path}", json={"model": "tiny", "messages": MSG,
                                                      "stream": False})  # fmt: skip
        assert r.status_code == 200
        changed = delta(before, snapshot(path))
    (line,) = request_log.lines
    assert (line["outcome"], line["stream"], line["tokens"]) == ("ok", "false", str(N))
    assert line["ttft_ms"] == line["inter_token_mean_ms"] == "-"
    assert changed["tokens"] == N and changed["ttft_count"] == changed["gaps"] == 0


async def test_the_websocket_logs_and_counts_like_http(request_log: RequestLog) -> None:
    async with gateway(PACED) as (g, (backend,)):
        before = snapshot("/v1/ws")
        cancelled_before = snapshot("/v1/ws", "cancelled")
        url = g.url.replace("http://", "ws://") + "/v1/ws"
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"id": "a", "model": "tiny", "messages": MSG}))
            tokens = 0
            while (msg := json.loads(await ws.get_message()))["type"] == "token":
                tokens += 1
            assert msg["type"] == "done" and tokens == N
            after = snapshot("/v1/ws")
            # A cancelled one is logged (and counted) as cancelled, with the tokens it got.
            await ws.send_message(json.dumps({"id": "b", "model": "tiny", "messages": MSG}))
            assert json.loads(await ws.get_message())["type"] == "token"
            await ws.send_message(json.dumps({"type": "cancel", "id": "b"}))
            while (msg := json.loads(await ws.get_message()))["type"] == "token":
                pass
            assert msg["type"] == "cancelled"
            cancelled_after = snapshot("/v1/ws", "cancelled")
        with trio.fail_after(2):
            await backend.wait_cancelled(1)
    first, second = request_log.lines
    assert (first["endpoint"], first["model"], first["backend"]) == ("/v1/ws", "tiny", "gpu-0")
    assert (first["outcome"], first["tokens"]) == ("ok", str(N))
    assert_timed(first)
    changed = delta(before, after)
    assert changed["ttft_sum"] >= DELAY
    assert {k: changed[k] for k in ("requests", "tokens", "ttft_count", "gaps")} == {
        "requests": 1,
        "tokens": N,
        "ttft_count": 1,
        "gaps": N - 1,
    }
    assert idle()
    assert (second["outcome"], second["tokens"]) == ("cancelled", str(msg["tokens"]))
    assert delta(cancelled_before, cancelled_after)["requests"] == 1


async def test_failures_are_logged_with_their_outcome(request_log: RequestLog) -> None:
    dies = BackendConfig(n_tokens=50, interval=0.001, die_after=5)
    async with gateway(dies) as (g, _), httpx.AsyncClient(timeout=30) as client:
        await client.post(f"{g.url}/api/chat", json={"model": "tiny", "messages": MSG})
        await client.post(f"{g.url}/api/chat", json={"model": "absent", "messages": MSG})
        await client.post(f"{g.url}/v1/chat/completions", content=b"{not json")
        # A model name from a client cannot break the line (quoted, no newline).
        await client.post(f"{g.url}/api/chat", json={"model": "a b\nc=d", "messages": MSG})
    died, absent, bad, odd = request_log.lines
    assert (died["outcome"], died["backend"], died["tokens"]) == ("backend_error", "gpu-0", "5")
    assert (absent["outcome"], absent["backend"], absent["model"]) == ("no_backend", "-", "absent")
    assert (bad["endpoint"], bad["outcome"], bad["model"]) == ("/v1/chat/completions",
                                                              "bad_request", "-")  # fmt: skip
    assert odd["model"] == "a b\nc=d" and "\n" not in request_log.raw[-1]


async def test_a_client_that_leaves_is_logged_as_gone(request_log: RequestLog) -> None:
    async with (
        gateway(BackendConfig(n_tokens=500, interval=0.01)) as (g, (backend,)),
        httpx.AsyncClient(timeout=30) as client,
    ):
        body = {"model": "tiny", "messages": MSG}
        async with client.stream("POST", f"{g.url}/api/chat", json=body) as r:
            seen = 0
            async for _ in r.aiter_lines():
                seen += 1
                if seen == 3:
                    break
        (line,) = await request_log.wait(1)
        with trio.fail_after(2):
            await backend.wait_cancelled(1)
    assert (line["outcome"], line["backend"]) == ("client_gone", "gpu-0")
    assert int(line["tokens"]) >= 3


@pytest.mark.parametrize(
    ("line", "sse", "kind"),
    [
        (b'{"message":{"role":"assistant","content":"hi"},"done":false}', False, TOKEN),
        (b'{"message":{"role":"assistant","content":""},"done":true,"eval_count":3}', False, OTHER),
        (b'{"message":{"role":"assistant","content":"","thinking":"hm"}}', False, TOKEN),
        (b'{"response":"hi","done":false}', False, TOKEN),
        (b'{"response":"","done":true,"context":[1,2]}', False, OTHER),
        (b'{"error":"llama runner process has terminated"}', False, ERROR),
        (b"", False, OTHER),
        (b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}', True, TOKEN),
        (b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}', True, OTHER),
        (b'data: {"choices":[{"delta":{"tool_calls":[{"id":"1"}]}}]}', True, TOKEN),
        (b'data: {"choices":[{"delta":{"content":""},"finish_reason":"stop"}]}', True, OTHER),
        (b'data: {"choices":[],"usage":{"completion_tokens":3}}', True, OTHER),
        (b'data: {"choices":[{"text":"hi","index":0}]}', True, TOKEN),
        (b"data: [DONE]", True, OTHER),
        (b": keep-alive", True, OTHER),
        (b"", True, OTHER),
        (b'data: {"error":{"message":"boom"}}', True, ERROR),
        (b"data: not json", True, OTHER),
    ],
)
def test_line_kind(line: bytes, sse: bool, kind: str) -> None:
    assert line_kind(line, sse) == kind
