"""A chain link's sender without sockets: :class:`Arriving` tells a :class:`RelaySend` of the
chunks a :class:`ReceiveTransfer` holds through the receive's public view (``has``,
``held_from``, ``held_ranges``, ``raw_crc``), in place, and the link forwards each chunk from
the receive buffer with the crc32c the receive verified (no second pass over the bytes)."""

from __future__ import annotations

import numpy as np
import pytest

import tensord.wire.transfer as transfer_mod
from tensord.wire import Begin
from tensord.wire.crc import crc32c
from tensord.wire.messages import Accept, Chunk, End, Stored
from tensord.wire.meta import TensorMeta
from tensord.wire.relay import Arriving, RelaySend
from tensord.wire.transfer import ReceiveTransfer, SendTransfer

CS = 4096
XID = "ab" * 8


def setup(nchunks: int = 6, tail: int = 100) -> tuple[bytes, SendTransfer, ReceiveTransfer]:
    data = np.random.default_rng(7).integers(0, 255, (nchunks - 1) * CS + tail, np.uint8)
    meta = TensorMeta.of("w", data)
    send = SendTransfer(XID, meta, memoryview(data.tobytes()), chunk_size=CS, window=64)
    begin = Begin(XID, meta, CS, 64, False, ("tensord://c@127.0.0.1:7001",))
    recv = ReceiveTransfer(begin, memoryview(bytearray(meta.nbytes)))
    return data.tobytes(), send, recv


def deliver(recv: ReceiveTransfer, chunk: Chunk, payload: memoryview | bytes) -> None:
    _, target = recv.place(chunk)
    assert target is not None
    target[:] = payload
    recv.on_chunk(chunk, None)


def link_for(recv: ReceiveTransfer) -> RelaySend:
    return RelaySend(XID, recv.meta, recv.dest, chunk_size=CS, window=64, crc=True, chain=())


def test_the_receive_view_says_what_is_held_without_copying() -> None:
    _, send, recv = setup()
    chunks = [send.next_chunk() for _ in range(send.nchunks)]
    assert recv.held_from(0) == 0 and recv.held_ranges() == ()
    for i in (0, 1, 3):
        c = chunks[i]
        assert c is not None
        deliver(recv, c.header, c.payload)
    assert [recv.has(i) for i in range(6)] == [True, True, False, True, False, False]
    assert recv.held_from(0) == 2 and recv.held_from(2) == 2 and recv.held_from(3) == 4
    assert recv.held_ranges() == ((0, 2), (3, 4))
    assert recv.raw_crc(3) == chunks[3].header.crc  # type: ignore[union-attr]
    assert recv.raw_crc(2) is None  # not held: nothing verified
    for c in chunks[2:]:
        assert c is not None
        if not recv.has(c.header.index):
            deliver(recv, c.header, c.payload)
    assert recv.held_from(0) == recv.nchunks == 6


def test_arriving_tells_the_link_in_order_and_a_gap_once_it_fills() -> None:
    _, send, recv = setup()
    chunks = [send.next_chunk() for _ in range(send.nchunks)]
    arriving = Arriving(recv)
    link = link_for(recv)
    arriving.attach(link)
    assert link.available_count == 0 and link.waiting and not arriving.poll()
    for i in (0, 2):  # 1 is late (a resend after a nack, say)
        c = chunks[i]
        assert c is not None
        deliver(recv, c.header, c.payload)
    assert arriving.poll() and link.available_count == 1  # 2 waits for the gap
    out = link.next_chunk()
    assert out is not None and out.header.index == 0 and link.next_chunk() is None
    c = chunks[1]
    assert c is not None
    deliver(recv, c.header, c.payload)
    assert arriving.poll() and link.available_count == 3
    # A link attached later (a repair) is told everything held at once.
    late = link_for(recv)
    arriving.attach(late)
    assert late.available_count == 3 and not late.all_available


def test_a_link_forwards_from_the_receive_buffer_with_the_verified_crcs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, send, recv = setup()
    arriving = Arriving(recv)
    link = link_for(recv)
    arriving.attach(link)
    while (c := send.next_chunk()) is not None:
        deliver(recv, c.header, c.payload)
    recv.on_end(send.end())
    assert recv.complete and arriving.poll() and link.all_available
    # Every checksum the link sends comes from the receive: crc32c is never run again.
    calls: list[int] = []

    def counted(buf: memoryview | bytes) -> int:
        calls.append(len(buf))
        return crc32c(buf)

    monkeypatch.setattr(transfer_mod, "crc32c", counted)
    begin = link.begin(resume=True)
    assert begin.chain == () and begin.resume
    link.on_message(Accept(XID, ((0, 2),)))  # the next peer holds two chunks already
    tail = ReceiveTransfer(
        Begin(XID, recv.meta, CS, 64, True, ()), memoryview(bytearray(len(data)))
    )
    outs = []
    while (out := link.next_chunk()) is not None:
        assert isinstance(out.payload, memoryview)
        assert out.payload.obj is recv.dest.obj  # a view of the receive buffer, not a copy
        outs.append(out)
    end = link.end()
    assert [o.header.index for o in outs] == [2, 3, 4, 5] and isinstance(end, End)
    assert calls == []
    monkeypatch.undo()
    for out in outs:
        deliver(tail, out.header, out.payload)
    # The tail fills the two chunks the Accept claimed, then checks the whole.
    for i in (0, 1):
        c = Chunk(XID, i, i * CS, CS, CS, crc32c(data[i * CS : (i + 1) * CS]), False)
        deliver(tail, c, data[i * CS : (i + 1) * CS])
    assert tail.on_end(end) == [Stored(XID)]
    assert bytes(tail.dest) == data
