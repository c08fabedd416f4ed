"""SendTransfer and ReceiveTransfer driven against each other in memory, with a lossy wire.

The ``Wire`` below is the test's stand-in for the I/O layer: it moves chunk headers and payloads
from the sender to the receiver (DIRECT: copy the payload into the returned target; SCRATCH: pass
it to ``on_chunk``; DISCARD: pass ``None``), routes the receiver's replies back to
``sender.on_message``, sends ``End`` when ``sender.wants_end`` and, when asked to, reorders,
duplicates, drops and corrupts what it carries, or "reconnects" (resume).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensord.errors import ProtocolError
from tensord.wire import (
    Accept,
    Ack,
    Begin,
    Chunk,
    End,
    Error,
    FrameDecoder,
    Message,
    Nack,
    Placement,
    ReceiveTransfer,
    SendTransfer,
    Stored,
    TensorMeta,
    encode,
)
from tensord.wire.compress import AdaptiveCompressor, lz4_bound
from tensord.wire.crc import crc32c
from tensord.wire.transfer import (
    MIN_CHUNK,
    ReceiveState,
    SendState,
    bitmap_ranges,
    chunk_count,
    to_ranges,
)

XID = "0123456789abcdef"
KiB = 1024
MAX_RECONNECTS = 40

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_data(size: int, kind: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return bytes(size)
    data = rng.integers(0, 256, size=size, dtype=np.uint8)
    if kind == "mixed":  # dense stretches and zero stretches: some chunks compress, some don't
        for start in range(0, size, 24 * KiB):
            if rng.random() < 0.5:
                data[start : start + 24 * KiB] = 0
    return data.tobytes()


def make_pair(
    data: bytes, chunk_size: int, window: int, *, crc: bool = True, compress: bool = False
) -> tuple[SendTransfer, ReceiveTransfer, bytearray]:
    meta = TensorMeta("model.layers.0.mlp.weight", "|u1", (len(data),), len(data))
    comp = AdaptiveCompressor() if compress else None
    sender = SendTransfer(
        XID, meta, memoryview(data), chunk_size=chunk_size, window=window, crc=crc, compressor=comp
    )
    dest = bytearray(len(data))
    receiver = ReceiveTransfer(sender.begin(), memoryview(dest), crc=crc)
    return sender, receiver, dest


def deliver_chunk(rx: ReceiveTransfer, header: Chunk, payload: bytes) -> list[Message]:
    """What the I/O layer does with one chunk frame."""
    assert len(payload) == header.wire_len
    placement, target = rx.place(header)
    if placement is Placement.DIRECT:
        assert target is not None and len(target) == len(payload)
        target[:] = payload
        return rx.on_chunk(header, None)
    assert target is None
    if placement is Placement.SCRATCH:
        assert header.compressed
        return rx.on_chunk(header, memoryview(payload))
    assert placement is Placement.DISCARD
    return rx.on_chunk(header, None)


def through_codec(dec: FrameDecoder, msg: Message, payload: bytes = b"") -> tuple[Message, bytes]:
    dec.feed(encode(msg) + payload)
    got = dec.next_message()
    assert got == msg
    body = dec.take_payload()
    assert body == payload and dec.payload_pending == 0
    return got, body


@dataclass
class Wire:
    sender: SendTransfer
    receiver: ReceiveTransfer
    rnd: random.Random = field(default_factory=lambda: random.Random(0))
    reorder: bool = False
    dup_p: float = 0.0
    drop_p: float = 0.0
    cut_p: float = 0.0
    corrupt_p: float = 0.0
    via_codec: bool = False

    to_rx: list[tuple[Chunk | End, bytes]] = field(default_factory=list)
    to_tx: list[Message] = field(default_factory=list)
    replies: list[Message] = field(default_factory=list)
    outstanding: set[int] = field(default_factory=set)  # our own count of unacknowledged chunks
    max_outstanding: int = 0
    compressed_seen: int = 0
    corruptions: int = 0
    reconnects: int = 0
    resent_per_epoch: list[int] = field(default_factory=list)
    _resent_mark: int = 0
    _end_delivered: bool = False
    _dropped_this_epoch: bool = False
    _dec_rx: FrameDecoder = field(default_factory=FrameDecoder)
    _dec_tx: FrameDecoder = field(default_factory=FrameDecoder)

    # -- sender side -------------------------------------------------------------------------

    def pump(self) -> None:
        """Take every chunk the sender will give now, then End if it wants to end."""
        tx = self.sender
        while (out := tx.next_chunk()) is not None:
            h = out.header
            assert h.id == XID and h.raw_len == tx.chunk_len(h.index)
            assert h.wire_len == len(out.payload)
            self.outstanding.add(h.index)
            self.max_outstanding = max(self.max_outstanding, len(self.outstanding))
            assert len(self.outstanding) <= tx.window
            self.compressed_seen += h.compressed
            if self.rnd.random() < self.drop_p:
                self._dropped_this_epoch = True
                continue
            self.to_rx.append((h, bytes(out.payload)))  # a copy: what went onto the wire
        # next_chunk returned None: either nothing is left or the window is exactly full
        assert not tx.has_pending or len(self.outstanding) == tx.window
        if tx.wants_end:
            end = tx.end()
            assert tx.state is SendState.ENDED
            if self.rnd.random() < self.drop_p:
                self._dropped_this_epoch = True
            else:
                self.to_rx.append((end, b""))

    def deliver_to_sender(self) -> None:
        msg = self.to_tx.pop(0)
        if self.via_codec:
            msg, _ = through_codec(self._dec_tx, msg)
        if isinstance(msg, Ack):
            self.outstanding = {
                i
                for i in self.outstanding
                if not (i < msg.upto or any(a <= i < b for a, b in msg.ranges))
            }
        elif isinstance(msg, Nack):
            self.outstanding.discard(msg.index)
        self.sender.on_message(msg)

    # -- receiver side -----------------------------------------------------------------------

    def deliver_to_receiver(self) -> None:
        barrier = next((k for k, (m, _) in enumerate(self.to_rx) if isinstance(m, End)), None)
        limit = len(self.to_rx) if barrier is None else barrier
        k = self.rnd.randrange(min(limit, self.sender.window)) if self.reorder and limit else 0
        msg, payload = self.to_rx.pop(k)
        if self.via_codec:
            msg, payload = through_codec(self._dec_rx, msg, payload)
        if isinstance(msg, End):
            self._end_delivered = True
            replies = self.receiver.on_end(msg)
        else:
            assert isinstance(msg, Chunk)
            if self.dup_p and not self._end_delivered and self.rnd.random() < self.dup_p:
                # a copy arrives later, but (like everything sent before it) ahead of End
                self.to_rx.insert(self.rnd.randint(0, limit - 1), (msg, payload))
            if payload and self.rnd.random() < self.corrupt_p:
                damaged = bytearray(payload)
                damaged[self.rnd.randrange(len(damaged))] ^= self.rnd.randint(1, 255)
                payload = bytes(damaged)
                self.corruptions += 1
            replies = deliver_chunk(self.receiver, msg, payload)
        self.replies += replies
        self.to_tx += replies

    # -- connection --------------------------------------------------------------------------

    def reconnect(self) -> None:
        """The connection dropped: what was in flight is lost; the sender resumes."""
        self.reconnects += 1
        self.resent_per_epoch.append(self.sender.stats.bytes_resent - self._resent_mark)
        self.to_rx.clear()
        self.to_tx.clear()
        self.outstanding.clear()
        self._end_delivered = False
        self._dropped_this_epoch = False
        self._dec_rx, self._dec_tx = FrameDecoder(), FrameDecoder()
        begin = self.sender.begin(resume=True)
        assert begin.resume and begin.id == XID
        if self.via_codec:
            begin, _ = through_codec(self._dec_rx, begin)
        assert isinstance(begin, Begin)
        assert self.receiver.matches(begin)
        replies = self.receiver.rebegin(begin, lz4=True)
        assert len(replies) == 1 and isinstance(replies[0], Accept)
        accept = replies[0]
        assert sum(b - a for a, b in accept.have) == self.receiver.have_count
        if self.via_codec:
            accept, _ = through_codec(self._dec_tx, accept)
        self.sender.on_message(accept)
        self._resent_mark = self.sender.stats.bytes_resent

    def run(self, max_steps: int = 200_000) -> None:
        for _ in range(max_steps):
            self.pump()
            if not self.to_rx and not self.to_tx:
                if self.sender.state is SendState.DONE:
                    self.resent_per_epoch.append(self.sender.stats.bytes_resent - self._resent_mark)
                    return
                assert self.sender.state is not SendState.FAILED, self.sender.error
                # stalled: only a frame lost in this connection explains it, else it's a deadlock
                assert self._dropped_this_epoch, "the transfer stalled without a lost frame"
                if self.reconnects >= MAX_RECONNECTS:
                    self.drop_p = self.cut_p = 0.0
                self.reconnect()
                continue
            if self.to_rx and (not self.to_tx or self.rnd.random() < 0.5):
                self.deliver_to_receiver()
            else:
                self.deliver_to_sender()
            if self.cut_p and self.rnd.random() < self.cut_p:
                if self.reconnects >= MAX_RECONNECTS:
                    self.cut_p = 0.0
                else:
                    self.reconnect()
        pytest.fail("the transfer did not finish")


def assert_complete(wire: Wire, data: bytes, dest: bytearray) -> None:
    tx, rx = wire.sender, wire.receiver
    assert bytes(dest) == data
    assert rx.state is ReceiveState.DONE and rx.complete
    assert tx.state is SendState.DONE
    assert [m for m in wire.replies if isinstance(m, Stored)][-1] == Stored(XID)
    assert not any(isinstance(m, Error) for m in wire.replies)
    assert rx.have_count == rx.nchunks == chunk_count(len(data), tx.chunk_size)
    assert rx.bytes_have == len(data)
    assert tx.bytes_acked == len(data)
    assert wire.max_outstanding <= tx.window


# Hypothesis favours small integers; half of the sizes count down from 320 KiB so that many
# examples have tens of chunks.
sizes = st.one_of(
    st.builds(lambda k, b: k * KiB + b, st.integers(0, 320), st.integers(0, KiB - 1)),
    st.builds(lambda k, b: (320 - k) * KiB - b, st.integers(0, 320), st.integers(0, KiB - 1)),
    st.sampled_from([0, 1, 4095, 4096, 4097, 65536, 65537, 128 * KiB, 300 * KiB]),
).map(lambda n: max(n, 0))
chunk_sizes = st.one_of(st.sampled_from([4096, 8192, 65536]), st.integers(4096, 65536))
windows = st.integers(1, 16)
kinds = st.sampled_from(["random", "zeros", "mixed"])


# ---------------------------------------------------------------------------------------------
# (a) in-order delivery


@PROPS
@given(
    size=sizes,
    chunk_size=chunk_sizes,
    window=windows,
    kind=kinds,
    crc=st.booleans(),
    compress=st.booleans(),
    via_codec=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_in_order_delivery_is_byte_exact(
    size: int,
    chunk_size: int,
    window: int,
    kind: str,
    crc: bool,
    compress: bool,
    via_codec: bool,
    seed: int,
) -> None:
    data = make_data(size, kind, seed)
    tx, rx, dest = make_pair(data, chunk_size, window, crc=crc, compress=compress)
    wire = Wire(tx, rx, random.Random(seed), via_codec=via_codec)
    wire.run()
    assert_complete(wire, data, dest)
    assert wire.reconnects == 0
    assert tx.stats.chunks_resent == tx.stats.bytes_resent == 0
    assert tx.stats.chunks_sent == rx.stats.chunks == tx.nchunks
    assert rx.stats.duplicates == rx.stats.crc_errors == 0
    assert wire.replies.count(Stored(XID)) == 1
    if not compress:
        assert wire.compressed_seen == 0
        assert tx.stats.bytes_sent == rx.stats.bytes == size


def test_empty_tensor() -> None:
    tx, rx, _ = make_pair(b"", 4096, 4)
    assert tx.nchunks == rx.nchunks == 0
    assert tx.next_chunk() is None and tx.wants_end
    replies = rx.on_end(tx.end())
    assert replies == [Stored(XID)]
    tx.on_message(replies[0])
    assert tx.state is SendState.DONE and rx.complete


# ---------------------------------------------------------------------------------------------
# (b) reordering, duplication, loss and reconnects


@PROPS
@given(
    size=sizes,
    chunk_size=chunk_sizes,
    window=windows,
    kind=kinds,
    compress=st.booleans(),
    dup_p=st.sampled_from([0.0, 0.1, 0.3]),
    drop_p=st.sampled_from([0.0, 0.05, 0.2]),
    cut_p=st.sampled_from([0.0, 0.01, 0.05]),
    via_codec=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_lossy_wire_with_reconnects_ends_byte_exact(
    size: int,
    chunk_size: int,
    window: int,
    kind: str,
    compress: bool,
    dup_p: float,
    drop_p: float,
    cut_p: float,
    via_codec: bool,
    seed: int,
) -> None:
    data = make_data(size, kind, seed)
    tx, rx, dest = make_pair(data, chunk_size, window, compress=compress)
    wire = Wire(
        tx,
        rx,
        random.Random(seed),
        reorder=True,
        dup_p=dup_p,
        drop_p=drop_p,
        cut_p=cut_p,
        via_codec=via_codec,
    )
    wire.run()
    assert_complete(wire, data, dest)
    assert rx.stats.crc_errors == 0
    # resume sends again only what was in flight at the cut: at most one window per reconnect
    assert len(wire.resent_per_epoch) == wire.reconnects + 1
    assert wire.resent_per_epoch[0] == 0
    assert all(n <= window * chunk_size for n in wire.resent_per_epoch)
    assert tx.stats.bytes_resent <= wire.reconnects * window * chunk_size


def test_reconnect_after_a_cut_skips_what_the_receiver_has() -> None:
    data = make_data(40 * 4096, "random", 1)
    tx, rx, dest = make_pair(data, 4096, 8)
    wire = Wire(tx, rx)
    for _ in range(30):  # part of the way, in order
        wire.pump()
        if wire.to_rx:
            wire.deliver_to_receiver()
        while wire.to_tx:
            wire.deliver_to_sender()
    have = rx.have_count
    in_flight = len(wire.to_rx)
    assert 0 < have < rx.nchunks and 0 < in_flight <= 8
    wire.reconnect()
    assert tx.stats.skipped_by_resume == have
    assert wire.to_rx == []
    wire.pump()
    resent = [h.index for h, _ in wire.to_rx if isinstance(h, Chunk)]
    assert resent == list(range(have, have + len(resent)))  # resumes at the first missing chunk
    wire.run()
    assert_complete(wire, data, dest)
    assert tx.stats.chunks_resent == in_flight


def test_resume_after_everything_arrived_but_end_was_lost() -> None:
    data = make_data(10 * 4096, "random", 2)
    tx, rx, dest = make_pair(data, 4096, 16)
    for _ in range(tx.nchunks):
        out = tx.next_chunk()
        assert out is not None
        for reply in deliver_chunk(rx, out.header, bytes(out.payload)):
            tx.on_message(reply)
    assert tx.wants_end
    tx.end()  # ... and it is lost with the connection
    begin = tx.begin(resume=True)
    (accept,) = rx.rebegin(begin, lz4=True)
    assert accept == Accept(XID, ((0, 10),))
    tx.on_message(accept)
    assert tx.next_chunk() is None and tx.wants_end
    replies = rx.on_end(tx.end())
    assert replies[-1] == Stored(XID)
    for reply in replies:
        tx.on_message(reply)
    assert tx.state is SendState.DONE and bytes(dest) == data
    assert tx.stats.chunks_resent == 0


def test_rebegin_without_resume_returns_nothing() -> None:
    tx, rx, _ = make_pair(bytes(8192), 4096, 2)
    assert rx.rebegin(tx.begin(resume=False), lz4=True) == []


def test_a_resumed_attempt_with_a_narrower_window_is_acked_as_often_as_it_needs() -> None:
    """A restarted sender (or a chain link taken over) may run a narrower window than the first
    attempt's: the receiver acks per the new window, or the sender would stall for acks."""
    data = make_data(64 * 4096, "random", 3)
    tx, rx, dest = make_pair(data, 4096, 256)
    assert rx.ack_every == 64
    narrow = SendTransfer(XID, tx.meta, memoryview(data), chunk_size=4096, window=4, crc=True)
    (accept,) = rx.rebegin(narrow.begin(resume=True), lz4=True)
    assert rx.ack_every == 1
    narrow.on_message(accept)
    for _ in range(narrow.nchunks):
        out = narrow.next_chunk()
        assert out is not None  # never blocked on the window: every chunk was acked at once
        for reply in deliver_chunk(rx, out.header, bytes(out.payload)):
            narrow.on_message(reply)
    for reply in rx.on_end(narrow.end()):
        narrow.on_message(reply)
    assert narrow.state is SendState.DONE and bytes(dest) == data


def test_matches_only_the_same_transfer() -> None:
    tx, rx, _ = make_pair(bytes(8192), 4096, 2)
    begin = tx.begin(resume=True)
    assert rx.matches(begin)
    other_meta = TensorMeta("other", "|u1", (8192,), 8192)
    assert not rx.matches(Begin(XID, other_meta, 4096, 2, True))
    assert not rx.matches(Begin(XID, begin.meta, 8192, 2, True))
    assert not rx.matches(Begin("f" * 16, begin.meta, 4096, 2, True))


# ---------------------------------------------------------------------------------------------
# (c) corruption in transit


@PROPS
@given(
    size=st.integers(1, 300 * KiB),
    chunk_size=chunk_sizes,
    window=windows,
    kind=kinds,
    compress=st.booleans(),
    corrupt_p=st.sampled_from([0.05, 0.2, 0.5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_corrupted_payloads_are_nacked_and_resent(
    size: int,
    chunk_size: int,
    window: int,
    kind: str,
    compress: bool,
    corrupt_p: float,
    seed: int,
) -> None:
    data = make_data(size, kind, seed)
    tx, rx, dest = make_pair(data, chunk_size, window, compress=compress)
    wire = Wire(tx, rx, random.Random(seed), corrupt_p=corrupt_p)
    wire.run()
    assert_complete(wire, data, dest)
    nacks = [m for m in wire.replies if isinstance(m, Nack)]
    assert len(nacks) == wire.corruptions == rx.stats.crc_errors == tx.stats.nacks
    assert tx.stats.chunks_resent == wire.corruptions
    assert wire.reconnects == 0


def test_one_corrupted_byte_gives_a_nack_and_a_resend() -> None:
    data = make_data(4 * 4096, "random", 3)
    tx, rx, dest = make_pair(data, 4096, 4)
    outs = [tx.next_chunk() for _ in range(4)]
    assert all(o is not None for o in outs) and tx.next_chunk() is None
    replies = []
    for out in outs:
        assert out is not None
        payload = bytearray(out.payload)
        if out.header.index == 2:
            payload[100] ^= 0x40
        replies += deliver_chunk(rx, out.header, bytes(payload))
    assert Nack(XID, 2) in replies
    assert rx.stats.crc_errors == 1
    for r in replies:
        tx.on_message(r)
    again = tx.next_chunk()
    assert again is not None and again.header.index == 2
    assert tx.stats.chunks_resent == 1
    replies = deliver_chunk(rx, again.header, bytes(again.payload))
    replies += rx.on_end(tx.end())
    assert replies[-1] == Stored(XID)
    assert bytes(dest) == data


def test_corrupted_compressed_payload_is_nacked_before_decompression() -> None:
    data = bytes(8 * 4096)
    tx, rx, _ = make_pair(data, 8 * 4096, 1, compress=True)
    out = tx.next_chunk()
    assert out is not None and out.header.compressed
    bad = bytearray(out.payload)
    bad[0] ^= 0xFF
    assert rx.place(out.header)[0] is Placement.SCRATCH
    assert rx.on_chunk(out.header, memoryview(bytes(bad))) == [Nack(XID, 0)]
    assert rx.have_count == 0


# ---------------------------------------------------------------------------------------------
# (d) the window


@settings(max_examples=60, deadline=None)
@given(nchunks=st.integers(0, 40), window=windows, acks=st.lists(st.integers(0, 39), max_size=20))
def test_never_more_than_window_chunks_unacknowledged(
    nchunks: int, window: int, acks: list[int]
) -> None:
    tx, _, _ = make_pair(bytes(nchunks * 4096), 4096, window)
    sent: list[int] = []
    while (out := tx.next_chunk()) is not None:
        sent.append(out.header.index)
    assert sent == list(range(min(window, nchunks)))
    assert tx.window_open is False or nchunks <= window
    acked: set[int] = set()
    for i in acks:
        if i not in sent or i in acked:
            continue
        tx.on_message(Ack(XID, 0, ((i, i + 1),)))
        acked.add(i)
        more = []
        while (out := tx.next_chunk()) is not None:
            more.append(out.header.index)
        sent += more
        assert len(more) <= 1  # one acknowledgement opens exactly one slot
        assert len(set(sent) - acked) <= window
        if len(sent) < nchunks:
            assert len(set(sent) - acked) == window
    assert sent == list(range(len(sent)))


def test_cumulative_ack_opens_the_window() -> None:
    tx, _, _ = make_pair(bytes(20 * 4096), 4096, 4)
    assert [tx.next_chunk() is not None for _ in range(5)] == [True] * 4 + [False]
    tx.on_message(Ack(XID, 3))
    got = [o.header.index for o in iter(tx.next_chunk, None)]
    assert got == [4, 5, 6]
    assert tx.bytes_acked == 3 * 4096


def test_ack_of_unsent_chunks_is_ignored() -> None:
    tx, _, _ = make_pair(bytes(20 * 4096), 4096, 2)
    list(iter(tx.next_chunk, None))
    tx.on_message(Ack(XID, 0, ((10, 20),)))  # never sent: acks nothing, opens nothing
    assert tx.next_chunk() is None
    assert tx.bytes_acked == 0


# ---------------------------------------------------------------------------------------------
# (e) compression on the wire


@settings(max_examples=20, deadline=None)
@given(size=st.integers(64 * KiB, 300 * KiB), chunk_size=chunk_sizes, window=windows)
def test_zeros_go_compressed_and_arrive_exact(size: int, chunk_size: int, window: int) -> None:
    data = bytes(size)
    tx, rx, dest = make_pair(data, chunk_size, window, compress=True)
    dest[:] = b"\xaa" * size  # so that "zeros" can't come from the fresh buffer
    wire = Wire(tx, rx, via_codec=True)
    wire.run()
    assert_complete(wire, data, dest)
    eligible = sum(1 for i in range(tx.nchunks) if tx.chunk_len(i) >= 4096)
    assert wire.compressed_seen == eligible > 0
    assert tx.stats.bytes_sent < size // 10


def test_compressed_chunk_header() -> None:
    tx, rx, dest = make_pair(bytes(16 * KiB), 16 * KiB, 1, compress=True)
    out = tx.next_chunk()
    assert out is not None
    h = out.header
    assert h.compressed and h.raw_len == 16 * KiB and h.wire_len == len(out.payload) < 1024
    assert h.crc == crc32c(out.payload)  # the crc covers the bytes as sent
    assert deliver_chunk(rx, h, bytes(out.payload)) == [Ack(XID, 1)]
    assert bytes(dest) == bytes(16 * KiB)


def test_dense_data_goes_raw_with_compression_on() -> None:
    data = make_data(256 * KiB, "random", 4)
    tx, rx, dest = make_pair(data, 64 * KiB, 4, compress=True)
    wire = Wire(tx, rx)
    wire.run()
    assert_complete(wire, data, dest)
    assert wire.compressed_seen == 0
    assert tx.stats.bytes_sent == len(data)


# ---------------------------------------------------------------------------------------------
# (f) the receiver refuses chunks that don't fit the transfer


def a_good_chunk() -> tuple[ReceiveTransfer, Chunk, bytes]:
    data = make_data(3 * 4096 + 100, "random", 5)
    tx, rx, _ = make_pair(data, 4096, 8)
    out = tx.next_chunk()
    assert out is not None
    return rx, out.header, bytes(out.payload)


def refuse(rx: ReceiveTransfer, c: Chunk) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        rx.place(c)
    return info.value


def test_good_chunk_is_placed_directly() -> None:
    rx, h, _ = a_good_chunk()
    placement, target = rx.place(h)
    assert placement is Placement.DIRECT
    assert target is not None and len(target) == 4096


def test_wrong_offset_is_refused() -> None:
    rx, h, _ = a_good_chunk()
    refuse(rx, Chunk(h.id, 1, 0, 4096, 4096, h.crc))
    refuse(rx, Chunk(h.id, 0, 1, 4096, 4096, h.crc))
    refuse(rx, Chunk(h.id, 1, 4095, 4096, 4096, h.crc))


def test_index_out_of_range_is_refused() -> None:
    rx, h, _ = a_good_chunk()
    assert rx.nchunks == 4
    refuse(rx, Chunk(h.id, 4, 4 * 4096, 100, 100, h.crc))
    refuse(rx, Chunk(h.id, 1 << 40, (1 << 40) * 4096, 4096, 4096, h.crc))


def test_wrong_raw_len_is_refused() -> None:
    rx, h, _ = a_good_chunk()
    refuse(rx, Chunk(h.id, 0, 0, 4095, 4095, h.crc))
    refuse(rx, Chunk(h.id, 0, 0, 4097, 4097, h.crc))
    refuse(rx, Chunk(h.id, 3, 3 * 4096, 4096, 4096, h.crc))  # the last chunk holds 100 bytes
    assert rx.place(Chunk(h.id, 3, 3 * 4096, 100, 100, h.crc))[0] is Placement.DIRECT


def test_payload_length_mismatch_is_refused() -> None:
    rx, h, _ = a_good_chunk()
    refuse(rx, Chunk(h.id, 0, 0, 4096, 4095, h.crc))
    refuse(rx, Chunk(h.id, 0, 0, 4096, 4097, h.crc))
    refuse(rx, Chunk(h.id, 0, 0, 4096, lz4_bound(4096) + 1, h.crc, compressed=True))
    assert rx.place(Chunk(h.id, 0, 0, 4096, lz4_bound(4096), h.crc, True))[0] is Placement.SCRATCH


def test_a_compressed_chunk_is_refused_unless_lz4_was_negotiated() -> None:
    rx, h, _ = a_good_chunk()
    compressed = Chunk(h.id, 0, 0, 4096, 100, h.crc, compressed=True)
    assert rx.place(compressed)[0] is Placement.SCRATCH
    rx.rebegin(Begin(h.id, rx.meta, rx.chunk_size, 4, True), lz4=False)  # lz4 not agreed
    assert "not negotiated" in str(refuse(rx, compressed))
    assert rx.place(h)[0] is Placement.DIRECT  # plain chunks are still fine


def test_chunk_of_another_transfer_or_without_crc_is_refused() -> None:
    rx, h, _ = a_good_chunk()
    refuse(rx, Chunk("f" * 16, 0, 0, 4096, 4096, h.crc))
    refuse(rx, Chunk(h.id, 0, 0, 4096, 4096, None))  # crc32c was negotiated


def test_undecodable_compressed_payload_is_a_protocol_error() -> None:
    rx, h, _ = a_good_chunk()
    junk = b"\xff" * 64
    c = Chunk(h.id, 0, 0, 4096, len(junk), crc32c(junk), compressed=True)
    assert rx.place(c)[0] is Placement.SCRATCH
    with pytest.raises(ProtocolError):
        rx.on_chunk(c, memoryview(junk))


def test_duplicate_is_discarded_and_acked() -> None:
    rx, h, payload = a_good_chunk()
    deliver_chunk(rx, h, payload)
    assert rx.place(h) == (Placement.DISCARD, None)
    assert rx.on_chunk(h, None) == [Ack(XID, 1)]
    assert rx.stats.duplicates == 1 and rx.have_count == 1


def test_chunk_after_done_is_refused() -> None:
    data = make_data(4096, "random", 6)
    tx, rx, _ = make_pair(data, 4096, 1)
    out = tx.next_chunk()
    assert out is not None
    deliver_chunk(rx, out.header, bytes(out.payload))
    assert rx.on_end(tx.end())[-1] == Stored(XID)
    with pytest.raises(ProtocolError):
        rx.place(out.header)


@pytest.mark.parametrize("chunk_size", [MIN_CHUNK - 1, 1, (64 << 20) + 1])
def test_receiver_refuses_a_chunk_size_out_of_bounds(chunk_size: int) -> None:
    meta = TensorMeta("t", "|u1", (10,), 10)
    with pytest.raises(ProtocolError) as info:
        ReceiveTransfer(Begin(XID, meta, chunk_size, 1), memoryview(bytearray(10)))
    assert info.value.code == "too_large"


def test_destination_and_data_must_match_the_metadata() -> None:
    meta = TensorMeta("t", "|u1", (10,), 10)
    with pytest.raises(ValueError):
        ReceiveTransfer(Begin(XID, meta, 4096, 1), memoryview(bytearray(11)))
    with pytest.raises(ValueError):
        SendTransfer(XID, meta, memoryview(bytes(9)), chunk_size=4096, window=1)


def test_sender_refuses_replies_that_break_the_protocol() -> None:
    tx, _, _ = make_pair(bytes(3 * 4096), 4096, 4)
    with pytest.raises(ProtocolError):
        tx.on_message(Ack("f" * 16, 1))  # another transfer's id
    with pytest.raises(ProtocolError):
        tx.on_message(Nack(XID, 3))  # no such chunk
    with pytest.raises(ProtocolError):
        tx.on_message(Stored(XID))  # before End
    with pytest.raises(ProtocolError):
        tx.on_message(End(XID, 0))  # not a reply at all


def test_end_of_another_transfer_is_refused() -> None:
    _, rx, _ = make_pair(bytes(4096), 4096, 1)
    with pytest.raises(ProtocolError):
        rx.on_end(End("f" * 16, 0))


# ---------------------------------------------------------------------------------------------
# (g) the whole-tensor checksum


@pytest.mark.parametrize("end_first", [False, True])
def test_whole_tensor_crc_mismatch_is_a_checksum_error(end_first: bool) -> None:
    data = make_data(3 * 4096, "random", 7)
    tx, rx, _ = make_pair(data, 4096, 4)
    outs = [o for o in iter(tx.next_chunk, None)]
    good_end = tx.end()
    assert good_end.crc == crc32c(data)
    bad_end = End(XID, (good_end.crc or 0) ^ 1)
    replies: list[Message] = []
    if end_first:
        replies += rx.on_end(bad_end)
    for out in outs:
        replies += deliver_chunk(rx, out.header, bytes(out.payload))
    if not end_first:
        replies += rx.on_end(bad_end)
    errors = [m for m in replies if isinstance(m, Error)]
    assert len(errors) == 1 and errors[0].code == "checksum" and errors[0].id == XID
    assert Stored(XID) not in replies
    assert rx.state is ReceiveState.FAILED and not rx.complete
    assert rx.have_count == 0  # nothing possibly wrong is kept
    for r in replies:
        tx.on_message(r)
    assert tx.state is SendState.FAILED and tx.error == errors[0]


def test_end_crc_is_combined_even_for_chunks_skipped_by_resume() -> None:
    """A sender that never read the chunks the receiver already has still sends the right crc."""
    data = make_data(5 * 4096 + 10, "random", 8)
    first, rx, dest = make_pair(data, 4096, 8)
    for out in iter(first.next_chunk, None):  # an earlier attempt delivered every chunk...
        deliver_chunk(rx, out.header, bytes(out.payload))
    for out in iter(first.next_chunk, None):
        deliver_chunk(rx, out.header, bytes(out.payload))
    assert rx.have_count == rx.nchunks == 6 and not rx.complete  # ...but not its End
    # a new SendTransfer for the same transfer (say, the sending process restarted)
    again = SendTransfer(XID, first.meta, memoryview(data), chunk_size=4096, window=8)
    (accept,) = rx.rebegin(again.begin(resume=True), lz4=True)
    again.on_message(accept)
    assert again.stats.skipped_by_resume == 6
    assert again.next_chunk() is None and again.stats.chunks_sent == 0
    end = again.end()
    assert end.crc == crc32c(data)
    assert rx.on_end(end) == [Stored(XID)]
    assert bytes(dest) == data


def test_without_crc_no_checksums_travel() -> None:
    data = make_data(2 * 4096, "random", 9)
    tx, rx, dest = make_pair(data, 4096, 2, crc=False)
    outs = list(iter(tx.next_chunk, None))
    assert all(o.header.crc is None for o in outs)
    end = tx.end()
    assert end.crc is None
    replies = [r for o in outs for r in deliver_chunk(rx, o.header, bytes(o.payload))]
    replies += rx.on_end(end)
    assert replies[-1] == Stored(XID) and bytes(dest) == data


# ---------------------------------------------------------------------------------------------
# Ranges


def test_to_ranges_examples() -> None:
    assert to_ranges([]) == ()
    assert to_ranges([0]) == ((0, 1),)
    assert to_ranges([3, 1, 2, 7, 7, 9, 8]) == ((1, 4), (7, 10))
    assert to_ranges(iter([5, 0])) == ((0, 1), (5, 6))


def test_bitmap_ranges_examples() -> None:
    assert bitmap_ranges(bytearray()) == ()
    assert bitmap_ranges(bytearray(5)) == ()
    assert bitmap_ranges(bytearray([1, 1, 1])) == ((0, 3),)
    assert bitmap_ranges(bytearray([0, 1, 1, 0, 1])) == ((1, 3), (4, 5))
    assert bitmap_ranges(bytes([1, 0, 0, 1])) == ((0, 1), (3, 4))


@settings(max_examples=200, deadline=None)
@given(bits=st.lists(st.booleans(), max_size=300))
def test_bitmap_ranges_and_to_ranges_agree(bits: list[bool]) -> None:
    bitmap = bytearray(bits)
    ranges = bitmap_ranges(bitmap)
    assert ranges == to_ranges(i for i, b in enumerate(bits) if b)
    covered = [i for a, b in ranges for i in range(a, b)]
    assert covered == [i for i, b in enumerate(bits) if b]
    for (_, b1), (a2, _) in itertools.pairwise(ranges):
        assert b1 < a2  # sorted, disjoint and merged (never adjacent)
    assert all(a < b for a, b in ranges)


@settings(max_examples=40, deadline=None)
@given(sizes, chunk_sizes, st.integers(0, 1000), st.randoms(use_true_random=False))
def test_progress_survives_a_restart_and_the_resume_is_exact(
    size: int, chunk_size: int, seed: int, rnd: random.Random
) -> None:
    """Persist progress mid-transfer, rebuild the receiver from it, resume: byte-exact."""
    data = make_data(size, "random", seed)
    sender, receiver, dest = make_pair(data, chunk_size, 4)
    # deliver a random subset of chunks
    while (out := sender.next_chunk()) is not None:
        if rnd.random() < 0.6:
            placement, target = receiver.place(out.header)
            if placement is Placement.DIRECT:
                assert target is not None
                target[:] = out.payload
                receiver.on_chunk(out.header, None)
        # keep the window open; the resume below trusts only the receiver's restored bitmap
        i = out.header.index
        sender.on_message(Ack(XID, 0, ((i, i + 1),)))
    have, crcs = receiver.progress()
    saved = bytes(dest)
    # "restart": a new receiver over the same (persisted) bytes
    dest2 = bytearray(saved)
    begin = sender.begin(resume=True)
    fresh = ReceiveTransfer(begin, memoryview(dest2))
    fresh.restore(have, crcs)
    (accept,) = fresh.rebegin(begin, lz4=True)
    assert isinstance(accept, Accept)
    sender.on_message(accept)
    replies: list[Message] = []
    while True:
        out = sender.next_chunk()
        if out is None:
            if sender.wants_end:
                replies = fresh.on_end(sender.end())
                break
            for m in replies:
                sender.on_message(m)
            replies = []
            sender.on_message(Ack(XID, fresh.nchunks))
            continue
        placement, target = fresh.place(out.header)
        assert placement is Placement.DIRECT and target is not None
        target[:] = out.payload
        replies += fresh.on_chunk(out.header, None)
    assert replies[-1] == Stored(XID)
    assert bytes(dest2) == data


def test_restore_rejects_progress_of_another_shape() -> None:
    _, receiver, _ = make_pair(bytes(3 * 4096), 4096, 2)
    with pytest.raises(ValueError):
        receiver.restore(b"\x01\x01", [0, 0])
    with pytest.raises(ValueError):
        receiver.restore(b"\x01\x02\x00", [0, 0, 0])


def test_a_peer_sending_only_corrupt_chunks_is_refused() -> None:
    """Each bad chunk is nacked, but a peer that never gets one right cannot keep the transfer
    (and its partial) alive forever: after MAX_CRC_ERRORS it is a protocol error."""
    from tensord.wire.transfer import MAX_CRC_ERRORS

    data = make_data(8 * 4096, "random", 4)
    _, rx, _ = make_pair(data, 4096, 4)
    bad = Chunk(XID, 0, 0, 4096, 4096, 12345)
    for _ in range(MAX_CRC_ERRORS):
        assert deliver_chunk(rx, bad, bytes(4096)) == [Nack(XID, 0)]
    with pytest.raises(ProtocolError, match="failed their checksum"):
        deliver_chunk(rx, bad, bytes(4096))
