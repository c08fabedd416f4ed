"""Faults injected on the path between two peers: cuts mid-transfer, corrupted bytes.

Over TCP a test-owned proxy cuts the connection after N bytes or flips one byte. Over QUIC the
UDP proxy does the same to the connection's datagrams: a cut is the path going dark for that
QUIC connection (QUIC has no RST, so the sender learns it from silence: ``io_timeout``), and a
flipped byte makes QUIC's packet protection drop the datagram, which QUIC then re-sends.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from tensord.config import MiB

from .support.helpers import fast_settings, running
from .support.tcp_proxy import Fault, faulty_path, proxied

CHUNK = 256 * 1024
WINDOW = 2 * MiB
#: QUIC's bytes on the wire per byte of stream (packet header, STREAM frame, AEAD tag, ACKs).
QUIC_OVERHEAD = 1.05


def settings(transport: str = "tcp"):  # type: ignore[no-untyped-def]
    # A QUIC cut is silence: the attempt ends at io_timeout, and the retry's dial replaces a
    # connection silent for connect_timeout (so io_timeout must be the longer of the two).
    return (
        fast_settings(transport=transport, chunk_size=CHUNK)
        .with_transfer(window_bytes=WINDOW, connect_timeout=1.0, io_timeout=1.5)
        .with_protocol(enable_compression=False)
    )


#: Six random cuts over TCP, three over QUIC (each QUIC cut waits out an io_timeout).
CUTS = [("tcp", seed) for seed in range(6)] + [("quic", seed) for seed in range(3)]


@pytest.mark.parametrize(("transport", "seed"), CUTS, indirect=["transport"])
async def test_cut_at_random_byte_resumes_and_resends_at_most_the_window(
    seed: int, transport: str
) -> None:
    size = 24 * MiB if transport == "tcp" else 12 * MiB
    array = np.random.default_rng(seed).integers(0, 255, size=size, dtype=np.uint8)
    cut = random.Random(seed).randrange(size // 20, size - size // 20)
    async with running(settings(transport)) as a, running(settings(transport)) as b:
        async with faulty_path(transport, b.port, {0: Fault(cut_after=cut)}) as proxy:
            result = await a.send_tensor(proxy.addr, "cut", array)
        got = b.get_tensor("cut")
        assert got.tobytes() == array.tobytes()
        assert proxy.conns[0].cut
        assert result.retries == 1
        assert result.transport == transport
        # Only what was in flight at the cut travels twice, never the whole tensor.
        assert result.bytes_resent <= WINDOW
        assert result.bytes_sent <= size + WINDOW
        # ...and the proxy agrees: the second connection carried only the missing part.
        second = proxy.conns[1].upstream
        if transport == "tcp":
            assert second <= size - cut + WINDOW + 64 * 1024
        else:  # the cut is counted in datagram bytes, the remainder in stream bytes
            assert second <= (size - cut / QUIC_OVERHEAD + WINDOW) * QUIC_OVERHEAD + 64 * 1024


async def test_cut_several_times_still_completes(transport: str) -> None:
    size = 16 * MiB
    array = np.random.default_rng(7).integers(0, 255, size=size, dtype=np.uint8)
    faults = {i: Fault(cut_after=1_000_000 + 777 * i) for i in range(4)}
    async with running(settings(transport)) as a, running(settings(transport)) as b:
        async with faulty_path(transport, b.port, faults) as proxy:
            result = await a.send_tensor(proxy.addr, "cuts", array)
        assert b.get_tensor("cuts").tobytes() == array.tobytes()
        assert result.retries == 4
        assert result.bytes_resent <= 4 * WINDOW


async def test_too_many_cuts_fail_with_a_typed_error_and_nothing_stored(transport: str) -> None:
    from tensord.errors import TransferFailed

    size = 4 * MiB
    array = np.zeros(size, dtype=np.uint8) + 1
    faults = {i: Fault(cut_after=100_000) for i in range(10)}
    s = settings(transport).with_protocol(max_retries=2)
    async with running(s) as a, running(settings(transport)) as b:
        async with faulty_path(transport, b.port, faults) as proxy:
            with pytest.raises(TransferFailed, match="after 3 attempts"):
                await a.send_tensor(proxy.addr, "doomed", array)
        assert b.tensor_names() == []


@pytest.mark.parametrize("where", ["payload", "header"])
async def test_corrupted_byte_never_yields_a_corrupt_tensor(where: str, transport: str) -> None:
    size = 4 * MiB
    array = np.random.default_rng(11).integers(0, 255, size=size, dtype=np.uint8)
    # Over TCP the first bytes upstream are the Hello and Begin frames, then chunk 0's header;
    # a byte 100 KiB in lands inside chunk 0's payload; byte 0 is the Hello's length prefix
    # (which then claims a 4 GiB header). Over QUIC, byte 0 is in the first Initial packet
    # and 100 KiB in is a packet of chunk 0.
    offset = 100 * 1024 if where == "payload" else 0
    async with running(settings(transport)) as a, running(settings(transport)) as b:
        async with faulty_path(transport, b.port, {0: Fault(corrupt_at=offset)}) as proxy:
            result = await a.send_tensor(proxy.addr, "crc", array)
        assert proxy.conns[0].corrupted
        assert b.get_tensor("crc").tobytes() == array.tobytes()
        if transport == "quic":
            # QUIC's packet protection dropped the datagram and QUIC sent it again: the
            # damage never reached the chunk protocol.
            assert (result.nacks, result.retries, result.bytes_resent) == (0, 0, 0)
        elif where == "payload":
            # crc32c caught it: that one chunk was sent again on the same connection
            assert result.nacks == 1 and result.retries == 0
            assert result.bytes_resent == CHUNK
        else:
            # a broken header is a protocol error: new connection, transfer from the start
            assert result.retries >= 1


async def test_corrupted_compressed_chunk_is_resent() -> None:
    """TCP only: over QUIC a damaged datagram never reaches the chunk protocol (see above)."""
    size = 4 * MiB
    array = np.zeros(size, dtype=np.uint8)
    array[::7] = 3  # compressible, not trivially
    s = settings().with_protocol(enable_compression=True)
    async with running(s) as a, running(s) as b:
        async with proxied(b.port, {0: Fault(corrupt_at=2000)}) as proxy:
            result = await a.send_tensor(proxy.addr, "z", array)
        assert result.chunks_compressed > 0
        assert b.get_tensor("z").tobytes() == array.tobytes()
