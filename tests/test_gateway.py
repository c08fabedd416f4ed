"""The token gateway between real clients (the official openai and ollama SDKs, httpx) and the
in-repo Ollama-compatible backend: every token in order, no bursts, keep-alive comments, failover,
errors mid-stream, disconnects that cancel upstream, concurrency limits, API keys.

The WebSocket endpoint is tested in test_gateway_ws.py, the per-request log line and the metrics
in test_gateway_logs.py; all three use :func:`tests.support.gateway.gateway`."""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import trio

from tensord.config import HostPort
from tensord.errors import ConfigError
from tensord.gateway.server import load_api_keys

from .support.gateway import MSG, TOKENS, gateway, gateway_settings
from .support.ollama_backend import BackendConfig


async def test_openai_sdk_streams_every_token_with_the_right_metadata() -> None:
    async with gateway(BackendConfig(tokens=TOKENS, interval=0.005)) as (g, _):

        def chat() -> list[object]:
            client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="unused")
            return list(
                client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )

        chunks = await trio.to_thread.run_sync(chat)
    content = [c.choices[0].delta.content for c in chunks if c.choices]  # type: ignore[attr-defined]
    assert "".join(x or "" for x in content) == "".join(TOKENS)
    first = next(c for c in chunks if c.choices)  # type: ignore[attr-defined]
    assert first.choices[0].delta.role == "assistant"  # type: ignore[attr-defined]
    assert len({c.id for c in chunks}) == 1  # type: ignore[attr-defined]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]  # type: ignore[attr-defined]
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
    usage = chunks[-1].usage  # type: ignore[attr-defined]
    assert chunks[-1].choices == [] and usage.completion_tokens == len(TOKENS)  # type: ignore[attr-defined]


async def test_ollama_client_streams_chat_and_generate_and_lists_models() -> None:
    async with gateway(
        BackendConfig(tokens=TOKENS, interval=0.002, models=["tiny:latest"]),
        BackendConfig(models=["other:7b"]),
    ) as (g, _):

        def use() -> tuple[list[object], list[object], object, object]:
            client = ollama.Client(host=g.url)
            chat = list(client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                    stream=True))  # fmt: skip
            gen = list(client.generate(model="tiny", prompt="hi", stream=True))
            return chat, gen, client.list(), client.ps()

        chat, gen, listed, _ = await trio.to_thread.run_sync(use)
    assert "".join(c.message.content for c in chat) == "".join(TOKENS)  # type: ignore[attr-defined]
    assert chat[-1].done and chat[-1].eval_count == len(TOKENS)  # type: ignore[attr-defined]
    assert "".join(c.response for c in gen) == "".join(TOKENS)  # type: ignore[attr-defined]
    names = sorted(m.model for m in listed.models)  # type: ignore[attr-defined]
    assert names == ["other:7b", "tiny:latest"]


async def test_tokens_arrive_as_they_are_made_not_in_bursts() -> None:
    """Tokens every 20 ms at the backend arrive every ~20 ms at the client."""
    async with gateway(BackendConfig(n_tokens=40, interval=0.02)) as (g, _):
        arrivals: list[float] = []
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
            async with client.stream("POST", f"{g.url}/api/chat", json=body) as r:
                async for line in r.aiter_lines():
                    if line.strip():
                        arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(arrivals[1:-1])]
    assert len(gaps) >= 30
    assert 0.012 < statistics.median(gaps) < 0.035, gaps
    # Bursts would show as many near-zero gaps followed by long ones.
    assert sum(gap < 0.005 for gap in gaps) <= len(gaps) // 10, gaps


async def test_a_client_that_disconnects_cancels_upstream_before_the_reply_ends() -> None:
    """The backend would stream for 10 s more; the client's departure stops it instead. (How
    soon - milliseconds - is a number for bench/gateway.py to print, not a test's bound.)"""
    async with gateway(BackendConfig(n_tokens=500, interval=0.02)) as (g, (backend,)):
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "x"}]}
            async with client.stream("POST", f"{g.url}/v1/chat/completions", json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen == 3:
                        break
        with trio.fail_after(8):  # generous, and still short of the 10 s the reply would take
            await backend.wait_cancelled(1)
        assert (backend.cancelled, backend.completed) == (1, 0)


async def test_a_backend_dying_mid_stream_ends_the_stream_with_an_error() -> None:
    dies = BackendConfig(n_tokens=50, interval=0.001, die_after=5)
    async with gateway(dies) as (g, _), httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{g.url}/api/chat", json={"model": "tiny", "messages": MSG})
        lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
        assert "error" in lines[-1] and "mid-stream" in lines[-1]["error"]
        assert len(lines) == 6  # five tokens, then the error
        body = {"model": "tiny", "stream": True, "messages": MSG}
        r = await client.post(f"{g.url}/v1/chat/completions", json=body)
        events = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")]
        assert "error" in json.loads(events[-1])


async def test_a_failing_first_backend_falls_over_to_the_next() -> None:
    async with (
        gateway(
            BackendConfig(fail_before_first=500), BackendConfig(tokens=TOKENS, interval=0.0)
        ) as (g, (_bad, good)),
        httpx.AsyncClient(timeout=30) as client,
    ):
        for _ in range(3):
            r = await client.post(f"{g.url}/api/generate", json={"model": "tiny", "prompt": "x"})
            lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
            assert "".join(x.get("response", "") for x in lines) == "".join(TOKENS)
        r = await client.post(f"{g.url}/api/chat", json={"model": "absent", "messages": MSG})
        assert r.status_code == 404 and "absent" in r.json()["error"]
    assert good.requests and len(good.requests) == 3


async def test_over_the_concurrency_limit_is_a_503_with_retry_after() -> None:
    async with gateway(BackendConfig(n_tokens=1000, interval=0.01)) as (g, _):
        assert g.backends is not None
        g.backends.queue_seconds = 0.1
        body = {"model": "tiny", "messages": MSG}
        async with httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:
            started = trio.Semaphore(0)

            async def hold() -> None:
                async with client.stream("POST", f"{g.url}/api/chat", json=body) as r:
                    async for _ in r.aiter_lines():
                        started.release()
                        await trio.sleep_forever()

            for _ in range(4):
                nursery.start_soon(hold)
            for _ in range(4):
                await started.acquire()
            r = await client.post(f"{g.url}/api/chat", json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "busy" in r.json()["error"]
            nursery.cancel_scope.cancel()


async def test_api_keys(tmp_path: Path) -> None:
    open_to_all = gateway_settings([], listen=HostPort("0.0.0.0", 0))
    with pytest.raises(ConfigError, match="api_keys_file"):
        load_api_keys(open_to_all)
    keys = tmp_path / "keys"
    keys.write_text("# the web app\nk-123\n\n")
    assert load_api_keys(gateway_settings([], api_keys_file=keys)) == {"k-123"}
    async with (
        gateway(BackendConfig(), api_keys_file=keys) as (g, _),
        httpx.AsyncClient(timeout=30) as client,
    ):
        assert (await client.get(f"{g.url}/api/tags")).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert (await client.get(f"{g.url}/api/tags", headers=bad)).status_code == 401
        latin = {"Authorization": b"Bearer k-\xe9"}  # not ASCII: still a plain 401
        assert (await client.get(f"{g.url}/api/tags", headers=latin)).status_code == 401
        good = {"Authorization": "Bearer k-123"}
        assert (await client.get(f"{g.url}/api/tags", headers=good)).status_code == 200
        assert (await client.get(f"{g.url}/metrics", headers=good)).status_code == 200
        assert (await client.get(f"{g.url}/metrics")).status_code == 401


async def test_metrics_in_prometheus_text_format() -> None:
    async with (
        gateway(BackendConfig(tokens=TOKENS, interval=0.001)) as (g, _),
        httpx.AsyncClient(timeout=30) as client,
    ):
        r = await client.post(f"{g.url}/api/chat", json={"model": "tiny", "messages": MSG})
        assert r.status_code == 200
        text = (await client.get(f"{g.url}/metrics")).text
    ok = 'tensord_gateway_requests_total{backend="gpu-0",endpoint="/api/chat",outcome="ok"}'
    assert any(line.startswith(ok) and float(line.split()[-1]) >= 1 for line in text.splitlines())
    assert 'tensord_gateway_time_to_first_token_seconds_count{endpoint="/api/chat"}' in text
    assert "tensord_gateway_inter_token_seconds_bucket" in text


async def test_non_streaming_replies_through_the_openai_sdk() -> None:
    async with gateway(BackendConfig(tokens=TOKENS, interval=0.0)) as (g, _):

        def call() -> tuple[object, object]:
            client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="unused")
            chat = client.chat.completions.create(model="tiny", messages=MSG)  # type: ignore[arg-type]
            text = client.completions.create(model="tiny", prompt="hi")
            return chat, text

        chat, text = await trio.to_thread.run_sync(call)
    assert chat.choices[0].message.content == "".join(TOKENS)  # type: ignore[attr-defined]
    assert chat.usage.completion_tokens == len(TOKENS)  # type: ignore[attr-defined]
    assert text.choices[0].text == "".join(TOKENS)  # type: ignore[attr-defined]


async def test_sse_keep_alive_comments_start_the_reply_while_the_model_thinks() -> None:
    """Ollama sends its response head with the first token: until then the gateway's own
    ``: keep-alive`` comments (and headers) keep the client and any proxy from giving up."""
    slow = BackendConfig(tokens=TOKENS, interval=0.0, first_token_delay=0.3)
    body = {"model": "tiny", "stream": True, "messages": MSG}
    async with (
        gateway(slow, keepalive_seconds=0.05) as (g, _),
        httpx.AsyncClient(timeout=30) as client,
    ):
        async with client.stream("POST", f"{g.url}/v1/chat/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines()]

        def sdk() -> str:
            c = openai.OpenAI(base_url=f"{g.url}/v1", api_key="unused")
            stream = c.chat.completions.create(model="tiny", messages=MSG, stream=True)  # type: ignore[arg-type]
            return "".join(x.choices[0].delta.content or "" for x in stream if x.choices)

        text = await trio.to_thread.run_sync(sdk)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    first = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert lines[0] == ": keep-alive" and set(lines[:first]) == {": keep-alive", ""}
    assert not any(line.startswith(":") for line in lines[first:])  # none after the first token
    chunks = [json.loads(x[6:]) for x in lines[first:] if x.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "".join(TOKENS)
    assert lines[-2] == "data: [DONE]"
    assert text == "".join(TOKENS)  # the openai SDK skips the comments


async def test_a_failure_after_keep_alives_is_an_error_event_before_them_an_http_error() -> None:
    # The node dies while evaluating the prompt, before any byte of its reply.
    dies = BackendConfig(first_token_delay=0.2, die_after=0)
    async with (
        gateway(dies, keepalive_seconds=0.05) as (g, (backend,)),
        httpx.AsyncClient(timeout=30) as client,
    ):
        body = {"model": "tiny", "stream": True, "messages": MSG}
        r = await client.post(f"{g.url}/v1/chat/completions", json=body)
        assert r.status_code == 200  # the keep-alive comments had started the reply
        lines = [x for x in r.text.splitlines() if x]
        assert lines[0] == ": keep-alive" and lines[-1].startswith("data: ")
        assert "error" in json.loads(lines[-1][6:])
        # NDJSON has no comments: nothing is sent before the backend answers, so the client
        # gets a proper HTTP error.
        r = await client.post(f"{g.url}/api/chat", json={"model": "tiny", "messages": MSG})
        assert r.status_code == 502 and "error" in r.json()
    assert len(backend.requests) == 2


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_a_client_that_leaves_before_the_first_token_cancels_upstream(path: str) -> None:
    # 30 s of "prompt evaluation": only the gateway's disconnect watch can end it early.
    async with (
        gateway(BackendConfig(first_token_delay=30.0)) as (g, (backend,)),
        httpx.AsyncClient(timeout=30) as client,
    ):

        async def ask() -> None:
            await client.post(f"{g.url}{path}", json={"model": "tiny", "stream": True,
                                                      "messages": MSG})  # fmt: skip

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            with trio.fail_after(5):
                await backend.wait_until(lambda: backend.in_flight == 1)
            nursery.cancel_scope.cancel()
        with trio.fail_after(10):  # generous, and far short of the 30 s of "prompt evaluation"
            await backend.wait_cancelled(1)
        assert (backend.in_flight, backend.completed) == (0, 0)


async def test_a_request_a_backend_rejects_as_bad_is_not_tried_elsewhere() -> None:
    async with (
        gateway(BackendConfig(), BackendConfig()) as (g, backends),
        httpx.AsyncClient(timeout=30) as client,
    ):
        body = {"model": "tiny", "stream": True, "messages": []}
        r = await client.post(f"{g.url}/v1/chat/completions", json=body)
        assert r.status_code == 400 and "too short" in r.json()["error"]["message"]
        r = await client.post(f"{g.url}/api/chat", content=b"{not json")
        assert r.status_code == 400 and "bad request" in r.json()["error"]
    assert sum(len(b.requests) for b in backends) == 1


async def test_the_version_is_the_oldest_backends_and_other_paths_are_404() -> None:
    async with (
        gateway(BackendConfig(version="0.10.1"), BackendConfig(version="0.9.6")) as (g, _),
        httpx.AsyncClient(timeout=30) as client,
    ):
        assert (await client.get(f"{g.url}/api/version")).json() == {"version": "0.9.6"}
        r = await client.get(f"{g.url}/")
        assert r.status_code == 404 and r.json() == {"error": "no endpoint GET /"}


async def test_a_request_body_over_the_limit_is_a_413_and_never_reaches_a_backend() -> None:
    from tensord.gateway.app import MAX_BODY

    async with (
        gateway(BackendConfig()) as (g, backends),
        httpx.AsyncClient(timeout=30) as client,
    ):
        huge = {"model": "tiny", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
        for path in ("/v1/chat/completions", "/api/chat"):
            r = await client.post(f"{g.url}{path}", json=huge)
            assert r.status_code == 413, r.text
            assert f"over {MAX_BODY} bytes" in r.text
        # The gateway is fine afterwards.
        r = await client.post(f"{g.url}/api/chat", json={"model": "tiny", "messages": []})
        assert r.status_code == 200
    assert len(backends[0].requests) == 1
