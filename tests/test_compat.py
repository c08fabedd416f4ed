"""Capability negotiation with older peers, and compression on, off and adaptive."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from tensord.errors import TransferFailed
from tensord.wire import Hello, encode, make_hello
from tensord.wire.frames import FrameDecoder
from tensord.wire.handshake import ALL_FEATURES
from tensord.wire.messages import Legacy, Stored

from .support.helpers import fast_settings, running

OLD_STYLE = frozenset({"crc32c"})  # a peer from before chunking: no chunked, resume, lz4, pull


@pytest.mark.parametrize("old_side", ["receiver", "sender"])
async def test_old_style_peer_gets_legacy_mode(old_side: str) -> None:
    array = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)
    old = {"features": OLD_STYLE}
    async with (
        running(**(old if old_side == "sender" else {})) as a,
        running(**(old if old_side == "receiver" else {})) as b,
    ):
        result = await a.send_tensor(b.addr, "legacy", array)
        got = await b.receive_tensor()
        assert result.legacy
        assert np.array_equal(got.array, array)


async def test_streaming_disabled_by_settings_uses_legacy_mode() -> None:
    array = np.arange(1000, dtype=np.int64)
    async with running(fast_settings(use_streaming_protocol=False)) as a, running() as b:
        result = await a.send_tensor(b.addr, "x", array)
        assert result.legacy
        assert np.array_equal(b.get_tensor("x"), array)
        assert "chunked" not in a.features


async def test_pull_from_old_style_peer_is_refused_clearly() -> None:
    async with running(features=OLD_STYLE) as old, running() as new:
        old.put_tensor("w", np.ones(4))
        with pytest.raises(TransferFailed, match="does not support pull"):
            await new.pull_tensor(old.addr, "w")


async def test_peer_without_lz4_gets_raw_chunks() -> None:
    zeros = np.zeros(1 << 20, dtype=np.float32)
    async with running() as a, running(features=ALL_FEATURES - {"lz4"}) as b:
        result = await a.send_tensor(b.addr, "z", zeros)
        assert result.chunks_compressed == 0 and result.bytes_sent == zeros.nbytes
        assert np.array_equal(b.get_tensor("z"), zeros)


async def test_peer_without_crc32c_still_transfers() -> None:
    array = np.random.default_rng(1).standard_normal(200_000)
    async with running() as a, running(features=ALL_FEATURES - {"crc32c"}) as b:
        await a.send_tensor(b.addr, "nocrc", array)
        assert np.array_equal(b.get_tensor("nocrc"), array)


async def test_newer_peer_offering_more_versions_agrees_on_ours() -> None:
    async with running(versions=(1, 2, 99)) as a, running() as b:
        await a.send_tensor(b.addr, "v", np.ones(3))
        assert np.array_equal(b.get_tensor("v"), np.ones(3))


async def test_no_common_version_is_refused_without_retrying() -> None:
    async with running(versions=(99,)) as a, running() as b:
        with trio.fail_after(5), pytest.raises(TransferFailed, match="no common protocol version"):
            await a.send_tensor(b.addr, "v", np.ones(3))
        assert b.tensor_names() == []


async def test_hand_written_legacy_client() -> None:
    """A minimal old client, written against the documented frames, not against our node."""
    array = np.arange(256, dtype=np.float32)
    async with running(fast_settings(authenticated=False)) as b:
        stream = await trio.open_tcp_stream("127.0.0.1", b.port)
        decoder = FrameDecoder()
        await stream.send_all(encode(make_hello("old-client", OLD_STYLE, 1 << 20)))
        while (reply := decoder.next_message()) is None:
            decoder.feed(await stream.receive_some(4096))
        assert isinstance(reply, Hello) and reply.features == OLD_STYLE
        from tensord.wire.crc import crc32c
        from tensord.wire.meta import TensorMeta

        meta = TensorMeta.of("from-old", array)
        await stream.send_all(encode(Legacy(meta, crc32c(array), array.nbytes)) + array.tobytes())
        while (reply := decoder.next_message()) is None:
            decoder.feed(await stream.receive_some(4096))
        assert isinstance(reply, Stored)
        await stream.aclose()
        got = await b.receive_tensor()
        assert got.sender == "old-client" and np.array_equal(got.array, array)


# -- compression -------------------------------------------------------------------------------


async def test_compressible_tensor_goes_compressed() -> None:
    array = np.zeros(4 << 20, dtype=np.float32)
    array[::100] = 1.0
    async with running() as a, running() as b:
        result = await a.send_tensor(b.addr, "sparse", array)
        assert result.chunks_compressed == 16  # every 1 MiB chunk
        assert result.bytes_sent < array.nbytes // 10
        assert np.array_equal(b.get_tensor("sparse"), array)


async def test_dense_weights_skip_compression_adaptively() -> None:
    weights = np.random.default_rng(2).standard_normal(4 << 20).astype(np.float32)
    async with running() as a, running() as b:
        result = await a.send_tensor(b.addr, "dense", weights)
        assert result.chunks_compressed == 0
        assert result.bytes_sent == weights.nbytes
        assert np.array_equal(b.get_tensor("dense"), weights)


async def test_compression_disabled_sends_raw() -> None:
    array = np.zeros(1 << 20, dtype=np.float32)
    async with running(fast_settings(enable_compression=False)) as a, running() as b:
        result = await a.send_tensor(b.addr, "z", array)
        assert result.chunks_compressed == 0 and result.bytes_sent == array.nbytes
        assert np.array_equal(b.get_tensor("z"), array)


async def test_below_threshold_is_not_compressed() -> None:
    array = np.zeros(512, dtype=np.float32)  # 2 KiB < 4096 threshold
    async with running() as a, running() as b:
        result = await a.send_tensor(b.addr, "small", array)
        assert result.chunks_compressed == 0 and result.bytes_sent == array.nbytes
