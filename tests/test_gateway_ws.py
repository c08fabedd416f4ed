"""The gateway's WebSocket endpoint, ``/v1/ws``, driven by a client no one here wrote
(trio-websocket): several chat requests per socket, each ending with exactly one ``done``,
``cancelled`` or ``error``; cancels that stop the upstream generation; bad messages that leave the
socket usable."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url

from tensord.gateway.server import Gateway

from .support.gateway import MSG, TOKENS, gateway
from .support.ollama_backend import BackendConfig

Msg = dict[str, Any]


@asynccontextmanager
async def socket(g: Gateway, key: str | None = None) -> AsyncIterator[WebSocketConnection]:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else None
    url = g.url.replace("http://", "ws://") + "/v1/ws"
    async with open_websocket_url(url, extra_headers=headers) as ws:
        yield ws


async def say(ws: WebSocketConnection, msg: Msg) -> None:
    await ws.send_message(json.dumps(msg))


async def hear(ws: WebSocketConnection) -> Msg:
    with trio.fail_after(10):
        msg: Msg = json.loads(await ws.get_message())
    return msg


async def until_final(ws: WebSocketConnection, rid: object) -> tuple[list[str], Msg]:
    """The token contents and the final message of request ``rid`` (nothing else may come)."""
    tokens: list[str] = []
    while True:
        msg = await hear(ws)
        assert msg["id"] == rid, msg
        if msg["type"] != "token":
            return tokens, msg
        tokens.append(msg["content"])


async def test_two_requests_on_one_socket_interleave_and_each_gets_its_own_done() -> None:
    async with (
        gateway(BackendConfig(tokens=TOKENS, interval=0.01)) as (g, (backend,)),
        socket(g) as ws,
    ):
        # Usable at once: no readiness message to wait for.
        await say(ws, {"id": "a", "model": "tiny", "messages": MSG})
        await say(ws, {"id": "b", "model": "tiny", "messages": MSG})
        order: list[tuple[str, str]] = []
        got: dict[str, list[str]] = {"a": [], "b": []}
        done: dict[str, Msg] = {}
        while len(done) < 2:
            msg = await hear(ws)
            order.append((msg["type"], msg["id"]))
            if msg["type"] == "token":
                assert msg["id"] not in done  # nothing after a request's done
                got[msg["id"]].append(msg["content"])
            else:
                assert msg["type"] == "done", msg
                done[msg["id"]] = msg
    assert got == {"a": TOKENS, "b": TOKENS}
    # Interleaved: both were streaming before either finished.
    first_done = next(i for i, (kind, _) in enumerate(order) if kind == "done")
    assert {rid for kind, rid in order[:first_done]} == {"a", "b"}
    for rid in "ab":
        d = done[rid]
        assert d["done_reason"] == "stop"
        assert d["usage"]["completion_tokens"] == len(TOKENS)
        assert d["usage"]["total_tokens"] == len(TOKENS) + d["usage"]["prompt_tokens"] > len(TOKENS)
        t = d["timings"]
        assert 0 < t["ttft_ms"] < t["total_ms"] and t["tokens_per_s"] > 0
    assert (backend.completed, backend.cancelled) == (2, 0)


async def test_a_cancel_stops_one_request_upstream_and_the_other_runs_on() -> None:
    async with (
        gateway(BackendConfig(n_tokens=500, interval=0.01)) as (g, (backend,)),
        socket(g) as ws,
    ):
        await say(ws, {"id": "long", "model": "tiny", "messages": MSG})
        await say(ws, {"id": "short", "model": "tiny", "messages": MSG,
                       "options": {"num_predict": 30}})  # fmt: skip
        tokens = {"long": 0, "short": 0}
        after_cancel = {"long": 0, "short": 0}
        final: dict[str, Msg] = {}
        cancelled = False
        while len(final) < 2:
            msg = await hear(ws)
            if msg["type"] != "token":
                final[msg["id"]] = msg
                continue
            assert msg["id"] not in final
            tokens[msg["id"]] += 1
            after_cancel[msg["id"]] += cancelled
            if msg["id"] == "long" and tokens["long"] == 3 and not cancelled:
                await say(ws, {"type": "cancel", "id": "long"})
                cancelled = True
        with trio.fail_after(2):
            await backend.wait_cancelled(1)
    # The cancelled request's count is exactly the tokens the client was sent.
    assert final["long"] == {"type": "cancelled", "id": "long", "tokens": tokens["long"]}
    assert final["short"]["type"] == "done" and final["short"]["done_reason"] == "length"
    assert tokens["short"] == final["short"]["usage"]["completion_tokens"] == 30
    assert after_cancel["short"] > 0  # still streaming after the other one was cancelled
    assert (backend.cancelled, backend.completed, backend.in_flight) == (1, 1, 0)


async def test_bad_messages_get_errors_and_the_socket_stays_usable() -> None:
    async with (
        gateway(BackendConfig(tokens=TOKENS[:3], interval=0.0)) as (g, _),
        socket(g) as ws,
    ):
        await ws.send_message("{not json")
        msg = await hear(ws)
        assert (msg["type"], msg["code"], msg["id"]) == ("error", "bad_message", None)
        await ws.send_message(b"[1, 2]")  # binary frames are read as UTF-8 JSON too
        assert (await hear(ws))["code"] == "bad_message"
        await say(ws, {"id": True, "model": "tiny", "messages": MSG})
        assert (await hear(ws))["code"] == "bad_message"
        await say(ws, {"type": "ping", "id": "x"})
        msg = await hear(ws)
        assert (msg["code"], msg["id"]) == ("unknown_type", "x") and "ping" in msg["error"]
        # A cancel of a request that is not running is ignored (it may have just ended); one
        # without an id is an error - the next reply proves the first got none.
        await say(ws, {"type": "cancel", "id": "nobody"})
        await say(ws, {"type": "cancel"})
        assert (await hear(ws))["code"] == "bad_message"
        # None of that used up a number: the first request without an id is "1".
        await say(ws, {"model": "tiny", "messages": MSG})
        tokens, done = await until_final(ws, "1")
        assert tokens == TOKENS[:3] and done["type"] == "done"
        # An integer id comes back as an integer; "type": "chat" is the default made explicit.
        await say(ws, {"type": "chat", "id": 7, "model": "tiny", "messages": MSG})
        tokens, done = await until_final(ws, 7)
        assert tokens == TOKENS[:3] and done["type"] == "done"
        await say(ws, {"model": "tiny", "messages": MSG})
        assert (await until_final(ws, "2"))[1]["type"] == "done"


async def test_errors_before_a_request_starts_and_a_duplicate_id() -> None:
    async with (
        gateway(BackendConfig(n_tokens=500, interval=0.01)) as (g, (backend,)),
        socket(g) as ws,
    ):
        await say(ws, {"id": "m", "model": "absent", "messages": MSG})
        msg = await hear(ws)
        assert (msg["type"], msg["id"], msg["code"]) == ("error", "m", "no_backend")
        assert "absent" in msg["error"]
        await say(ws, {"id": "n", "messages": MSG})
        msg = await hear(ws)
        assert (msg["type"], msg["id"], msg["code"]) == ("error", "n", "bad_request")
        # An id still running is refused; the running request is left alone.
        await say(ws, {"id": "d", "model": "tiny", "messages": MSG})
        assert (await hear(ws))["type"] == "token"
        await say(ws, {"id": "d", "model": "tiny", "messages": MSG})
        while (msg := await hear(ws))["type"] == "token":
            pass
        assert (msg["type"], msg["id"], msg["code"]) == ("error", "d", "duplicate_id")
        assert (await hear(ws))["type"] == "token"  # the first "d" streams on
        await say(ws, {"type": "cancel", "id": "d"})
        while (msg := await hear(ws))["type"] == "token":
            pass
        assert (msg["type"], msg["id"]) == ("cancelled", "d")
        # Once it has ended, the id is free again.
        await say(ws, {"id": "d", "model": "tiny", "messages": MSG,
                       "options": {"num_predict": 2}})  # fmt: skip
        tokens, done = await until_final(ws, "d")
        assert tokens == ["tok0 ", "tok1 "] and done["type"] == "done"
    assert len(backend.requests) == 2  # the refused duplicate never reached the backend


async def test_closing_the_socket_cancels_its_requests_upstream() -> None:
    async with gateway(BackendConfig(n_tokens=500, interval=0.01)) as (g, (backend,)):
        async with socket(g) as ws:
            await say(ws, {"id": "a", "model": "tiny", "messages": MSG})
            await say(ws, {"id": "b", "model": "tiny", "messages": MSG})
            seen = set()
            while len(seen) < 2:
                seen.add((await hear(ws))["id"])
        # The socket is closed: both generations stop at the backend.
        with trio.fail_after(2):
            await backend.wait_cancelled(2)
        assert (backend.in_flight, backend.completed) == (0, 0)


async def test_the_websocket_needs_an_api_key_when_keys_are_set(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k-123\n")
    fast = BackendConfig(tokens=TOKENS[:2], interval=0.0)
    async with gateway(fast, api_keys_file=keys) as (g, _):
        for key in (None, "wrong"):
            with pytest.raises(ConnectionRejected) as rejected:
                async with socket(g, key):
                    pass
            assert rejected.value.status_code == 403
        async with socket(g, "k-123") as ws:
            await say(ws, {"model": "tiny", "messages": MSG})
            tokens, done = await until_final(ws, "1")
            assert tokens == TOKENS[:2] and done["type"] == "done"
