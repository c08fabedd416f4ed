"""The gateway's own upstream HTTP/1.1: the sans-I/O reply reader (every split of the bytes
gives the same head and body; every number from the backend bounded; a reply cut short is an
error, never a short body taken for a whole one), complete lines passed through as they came,
and the connection pool against a real server that closes kept-alive connections."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tensord.gateway.encoders import LineSplitter
from tensord.gateway.h1 import MAX_HEAD, ProtocolError, ResponseReader, request_bytes
from tensord.gateway.http_client import UpstreamError, UpstreamPool

LINES = [b'{"message":{"content":"tok%d "},"done":false}\n' % i for i in range(5)]


def chunked(pieces: list[bytes], head: bytes = b"HTTP/1.1 200 OK\r\n") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return head + b"transfer-encoding: chunked\r\ncontent-type: x\r\n\r\n" + body + b"0\r\n\r\n"


def read(raw: bytes, cuts: list[int]) -> tuple[ResponseReader, bytes]:
    reader = ResponseReader()
    body = b""
    last = 0
    for cut in [*sorted(set(cuts)), len(raw)]:
        body += reader.feed(raw[last:cut])
        last = cut
    return reader, body


@given(st.lists(st.integers(0, 400), max_size=12))
def test_a_chunked_reply_reads_the_same_however_it_is_split(cuts: list[int]) -> None:
    raw = chunked(LINES)
    reader, body = read(raw, [c for c in cuts if c < len(raw)])
    assert reader.done
    assert reader.head is not None and reader.head.status == 200 and reader.head.keep_alive
    assert reader.head.header(b"content-type") == b"x"
    assert body == b"".join(LINES)


def test_a_read_holding_several_tokens_is_one_piece_of_body() -> None:
    reader = ResponseReader()
    raw = chunked(LINES)
    head_end = raw.index(b"\r\n\r\n") + 4
    assert reader.feed(raw[:head_end]) == b""
    assert reader.feed(raw[head_end:]) == b"".join(LINES)
    assert reader.done


def test_content_length_close_delimited_and_bodiless_replies() -> None:
    reader, body = read(b"HTTP/1.1 404 Not Found\r\ncontent-length: 5\r\n\r\nnope", [20])
    assert (reader.head and reader.head.status, body, reader.done) == (404, b"nope", False)
    reader, body = read(b"HTTP/1.1 400 Bad\r\ncontent-length: 4\r\n\r\nnope", [3, 30])
    assert (body, reader.done) == (b"nope", True)
    reader, body = read(b"HTTP/1.0 200 OK\r\n\r\nall of it", [])
    assert body == b"all of it" and not reader.done
    assert reader.head is not None and not reader.head.keep_alive
    reader.eof()
    assert reader.done
    reader, body = read(b"HTTP/1.1 204 No Content\r\n\r\n", [])
    assert reader.done and body == b""
    reader, _ = read(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n", [])
    assert reader.head is not None and not reader.head.keep_alive and reader.done


def test_an_interim_reply_is_skipped() -> None:
    reader, body = read(b"HTTP/1.1 100 Continue\r\n\r\n" + chunked([b"a\n"]), [10, 30])
    assert reader.head is not None and reader.head.status == 200 and body == b"a\n"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-1\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n+5\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1_0\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nfffffffffffffff\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"1" * 5000,
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1;" + b"x" * 5000 + b"\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXY",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1 2\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"x: " + b"y" * MAX_HEAD,
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nab",
    ],
)
def test_a_reply_outside_the_bounds_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        ResponseReader().feed(raw)
    assert str(caught.value) and not str(caught.value).endswith(":")


@pytest.mark.parametrize("cut", [5, 40, 60, 70])
def test_a_reply_cut_short_is_an_error_at_eof(cut: int) -> None:
    reader = ResponseReader()
    reader.feed(chunked(LINES)[:cut])
    with pytest.raises(ProtocolError, match="closed the connection"):
        reader.eof()


def test_a_request_is_one_write_with_its_length() -> None:
    raw = request_bytes("POST", "gpu:11434", "/api/chat", b"{}", "application/json")
    head, body = raw.split(b"\r\n\r\n")
    assert head.startswith(b"POST /api/chat HTTP/1.1\r\nhost: gpu:11434\r\n")
    assert b"content-length: 2" in head and body == b"{}"


@given(st.lists(st.integers(0, len(b"".join(LINES))), max_size=8))
def test_complete_lines_pass_through_as_they_came(cuts: list[int]) -> None:
    data = b"".join(LINES).replace(b"tok2", b"tok2\r")
    splitter = LineSplitter()
    out, lines, last = b"", [], 0
    for cut in [*sorted(set(cuts)), len(data)]:
        got, passed = splitter.feed_through(data[last:cut])
        lines += got
        out += passed
        last = cut
    assert out == data  # nothing re-framed, nothing held back once its line is complete
    assert lines == [line.rstrip(b"\r") for line in data.split(b"\n")[:-1]]
    whole, passed = LineSplitter().feed_through(data)
    assert passed is data and len(whole) == len(LINES)


async def _serve_then_close(
    replies: int, accepted: list[int], task_status: trio.TaskStatus[int]
) -> None:
    """A real HTTP server that answers ``replies`` requests per connection, then closes it."""

    async def handle(stream: trio.SocketStream) -> None:
        accepted.append(1)
        async with stream:
            for _ in range(replies):
                data = b""
                while b"\r\n\r\n" not in data:
                    more = await stream.receive_some(65536)
                    if not more:
                        return
                    data += more
                length = int(data.split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(data.split(b"\r\n\r\n", 1)[1]) < length:
                    data += await stream.receive_some(65536)
                await stream.send_all(chunked([b"ok\n", data.split(b"\r\n\r\n", 1)[1]]))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


async def _post(pool: UpstreamPool, url: str, body: bytes) -> bytes:
    async with pool.post(url, body) as r:
        assert r.status == 200
        return b"".join([piece async for piece in r.chunks()])


async def test_the_pool_reuses_a_connection_and_replaces_one_the_backend_closed() -> None:
    async with trio.open_nursery() as nursery:
        keeps: list[int] = []
        port = await nursery.start(_serve_then_close, 3, keeps)
        pool = UpstreamPool()
        url = f"http://127.0.0.1:{port}/api/chat"
        for i in range(5):
            assert await _post(pool, url, b"%d" % i) == b"ok\n%d" % i
        assert len(keeps) == 2  # 3 requests on the first connection, then a fresh one
        closes: list[int] = []
        port = await nursery.start(_serve_then_close, 1, closes)
        url = f"http://127.0.0.1:{port}/api/chat"
        for i in range(3):  # each kept connection is closed by the server after one reply
            assert await _post(pool, url, b"%d" % i) == b"ok\n%d" % i
        assert len(closes) == 3
        pool.close()
        nursery.cancel_scope.cancel()


async def test_a_backend_that_is_not_there_is_an_upstream_error() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with pytest.raises(UpstreamError, match="could not connect"):
        async with UpstreamPool().post(f"http://127.0.0.1:{port}/api/chat", b"{}"):
            pass
