"""Bad input from a peer: a clear protocol error back, the connection closed, nothing stored,
and the node keeps serving everyone else."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from tensord.wire import Begin, Chunk, End, Hello, encode
from tensord.wire.crc import crc32c
from tensord.wire.meta import TensorMeta

from .support.helpers import fast_settings, running
from .support.raw_peer import RawPeer, header, unauthenticated

META = TensorMeta("victim", "<f4", (4,), 16)
BEGIN = Begin("ab" * 8, META, 4096, 4)

HOSTILE = {
    "garbage msgpack": (b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", "protocol"),
    "huge header length": (b"\xff\xff\xff\xff", "too_large"),
    "header is a list": (header([1, 2, 3]), "protocol"),  # type: ignore[dict-item]
    "unknown message type": (header({"t": "launch_missiles"}), "unknown_message"),
    "chunk without begin": (
        encode(Chunk("ab" * 8, 0, 0, 16, 16, 0)) + b"\x00" * 16,
        "protocol",
    ),
    "end without begin": (encode(End("ab" * 8, 0)), "protocol"),
    "begin with shape/nbytes mismatch": (
        header(
            {
                "t": "begin",
                "id": "ab" * 8,
                "cs": 4096,
                "w": 4,
                "meta": {"name": "x", "dtype": "<f4", "shape": [1000], "nbytes": 4},
            }
        ),
        "bad_meta",
    ),
    "begin with object dtype": (
        header(
            {
                "t": "begin",
                "id": "ab" * 8,
                "cs": 4096,
                "w": 4,
                "meta": {"name": "x", "dtype": "|O", "shape": [1], "nbytes": 8},
            }
        ),
        "bad_dtype",
    ),
    "begin with path traversal name": (
        header(
            {
                "t": "begin",
                "id": "ab" * 8,
                "cs": 4096,
                "w": 4,
                "meta": {"name": "../../etc/passwd", "dtype": "<f4", "shape": [1], "nbytes": 4},
            }
        ),
        "bad_name",
    ),
    "tensor larger than the limit": (
        header(
            {
                "t": "begin",
                "id": "ab" * 8,
                "cs": 4096,
                "w": 4,
                "meta": {"name": "x", "dtype": "<u1", "shape": [1 << 50], "nbytes": 1 << 50},
            }
        ),
        "too_large",
    ),
    "chunk size below minimum": (encode(Begin("ab" * 8, META, 16, 4)), "too_large"),
    "chunk at a wrong offset": (
        encode(BEGIN) + encode(Chunk("ab" * 8, 0, 8, 16, 16, 0)) + b"\x00" * 16,
        "protocol",
    ),
    "chunk index out of range": (
        encode(BEGIN) + encode(Chunk("ab" * 8, 5, 5 * 4096, 16, 16, 0)) + b"\x00" * 16,
        "protocol",
    ),
    "chunk of another transfer": (
        encode(BEGIN) + encode(Chunk("cd" * 8, 0, 0, 16, 16, 0)) + b"\x00" * 16,
        "protocol",
    ),
    "compressed chunk that is not lz4": (
        encode(BEGIN)
        + encode(Chunk("ab" * 8, 0, 0, 16, 8, crc32c(b"\x00" * 8), True))
        + b"\x00" * 8,
        "protocol",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_input_gets_an_error_and_a_close(case: str) -> None:
    data, code = HOSTILE[case]
    async with running(unauthenticated()) as node, running(unauthenticated()) as good:
        peer = await RawPeer.connect(node.port)
        await peer.stream.send_all(data)
        err = await peer.expect_error_then_close(code)
        assert err.message  # says what was wrong
        assert node.tensor_names() == []
        # everyone else is still served
        await good.send_tensor(node.addr, "fine", np.ones(4, np.float32))
        assert np.array_equal(node.get_tensor("fine"), np.ones(4, np.float32))


async def test_wrong_protocol_name_is_refused_in_the_handshake() -> None:
    async with running(unauthenticated()) as node:
        peer = await RawPeer.connect(node.port, hello=False)
        await peer.stream.send_all(encode(Hello("http", (1,), "x", frozenset(), 4096)))
        await peer.expect_error_then_close("bad_protocol")


async def test_not_a_hello_first_is_refused() -> None:
    async with running(unauthenticated()) as node:
        peer = await RawPeer.connect(node.port, hello=False)
        await peer.stream.send_all(encode(End("ab" * 8, 0)))
        with trio.fail_after(5):
            assert await peer.stream.receive_some(65536) == b""


async def test_truncated_frame_then_close_leaves_nothing() -> None:
    async with running(unauthenticated()) as node, running(unauthenticated()) as good:
        peer = await RawPeer.connect(node.port)
        frame = encode(BEGIN) + encode(Chunk("ab" * 8, 0, 0, 16, 16, 0))
        await peer.stream.send_all(frame + b"\x00" * 7)  # 9 payload bytes missing
        await peer.stream.aclose()
        await good.send_tensor(node.addr, "fine", np.ones(4, np.float32))
        assert node.tensor_names() == ["fine"]


async def test_slowloris_handshake_is_dropped() -> None:
    settings = fast_settings(authenticated=False).with_transfer(handshake_timeout=0.2)
    async with running(settings) as node:
        stream = await trio.open_tcp_stream("127.0.0.1", node.port)
        await stream.send_all(b"\x00\x00")  # half a length prefix, then nothing
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""
