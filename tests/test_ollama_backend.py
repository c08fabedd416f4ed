"""The fake Ollama node, driven with httpx as the gateway will drive it.

Why: gateway tests and the benchmark trust this server to look like Ollama on the wire and to
report what happened to each stream (finished, abandoned, killed); these tests pin both down.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
import trio

from .support.ollama_backend import BackendConfig, OllamaBackend, ollama_backend

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "why is the sky blue"}]}
GENERATE = {"model": "tiny:latest", "prompt": "hello there", "system": "be brief"}
GO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
METRICS = [
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
]
FAST = BackendConfig(n_tokens=5, interval=0.001)
TOKENS = ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "tok4 "]


def client_for(backend: OllamaBackend) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=backend.url, timeout=10)


async def ndjson(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """Stream a native request and parse every line as it arrives."""
    async with client.stream("POST", path, json=body) as resp:
        objs = [json.loads(line) async for line in resp.aiter_lines() if line]
    return resp, objs


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body, checking each event is ``data: ...`` + blank line."""
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [e.removeprefix("data: ") for e in events]


def check_metrics(final: dict[str, Any], prompt: int, evals: int) -> None:
    assert final["prompt_eval_count"] == prompt
    assert final["eval_count"] == evals
    durations = [final[k] for k in METRICS if k.endswith("duration")]
    assert all(isinstance(d, int) and d > 0 for d in durations)
    assert final["total_duration"] >= sum(durations[1:])


async def test_chat_stream_is_ndjson_with_final_metrics() -> None:
    async with ollama_backend(FAST) as backend, client_for(backend) as client:
        resp, objs = await ndjson(client, "/api/chat", CHAT)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/x-ndjson"
    assert resp.headers["transfer-encoding"] == "chunked"
    assert len(objs) == 6
    for i, obj in enumerate(objs[:-1]):
        assert list(obj) == ["model", "created_at", "message", "done"]
        assert obj["model"] == "tiny"  # echoed as the client spelt it
        assert GO_TIME.match(obj["created_at"])
        assert obj["message"] == {"role": "assistant", "content": TOKENS[i]}
        assert obj["done"] is False
    final = objs[-1]
    assert list(final) == ["model", "created_at", "message", "done_reason", "done", *METRICS]
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["done"] is True and final["done_reason"] == "stop"
    check_metrics(final, prompt=5, evals=5)
    assert [(r["path"], r["body"]) for r in backend.requests] == [("/api/chat", CHAT)]
    assert (backend.completed, backend.in_flight, backend.cancelled) == (1, 0, 0)


async def test_generate_stream_carries_response_and_context() -> None:
    async with ollama_backend(FAST) as backend, client_for(backend) as client:
        resp, objs = await ndjson(client, "/api/generate", GENERATE)
    assert resp.status_code == 200
    assert [o["response"] for o in objs[:-1]] == TOKENS
    assert all(list(o) == ["model", "created_at", "response", "done"] for o in objs[:-1])
    final = objs[-1]
    assert list(final) == [
        "model",
        "created_at",
        "response",
        "done",
        "done_reason",
        "context",
        *METRICS,
    ]
    assert final["response"] == "" and final["done_reason"] == "stop"
    check_metrics(final, prompt=4, evals=5)  # "hello there" + "be brief"
    assert len(final["context"]) == 4 + 5


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [("/api/chat", CHAT, "message"), ("/api/generate", GENERATE, "response")],
)
async def test_stream_false_is_one_json_object(path: str, body: dict[str, Any], field: str) -> None:
    async with ollama_backend(FAST) as backend, client_for(backend) as client:
        resp = await client.post(path, json={**body, "stream": False})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json; charset=utf-8"
    assert int(resp.headers["content-length"]) == len(resp.content)
    assert not resp.text.endswith("\n")  # gin's c.JSON, one object
    obj = resp.json()
    text = obj["message"]["content"] if field == "message" else obj["response"]
    assert text == "".join(TOKENS)
    assert obj["done"] is True and obj["done_reason"] == "stop"
    check_metrics(obj, prompt=5 if field == "message" else 4, evals=5)
    assert backend.completed == 1


async def test_num_predict_caps_the_reply_with_done_reason_length() -> None:
    body = {**CHAT, "options": {"num_predict": 3}}
    async with ollama_backend(FAST) as backend, client_for(backend) as client:
        _, objs = await ndjson(client, "/api/chat", body)
    assert "".join(o["message"]["content"] for o in objs) == "tok0 tok1 tok2 "
    assert objs[-1]["done_reason"] == "length"
    assert objs[-1]["eval_count"] == 3


async def test_json_is_encoded_as_go_does() -> None:
    cfg = BackendConfig(tokens=["<b>", " & ", "café"], interval=0)
    async with ollama_backend(cfg) as backend, client_for(backend) as client:
        resp = await client.post("/api/chat", json={**CHAT, "stream": False})
    assert '"content":"\\u003cb\\u003e \\u0026 café"' in resp.text
    assert resp.json()["message"]["content"] == "<b> & café"
    assert resp.json()["eval_count"] == 3


async def test_openai_chat_stream_sse_with_usage() -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with (
        ollama_backend(FAST) as backend,
        client_for(backend) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as resp,
    ):
        text = (await resp.aread()).decode()
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream"
    assert resp.headers["transfer-encoding"] == "chunked"
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 5 + 2  # tokens, the finish chunk, the usage chunk
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and re.match(r"^chatcmpl-\d+$", ids.pop())
    for c in chunks:
        assert list(c)[:6] == ["id", "object", "created", "model", "system_fingerprint", "choices"]
        assert c["object"] == "chat.completion.chunk" and c["model"] == "tiny"
        assert c["system_fingerprint"] == "fp_ollama" and isinstance(c["created"], int)
    for c, token in zip(chunks[:5], TOKENS, strict=True):
        assert c["choices"] == [
            {"index": 0, "delta": {"role": "assistant", "content": token}, "finish_reason": None}
        ]
        assert "usage" not in c
    finish, usage = chunks[5], chunks[6]
    assert finish["choices"][0]["delta"]["content"] == ""
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


async def test_openai_chat_stream_without_usage_and_not_streamed() -> None:
    async with ollama_backend(FAST) as backend, client_for(backend) as client:
        streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        whole = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    events = sse_events(streamed.text)
    assert len(events) == 5 + 2 and events[-1] == "[DONE]"
    assert not any("usage" in json.loads(e) for e in events[:-1])
    assert whole.headers["content-type"] == "application/json"
    obj = whole.json()
    assert obj["object"] == "chat.completion" and re.match(r"^chatcmpl-\d+$", obj["id"])
    assert obj["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "tok0 tok1 "},
            "finish_reason": "length",
        }
    ]
    assert obj["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


async def test_openai_completions() -> None:
    body = {"model": "tiny", "prompt": "once upon a time"}
    async with ollama_backend(FAST) as backend, client_for(backend) as client:
        whole = await client.post("/v1/completions", json=body)
        streamed = await client.post(
            "/v1/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        )
    obj = whole.json()
    assert obj["object"] == "text_completion" and re.match(r"^cmpl-\d+$", obj["id"])
    assert obj["choices"] == [{"text": "".join(TOKENS), "index": 0, "finish_reason": "stop"}]
    assert obj["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:5]] == TOKENS
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[5]["choices"] == [{"text": "", "index": 0, "finish_reason": "stop"}]
    assert chunks[6]["choices"] == [] and chunks[6]["usage"]["completion_tokens"] == 5
    assert backend.completed == 2


async def test_listings() -> None:
    cfg = BackendConfig(models=["tiny:latest", "other"], version="0.5.7")
    async with ollama_backend(cfg) as backend, client_for(backend) as client:
        root = await client.get("/")
        version = (await client.get("/api/version")).json()
        tags = (await client.get("/api/tags")).json()
        ps_before = (await client.get("/api/ps")).json()
        await client.post("/api/generate", json={**GENERATE, "model": "other", "stream": False})
        ps_after = (await client.get("/api/ps")).json()
        models = (await client.get("/v1/models")).json()
    assert root.text == "Ollama is running"
    assert version == {"version": "0.5.7"}
    assert [m["name"] for m in tags["models"]] == ["tiny:latest", "other:latest"]
    for m in tags["models"]:
        assert list(m) == ["name", "model", "modified_at", "size", "digest", "details"]
        assert m["model"] == m["name"] and GO_TIME.match(m["modified_at"])
        assert re.match(r"^[0-9a-f]{64}$", m["digest"]) and m["size"] > 0
        assert m["details"]["format"] == "gguf"
    assert ps_before == {"models": []}
    [loaded] = ps_after["models"]
    assert loaded["name"] == "other:latest" and loaded["size_vram"] == loaded["size"]
    assert GO_TIME.match(loaded["expires_at"])
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
        ("tiny:latest", "model", "library"),
        ("other:latest", "model", "library"),
    ]


async def test_unknown_model_is_404_in_each_dialect() -> None:
    message = 'model "nope" not found, try pulling it first'
    async with ollama_backend(FAST) as backend, client_for(backend) as client:
        native = await client.post("/api/chat", json={**CHAT, "model": "nope"})
        generate = await client.post("/api/generate", json={**GENERATE, "model": "nope"})
        openai = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert native.status_code == generate.status_code == openai.status_code == 404
    assert native.json() == generate.json() == {"error": message}
    assert openai.json() == {
        "error": {"message": message, "type": "api_error", "param": None, "code": None}
    }
    assert len(backend.requests) == 3 and backend.completed == 0


async def test_malformed_requests_are_400() -> None:
    async with ollama_backend(FAST) as backend, client_for(backend) as client:
        empty = await client.post("/api/chat")
        garbage = await client.post("/api/chat", content=b"{not json")
        no_model = await client.post("/api/chat", json={"messages": CHAT["messages"]})
        no_messages = await client.post("/v1/chat/completions", json={"model": "tiny"})
        nowhere = await client.get("/api/nowhere")
    assert empty.status_code == garbage.status_code == no_model.status_code == 400
    assert empty.json() == {"error": "missing request body"}
    assert no_model.json() == {"error": "model is required"}
    assert no_messages.status_code == 400
    assert no_messages.json()["error"]["type"] == "invalid_request_error"
    assert nowhere.status_code == 404 and nowhere.text == "404 page not found"
    assert backend.completed == 0


async def test_empty_prompt_only_loads_the_model() -> None:
    async with ollama_backend(FAST) as backend, client_for(backend) as client:
        resp = await client.post("/api/generate", json={"model": "tiny"})
    assert resp.headers["content-type"] == "application/json; charset=utf-8"
    obj = resp.json()
    assert list(obj) == ["model", "created_at", "response", "done", "done_reason"]
    assert obj["done"] is True and obj["done_reason"] == "load" and obj["response"] == ""


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_fail_before_first_answers_with_the_status(path: str) -> None:
    cfg = BackendConfig(fail_before_first=500)
    async with ollama_backend(cfg) as backend, client_for(backend) as client:
        resp = await client.post(path, json={**CHAT, "stream": True})
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert "simulated failure" in (error if path == "/api/chat" else error["message"])
    assert backend.requests[0]["path"] == path
    assert (backend.completed, backend.cancelled, backend.in_flight) == (0, 0, 0)


async def test_die_after_truncates_the_stream() -> None:
    cfg = BackendConfig(n_tokens=10, interval=0.001, die_after=3)
    got: list[dict[str, Any]] = []
    async with ollama_backend(cfg) as backend, client_for(backend) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/api/chat", json=CHAT) as resp:
                async for line in resp.aiter_lines():
                    got.append(json.loads(line))
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/api/chat", json={**CHAT, "stream": False})
    assert [g["message"]["content"] for g in got] == TOKENS[:3]
    assert not any(g["done"] for g in got)
    assert (backend.completed, backend.cancelled, backend.in_flight) == (0, 0, 0)


async def test_client_leaving_mid_stream_is_noticed_at_once() -> None:
    # The second token is 30 s away: only the EOF watcher can notice the client leaving.
    cfg = BackendConfig(n_tokens=10, interval=30.0)
    async with ollama_backend(cfg) as backend, client_for(backend) as client:
        async with client.stream("POST", "/api/chat", json=CHAT) as resp:
            async for line in resp.aiter_lines():
                assert json.loads(line)["message"]["content"] == "tok0 "
                break
            assert backend.in_flight == 1
        with trio.fail_after(0.1):
            await backend.cancelled_event.wait()
        assert (backend.cancelled, backend.in_flight, backend.completed) == (1, 0, 0)


async def test_client_leaving_before_the_first_token_is_noticed() -> None:
    cfg = BackendConfig(first_token_delay=30.0)

    async with ollama_backend(cfg) as backend, client_for(backend) as client:

        async def ask() -> None:
            await client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            with trio.fail_after(5):
                await backend.wait_until(lambda: backend.in_flight == 1)
            nursery.cancel_scope.cancel()
        with trio.fail_after(0.1):
            await backend.wait_cancelled(1)
        assert (backend.cancelled, backend.in_flight) == (1, 0)


async def test_tokens_are_flushed_as_produced() -> None:
    cfg = BackendConfig(n_tokens=3, interval=0.25)
    arrivals: list[float] = []
    async with ollama_backend(cfg) as backend, client_for(backend) as client:
        start = trio.current_time()
        async with client.stream("POST", "/api/generate", json=GENERATE) as resp:
            async for line in resp.aiter_lines():
                if not json.loads(line)["done"]:
                    arrivals.append(trio.current_time() - start)
    assert len(arrivals) == 3
    assert arrivals[0] < 0.25  # not held back until the reply is complete (0.5 s)
    assert arrivals[-1] - arrivals[0] >= 0.4  # two intervals, as scheduled


async def test_keep_alive_and_concurrent_streams() -> None:
    cfg = BackendConfig(n_tokens=4, interval=0.02)
    async with ollama_backend(cfg) as backend:
        async with client_for(backend) as client:
            for _ in range(3):
                _, objs = await ndjson(client, "/api/chat", CHAT)
                assert objs[-1]["done"] is True
            await client.get("/api/tags")
        assert backend.connections == 1  # one connection carried all four

        async def one() -> None:
            async with client_for(backend) as own:
                _, objs = await ndjson(own, "/api/chat", CHAT)
                assert objs[-1]["eval_count"] == 4

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
            with trio.fail_after(5):
                await backend.wait_until(lambda: backend.in_flight == 3)
        assert backend.completed == 6 and backend.connections == 4


async def test_stop_closes_the_listener() -> None:
    async with ollama_backend(FAST) as backend:
        url = backend.url
        assert backend.port > 0
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{url}/api/version")
