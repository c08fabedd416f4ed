"""The gateway's own HTTP/1.1 server: the sans-I/O request-head parser (every split of the bytes
gives the same head; every bound; hostile input is a 4xx, never another exception), the reply's
framing read back by the gateway's own client reader, and the server on a real socket -
keep-alive, one write per relayed read, HTTP/1.0, ``Expect: 100-continue``, ``HEAD``, and the
requests it refuses itself (pipelined, garbage, a chunked body, oversized heads and bodies, a
head that stalls), each answered and closed while the gateway serves on."""

from __future__ import annotations

import contextlib
import json
import random
import struct

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tensord import metrics
from tensord.gateway import relay as relay_module
from tensord.gateway.encoders import OTHER, TOKEN, carries_output, line_kind
from tensord.gateway.h1 import (
    MAX_HEADERS,
    MAX_REQUEST_HEAD,
    MAX_TARGET,
    BadRequest,
    ResponseReader,
    chunk,
    parse_request_head,
    response_head,
)

from .support.gateway import MSG, TOKENS, gateway, read_until_closed
from .support.ollama_backend import BackendConfig, go_json

REQUEST = (
    b"POST /api/chat?x=1 HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer k\r\nContent-Length: 2\r\n\r\n{}"
)
LIMIT = 1 << 20


# -- the parser -------------------------------------------------------------------------------


def test_a_request_head_is_parsed_with_its_length() -> None:
    parsed = parse_request_head(REQUEST, LIMIT)
    assert parsed is not None
    head, size = parsed
    assert REQUEST[size:] == b"{}"
    assert (head.method, head.path, head.query, head.target) == (
        "POST", "/api/chat", b"x=1", b"/api/chat?x=1"
    )  # fmt: skip
    assert head.http11 and head.keep_alive and head.content_length == 2
    assert (b"authorization", b"Bearer k") in head.headers  # names lower-cased, values kept
    assert not head.upgrade and not head.expect_continue


@given(st.integers(0, len(REQUEST) - 3))
def test_a_head_cut_anywhere_is_incomplete_and_whole_it_is_the_same(cut: int) -> None:
    assert parse_request_head(REQUEST[:cut], LIMIT) is None
    whole = parse_request_head(REQUEST, LIMIT)
    assert parse_request_head(REQUEST[:-2], LIMIT) == whole  # the body is not needed
    assert parse_request_head(REQUEST + b"GET / HTTP/1.1\r\n", LIMIT) == whole


def test_percent_escapes_absolute_targets_and_leading_blank_lines() -> None:
    parsed = parse_request_head(b"\r\nGET http://gw:1/v1/m%6Fdels HTTP/1.1\r\n\r\n", LIMIT)
    assert parsed is not None and parsed[0].path == "/v1/models"


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        (b"HTTP/1.1", b"", True),
        (b"HTTP/1.1", b"connection: Close\r\n", False),
        (b"HTTP/1.1", b"connection: keep-alive, close\r\n", False),
        (b"HTTP/1.0", b"", False),
        (b"HTTP/1.0", b"connection: Keep-Alive\r\n", True),
    ],
)
def test_keep_alive_as_http_has_it(version: bytes, connection: bytes, keep_alive: bool) -> None:
    parsed = parse_request_head(b"GET / " + version + b"\r\n" + connection + b"\r\n", LIMIT)
    assert parsed is not None and parsed[0].keep_alive is keep_alive


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"x" * (MAX_REQUEST_HEAD + 1), 431),
        (b"GET / HTTP/1.1\r\n" + b"a: b\r\n" * (MAX_HEADERS + 1) + b"\r\n", 400),
        (b"GET /" + b"a" * MAX_TARGET + b" HTTP/1.1\r\n\r\n", 414),
        (b"POST / HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % (LIMIT + 1), 413),
        (b"POST / HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ncontent-length: +5\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ncontent-length: 0x5\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ncontent-length: 1_0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", 411),
        (b"GET / HTTP/1.1\r\nx: a\r\n  folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nbad name: v\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nx: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nx: a\nb: c\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n: v\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / FTP/1.1\r\n\r\n", 400),
        (b"get / HTTP/1.1\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\n\r\n", 400),
        (b"GET relative HTTP/1.1\r\n\r\n", 400),
        (b"GET /a\tb HTTP/1.1\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to a plain port
        (b"\r\n\r\n", 400),
    ],
)
def test_a_request_outside_the_bounds_is_refused_with_its_status(raw: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request_head(raw, LIMIT)
    assert caught.value.status == status
    assert str(caught.value) and not str(caught.value).endswith(":")


@given(st.binary(max_size=300))
def test_any_bytes_are_a_head_more_to_come_or_a_bad_request(raw: bytes) -> None:
    try:
        parsed = parse_request_head(raw, LIMIT)
    except BadRequest as exc:
        assert 400 <= exc.status < 600
    else:
        assert parsed is None or parsed[1] <= len(raw)


NOISE = [b"GET", b"POST", b" ", b"/", b"\r\n", b"HTTP/1.1", b"a", b":", b"content-length", b"9",
         b"\x00", b"%", b"?"]  # fmt: skip


@given(st.lists(st.sampled_from(NOISE), max_size=30))
def test_request_like_noise_is_a_head_more_to_come_or_a_bad_request(parts: list[bytes]) -> None:
    raw = b"".join(parts) + b"\r\n\r\n"
    try:
        parsed = parse_request_head(raw, LIMIT)
    except BadRequest:
        return
    assert parsed is not None and parsed[0].path.startswith("/")


# -- the reply's framing ------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=300), max_size=8))
def test_chunks_written_here_read_back_the_same(pieces: list[bytes]) -> None:
    raw = response_head(200, [(b"transfer-encoding", b"chunked")])
    raw += b"".join(chunk(p) for p in pieces) + chunk(b"", last=True)
    reader = ResponseReader()
    assert reader.feed(raw) == b"".join(pieces) and reader.done


def test_a_newline_in_a_reply_header_is_refused() -> None:
    with pytest.raises(ValueError):
        response_head(200, [(b"x", b"a\r\nset-cookie: evil")])


# -- the token-line fast path ---------------------------------------------------------------------


def _slow_kind(line: bytes, sse: bool) -> str:
    """What line_kind answers by parsing (the reference its fast path must agree with)."""
    text = line[5:].strip() if sse else line
    obj = json.loads(text)
    return TOKEN if carries_output(obj) and "error" not in obj else OTHER


@given(st.text(max_size=20), st.text(max_size=10), st.booleans())
def test_token_lines_are_classified_as_parsing_them_would(
    content: str, model: str, openai: bool
) -> None:
    if openai:
        obj: dict[str, object] = {
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 17, "model": model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": content},
                         "finish_reason": None}],
        }  # fmt: skip
        line = b"data: " + go_json(obj)
    else:
        obj = {"model": model, "created_at": "2026-12-07T11:59:29.1Z",
               "message": {"role": "assistant", "content": content}, "done": False}  # fmt: skip
        line = go_json(obj)
    assert line_kind(line, openai) == _slow_kind(line, openai)


# -- the server on a real socket ------------------------------------------------------------------


async def _connect(url: str) -> trio.SocketStream:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def _read_until_closed(stream: trio.SocketStream) -> bytes:
    with trio.fail_after(20):
        return await read_until_closed(stream)


async def _read_reply(stream: trio.SocketStream) -> tuple[ResponseReader, bytes]:
    """One reply from a kept-alive connection: its reader and its body."""
    reader = ResponseReader()
    body = b""
    with trio.fail_after(20):
        while not reader.done:
            data = await stream.receive_some(65536)
            assert data, "the gateway closed the connection before the reply ended"
            body += reader.feed(data)
    return reader, body


def _chat(body: object, *, version: bytes = b"HTTP/1.1", extra: bytes = b"") -> bytes:
    raw = json.dumps(body).encode()
    return (
        b"POST /api/chat " + version + b"\r\nhost: gw\r\ncontent-type: application/json\r\n"
        + extra + b"content-length: %d\r\n\r\n" % len(raw) + raw
    )  # fmt: skip


async def test_requests_on_one_kept_alive_connection_and_a_streamed_reply_is_chunked() -> None:
    fast = BackendConfig(tokens=TOKENS[:5], interval=0.0)
    async with gateway(fast) as (g, (backend,)):
        stream = await _connect(g.url)
        async with stream:
            for _ in range(2):
                await stream.send_all(_chat({"model": "tiny", "messages": MSG}))
                reader, body = await _read_reply(stream)
                assert reader.head is not None and reader.head.status == 200
                assert reader.head.header(b"transfer-encoding") == b"chunked"
                assert reader.head.keep_alive and reader.head.header(b"date")
                lines = [json.loads(line) for line in body.splitlines()]
                assert "".join(x["message"]["content"] for x in lines) == "".join(TOKENS[:5])
            await stream.send_all(b"GET /api/version HTTP/1.1\r\nhost: gw\r\n\r\n")
            reader, body = await _read_reply(stream)
            assert json.loads(body) == {"version": "0.5.7"}
        assert len(backend.requests) == 2


async def test_http_1_0_gets_a_close_delimited_stream() -> None:
    fast = BackendConfig(tokens=TOKENS[:3], interval=0.0)
    async with gateway(fast) as (g, _):
        stream = await _connect(g.url)
        async with stream:
            await stream.send_all(_chat({"model": "tiny", "messages": MSG}, version=b"HTTP/1.0"))
            raw = await _read_until_closed(stream)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower()
        assert b"connection: close" in head.lower()
        assert [json.loads(x)["done"] for x in body.splitlines()] == [False] * 3 + [True]


async def test_expect_100_continue_and_head() -> None:
    async with gateway(BackendConfig(tokens=TOKENS[:2], interval=0.0)) as (g, _):
        stream = await _connect(g.url)
        async with stream:
            raw = _chat({"model": "tiny", "messages": MSG}, extra=b"expect: 100-continue\r\n")
            head, _, body = raw.partition(b"\r\n\r\n")
            await stream.send_all(head + b"\r\n\r\n")
            with trio.fail_after(20):
                interim = await stream.receive_some(65536)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"  # asked for before the body
            await stream.send_all(body)
            reader, got = await _read_reply(stream)
            assert reader.head is not None and reader.head.status == 200
            assert json.loads(got.splitlines()[-1])["done"] is True

            await stream.send_all(
                b"HEAD /api/version HTTP/1.1\r\nhost: gw\r\n\r\n"
                b"GET /api/version HTTP/1.1\r\nhost: gw\r\n\r\n"
            )
            raw_reply = await _read_until_closed(stream)
        # HEAD: the head only; the GET sent with it is refused as pipelined.
        assert raw_reply.startswith(b"HTTP/1.1 404 ")
        first_head, _, rest = raw_reply.partition(b"\r\n\r\n")
        assert b"content-length" in first_head and rest.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /api/version HTTP/1.1\r\n\r\nGET /api/version HTTP/1.1\r\n\r\n", 200),
        (b"hello there\r\n\r\n", 400),
        (b"POST /api/chat HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", 411),
        (b"GET / HTTP/1.1\r\nx: " + b"y" * MAX_REQUEST_HEAD, 431),
        (b"POST /api/chat HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\n{", 413),
    ],
)
async def test_what_the_server_refuses_is_answered_and_closed(raw: bytes, status: int) -> None:
    async with gateway(BackendConfig()) as (g, (backend,)):
        stream = await _connect(g.url)
        async with stream:
            await stream.send_all(raw)
            reply = await _read_until_closed(stream)
        assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:200]
        if status == 200:  # pipelined: the first is answered, what came with it is refused
            assert reply.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 400 " in reply
            assert b"pipelining is not supported" in reply
        else:
            err = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
            assert err if status == 413 else err["message"]  # /api/chat's shape: a string
            assert b"connection: close" in reply.lower()
        assert backend.requests == []
        # ... and the gateway serves on.
        stream = await _connect(g.url)
        async with stream:
            await stream.send_all(b"GET /api/version HTTP/1.1\r\nhost: gw\r\n\r\n")
            reader, body = await _read_reply(stream)
        assert reader.head is not None and reader.head.status == 200 and b"version" in body


async def test_a_head_that_stalls_is_a_408_and_a_silent_connection_is_closed() -> None:
    async with gateway(BackendConfig(), read_timeout=0.3) as (g, _):
        stream = await _connect(g.url)
        async with stream:
            await stream.send_all(b"GET /api/version HTTP/1.1\r\nhost: ")
            reply = await _read_until_closed(stream)
        assert reply.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 0.3 s" in reply
        stream = await _connect(g.url)
        async with stream:
            assert await _read_until_closed(stream) == b""


# -- the relay ------------------------------------------------------------------------------------


async def test_a_client_that_reads_slowly_gets_every_byte_in_order() -> None:
    """A fast stream of 4 MB to a client with a 4 KiB receive buffer: the client's socket
    fills up, the relay hands the rest to the request's task (an awaited write) and stops
    reading that backend until it went out - nothing lost, nothing reordered."""
    tokens = [f"{i:06d}" + "x" * 4000 for i in range(1000)]
    async with gateway(BackendConfig(tokens=tokens, interval=0.0)) as (g, _):
        host, port = g.url.removeprefix("http://").rsplit(":", 1)
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        stream = trio.SocketStream(sock)
        async with stream:
            await stream.send_all(_chat({"model": "tiny", "messages": MSG}))
            reader = ResponseReader()
            body = b""
            with trio.fail_after(60):
                while not reader.done:
                    data = await stream.receive_some(1024)
                    assert data
                    body += reader.feed(data)
        lines = [json.loads(line) for line in body.splitlines()]
        assert [x["message"]["content"] for x in lines[:-1]] == tokens
        assert lines[-1]["done"] is True
        assert g.relay is not None and g.relay.backpressured > 0


async def test_a_client_that_resets_mid_stream_cancels_upstream() -> None:
    async with gateway(BackendConfig(n_tokens=500, interval=0.01)) as (g, (backend,)):
        stream = await _connect(g.url)
        await stream.send_all(_chat({"model": "tiny", "messages": MSG}))
        reader = ResponseReader()
        body = b""
        with trio.fail_after(20):
            while body.count(b"\n") < 3:
                body += reader.feed(await stream.receive_some(65536))
        # An abortive close: the gateway's next write or read of it fails with a reset.
        stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))  # fmt: skip
        await stream.aclose()
        with trio.fail_after(20):
            await backend.wait_cancelled(1)
        assert backend.completed == 0
        async with httpx.AsyncClient(timeout=30) as client:  # the gateway serves on
            r = await client.get(f"{g.url}/api/version")
            assert r.status_code == 200


async def test_the_gateway_stops_cleanly_with_streams_in_the_relay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors = metrics.UNEXPECTED_ERRORS.labels("gateway")
    before = errors._value.get()
    async with gateway(BackendConfig(n_tokens=500, interval=0.01)) as (g, _):
        streams = []
        for _ in range(3):
            stream = await _connect(g.url)
            streams.append(stream)
            await stream.send_all(_chat({"model": "tiny", "messages": MSG}))
            reader = ResponseReader()
            body = b""
            with trio.fail_after(20):
                while body.count(b"\n") < 2:  # past the first line: in the relay
                    body += reader.feed(await stream.receive_some(65536))
    # The gateway stopped under them: each connection ends, nothing was reported as a bug.
    for stream in streams:
        rest = await _read_until_closed(stream)  # it ends (within _read_until_closed's bound)
        assert not rest.endswith(b"0\r\n\r\n")  # cut, not completed
        await stream.aclose()
    assert errors._value.get() == before
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_bug_in_the_relay_ends_that_stream_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Something unexpected raised while the relay thread handles a stream: the bug is logged
    and counted, that reply ends with an error, and the relay and gateway go on serving."""
    errors = metrics.UNEXPECTED_ERRORS.labels("gateway")
    before = errors._value.get()
    broken = relay_module._Route.readable
    calls = [0]

    def readable_once_broken(self: relay_module._Route) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("a bug in the relay")
        broken(self)

    monkeypatch.setattr(relay_module._Route, "readable", readable_once_broken)
    chat = {"model": "tiny", "messages": MSG}
    async with (
        gateway(BackendConfig(n_tokens=20, interval=0.01)) as (g, _),
        httpx.AsyncClient(timeout=30) as client,
    ):
        first = await client.post(f"{g.url}/api/chat", json=chat)
        lines = [json.loads(line) for line in first.text.splitlines()]
        assert "error" in lines[-1]  # that stream ended with an error, not a hang
        again = await client.post(f"{g.url}/api/chat", json=chat)
        done = [json.loads(line) for line in again.text.splitlines()]
        assert done[-1]["done"] is True and len(done) == 21  # the relay serves on
    assert errors._value.get() == before + 1


async def test_a_bug_after_the_reply_started_is_reported_once_and_cuts_that_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in the app once a streamed reply is under way: no second reply is started (that
    was a second bug), the client sees its reply cut, and the gateway serves on."""
    errors = metrics.UNEXPECTED_ERRORS.labels("gateway")
    before = errors._value.get()

    async def broken_pump(*args: object) -> None:
        raise RuntimeError("a bug after the first line")

    chat = {"model": "tiny", "messages": MSG}
    async with gateway(BackendConfig(n_tokens=20, interval=0.01)) as (g, _):
        monkeypatch.setattr(relay_module.Relay, "pump", broken_pump)
        async with httpx.AsyncClient(timeout=30) as client:
            with pytest.raises(httpx.RemoteProtocolError):  # cut mid-body
                await client.post(f"{g.url}/api/chat", json=chat)
        monkeypatch.undo()
        async with httpx.AsyncClient(timeout=30) as client:
            again = await client.post(f"{g.url}/api/chat", json=chat)
            assert json.loads(again.text.splitlines()[-1])["done"] is True
    assert errors._value.get() == before + 1


HOSTILE = [
    b"GET / HTTP/1.1\r\nhost: x\r\n\r\n" * 3,
    b'POST /api/chat HTTP/1.1\r\ncontent-length: 5\r\n\r\n{"mo' + b"\x00" * 10,
    b"POST /api/chat HTTP/1.1\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n{}}",
    b"\x00\xff" * 300,
    b"GET /%ff%fe%00 HTTP/1.1\r\n\r\n",
    b"GET /api/version HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGARBAGE\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 12\r\n\r\n[1, 2, 3, 4]",
    b"POST /api/generate HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
    b"GET /v1/ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\n\r\n",
]


async def test_hostile_bytes_in_any_split_are_answered_and_break_nothing() -> None:
    rng = random.Random(15)
    errors = metrics.UNEXPECTED_ERRORS.labels("gateway")
    before = errors._value.get()
    async with gateway(BackendConfig(), read_timeout=0.5) as (g, _):
        for raw in HOSTILE:
            stream = await _connect(g.url)
            async with stream:
                pos = 0
                with contextlib.suppress(trio.BrokenResourceError):
                    while pos < len(raw):
                        step = rng.randint(1, 40)
                        await stream.send_all(raw[pos : pos + step])
                        pos += step
                reply = await _read_until_closed(stream)
            assert reply == b"" or reply.startswith(b"HTTP/1.1 "), (raw[:40], reply[:80])
        assert errors._value.get() == before
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{g.url}/api/chat", json={"model": "tiny", "messages": MSG})
            assert r.status_code == 200 and r.text.count("\n") == len(TOKENS) + 1


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_a_body_over_the_limit_is_refused_in_the_endpoints_shape(path: str) -> None:
    async with gateway(BackendConfig()) as (g, _):
        stream = await _connect(g.url)
        async with stream:
            await stream.send_all(
                b"POST " + path.encode() + b" HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n{"
            )
            reply = await _read_until_closed(stream)
    assert reply.startswith(b"HTTP/1.1 413 ")
    err = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
    if path.startswith("/v1/"):  # OpenAI's, as the app answers its own errors
        assert err["type"] == "invalid_request_error" and "over" in err["message"]
    else:  # Ollama's
        assert isinstance(err, str) and "over" in err
