"""The gateway against slow and greedy HTTP clients (issue 12, hole 8): a request body that
trickles or stalls is answered 408 and closed after ``gateway.read_timeout``, idle connections
cannot hold every ``gateway.max_connections`` slot, and when every slot relays a stream a
newcomer gets a 503 naming the limit. A reply being relayed is never cut by the deadline."""

from __future__ import annotations

import json

import httpx
import trio

from .support.gateway import MSG, gateway, read_until_closed
from .support.ollama_backend import BackendConfig


async def _connect(url: str) -> trio.SocketStream:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


HEAD = (
    b"POST /api/chat HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
    b"content-length: 200\r\n\r\n"
)


async def test_a_stalled_or_trickled_body_is_a_408_and_the_connection_closed() -> None:
    async with gateway(BackendConfig(), read_timeout=0.5) as (g, (backend,)):
        stream = await _connect(g.url)
        async with stream:
            await stream.send_all(HEAD + b'{"model": ')
            with trio.fail_after(20):  # generous: the gateway closes after 0.5 s
                reply = await read_until_closed(stream)
        assert _status(reply) == 408, reply
        assert b"did not arrive within 0.5 s" in reply

        stream = await _connect(g.url)
        async with stream:
            await stream.send_all(HEAD)
            reply = b""
            with trio.fail_after(20):
                for _ in range(400):  # a byte every 0.05 s: each read is quick, the body is not
                    try:
                        await stream.send_all(b" ")
                    except trio.BrokenResourceError:
                        break
                    with trio.move_on_after(0.05):
                        reply += await read_until_closed(stream)
                        break
                reply += await read_until_closed(stream)
        assert _status(reply) == 408, reply
        assert backend.requests == []  # nothing half-read ever reached a backend


async def test_a_long_stream_outlives_the_read_timeout() -> None:
    """The deadline is for the request: a client reading a reply for longer is not cut."""
    async with (
        gateway(BackendConfig(n_tokens=30, interval=0.05), read_timeout=0.5) as (g, _),
        httpx.AsyncClient(timeout=30) as client,
    ):
        body = {"model": "tiny", "messages": MSG}
        lines = []
        async with client.stream("POST", f"{g.url}/api/chat", json=body) as r:
            async for line in r.aiter_lines():
                if line.strip():
                    lines.append(json.loads(line))
        assert lines[-1]["done"] is True
        assert len(lines) == 31


async def test_idle_connections_give_way_and_busy_ones_make_a_503() -> None:
    config = BackendConfig(n_tokens=1000, interval=0.05)
    async with gateway(config, max_connections=2) as (g, (backend,)):
        idle = [await _connect(g.url) for _ in range(2)]
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.get(f"{g.url}/api/version")
                assert r.status_code == 200
            with trio.fail_after(10):  # the longest-idle connection was closed for the client
                assert await read_until_closed(idle[0]) == b""
        finally:
            for s in idle:
                await s.aclose()

        async def stream() -> None:
            async with (
                httpx.AsyncClient(timeout=30) as client,
                client.stream(
                    "POST", f"{g.url}/api/chat", json={"model": "tiny", "messages": MSG}
                ) as r,  # fmt: skip
            ):
                async for _ in r.aiter_lines():
                    pass

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(stream)
            with trio.fail_after(20):
                await backend.wait_until(lambda: backend.in_flight == 2)
            newcomer = await _connect(g.url)
            async with newcomer:
                await newcomer.send_all(b"GET /api/version HTTP/1.1\r\nhost: t\r\n\r\n")
                with trio.fail_after(20):
                    reply = await read_until_closed(newcomer)
            assert _status(reply) == 503, reply
            err = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
            assert "all 2 connections are busy" in err["message"], err
            assert backend.in_flight == 2  # the streams being relayed were not touched
            nursery.cancel_scope.cancel()
