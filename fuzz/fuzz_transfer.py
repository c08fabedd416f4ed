"""atheris harness: the transfer state machines driven by a hostile peer's frames.

Input layout: byte 0 holds flags, byte 1 a size parameter, the rest is a stream of frames.

* Receiver (flag ``SENDER`` clear): the stream must open with a ``begin``; a ``ReceiveTransfer``
  is made for it over a destination with canary bytes on both sides, and the rest of the stream is
  handled the way ``tensord.net.connection.receive_chunked`` does (``chunk``: place, read the
  payload, ``on_chunk``; ``end``: ``on_end``; anything else ends the connection). A later
  ``begin`` that matches the transfer stands for a new connection resuming it (``rebegin``).
* Sender (flag ``SENDER`` set): a ``SendTransfer`` of a tensor of ``byte 1 * 1000`` bytes sends
  what its window allows after each reply in the stream; a ``ping`` stands for a cut connection
  and a resumed ``begin``.

The contract: a hostile peer gets a ``ProtocolError`` and nothing else - no other exception type,
no byte written outside the tensor, no verified chunk overwritten, ``stored`` only for a tensor
whose bytes match the whole-tensor crc32c, no more chunks in flight than the window. Any other
outcome (another exception, an ``AssertionError``, a hang, memory growth) is a crash.

    .venv/bin/python fuzz/fuzz_transfer.py fuzz/work/transfer fuzz/corpus/transfer \
        -max_total_time=60
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import lz4.block
import numpy as np

from tensord.errors import ProtocolError
from tensord.wire.compress import AdaptiveCompressor, lz4_bound
from tensord.wire.crc import crc32c
from tensord.wire.frames import FrameDecoder
from tensord.wire.messages import (
    Accept,
    Ack,
    Begin,
    Chunk,
    End,
    Error,
    Message,
    Nack,
    Ping,
    Stored,
    payload_len,
)
from tensord.wire.meta import TensorMeta
from tensord.wire.transfer import (
    MIN_CHUNK,
    Placement,
    ReceiveState,
    ReceiveTransfer,
    SendState,
    SendTransfer,
)

CODES = frozenset({"protocol", "too_large", "unknown_message", "bad_name", "bad_dtype", "bad_meta"})

CRC = 1  # crc32c was negotiated
SENDER = 2  # drive a SendTransfer with hostile replies instead of a ReceiveTransfer
COMPRESS = 4  # sender: with an AdaptiveCompressor

MAX_CHUNK = 64 * 1024  # the receiver's max_chunk here (64 MiB in the node): keeps inputs fast
MAX_TENSOR = 1 << 20
PAD = 64
CANARY = 0xA5
XID = "0123456789abcdef"


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class ReceiveProbe:
    """A ReceiveTransfer over a canary-padded destination, driven like the I/O layer drives it,
    with its invariants asserted after every step. Peer errors surface as ProtocolError."""

    def __init__(self, begin: Begin, *, crc: bool, max_chunk: int = MAX_CHUNK) -> None:
        nbytes = begin.meta.nbytes
        self.arena = bytearray([CANARY]) * (PAD + nbytes + PAD)
        self.dest = memoryview(self.arena)[PAD : PAD + nbytes]
        self.crc = crc
        self.rx = ReceiveTransfer(begin, self.dest, crc=crc, max_chunk=max_chunk)
        self.verified: dict[int, bytes] = {}  # chunk index -> its bytes when it was accepted
        self.end: End | None = None  # the last End the transfer took
        self.replies: list[Message] = []
        self.final: ReceiveState | None = None  # DONE and FAILED are for good

    # -- the I/O layer ----------------------------------------------------------------------------

    def chunk(self, c: Chunk, payload: bytes) -> list[Message]:
        """One chunk frame whose ``c.wire_len`` payload bytes are ``payload``."""
        assert len(payload) == c.wire_len
        rx = self.rx
        placement, target = rx.place(c)
        # place() accepted the header: it fits the transfer
        assert 0 <= c.index < rx.nchunks and c.raw_len == rx.chunk_len(c.index)
        assert c.offset == c.index * rx.chunk_size and c.offset + c.raw_len <= rx.meta.nbytes
        scratch: memoryview | None = None
        if placement is Placement.DIRECT:
            assert target is not None and not c.compressed
            assert len(target) == c.wire_len == c.raw_len
            assert _address(target) - _address(self.dest) == c.offset
            target[:] = payload  # recv_into
            del target
        elif placement is Placement.SCRATCH:
            assert target is None and c.compressed and c.wire_len <= lz4_bound(c.raw_len)
            scratch = memoryview(bytearray(payload))
        else:
            assert placement is Placement.DISCARD and target is None
            assert rx.progress()[0][c.index] == 1
        replies = rx.on_chunk(c, scratch)
        self._after(replies)
        return replies

    def end_(self, e: End) -> list[Message]:
        replies = self.rx.on_end(e)
        self.end = e
        self._after(replies)
        return replies

    def rebegin(self, begin: Begin) -> list[Message]:
        """A new connection resumes the transfer (the node checks ``matches`` first)."""
        assert self.rx.matches(begin)
        replies = self.rx.rebegin(begin, lz4=True)
        self._after(replies)
        assert [type(r) for r in replies] == ([Accept] if begin.resume else [])
        return replies

    # -- invariants ---------------------------------------------------------------------------

    def _after(self, replies: list[Message]) -> None:
        self.replies += replies
        self.check(replies)

    def check(self, replies: Sequence[Message] = ()) -> None:
        rx, dest = self.rx, self.dest
        pad = bytes([CANARY]) * PAD
        assert self.arena[:PAD] == pad, "wrote before the tensor"
        assert self.arena[PAD + len(dest) :] == pad, "wrote past the tensor"
        have, crcs = rx.progress()
        held = [i for i, b in enumerate(have) if b]
        assert rx.have_count == len(held)
        assert rx.bytes_have == sum(rx.chunk_len(i) for i in held) <= rx.meta.nbytes
        for i in list(self.verified):
            if not have[i]:
                del self.verified[i]  # dropped (a whole-tensor checksum failure)
        for i in held:
            off = i * rx.chunk_size
            now = bytes(dest[off : off + rx.chunk_len(i)])
            if self.crc:
                assert crc32c(now) == crcs[i], f"chunk {i}: recorded crc32c is not its bytes'"
            assert self.verified.setdefault(i, now) == now, f"verified chunk {i} overwritten"
        for r in replies:
            match r:
                case Ack(xid, upto, ranges):
                    assert xid == rx.id and 0 <= upto <= rx.nchunks
                    assert all(upto <= a < b <= rx.nchunks for a, b in ranges)
                    assert all(have[i] for i in range(upto))
                    assert all(have[i] for a, b in ranges for i in range(a, b))
                case Nack(xid, index):
                    assert xid == rx.id and 0 <= index < rx.nchunks and not have[index]
                case Stored(xid):
                    assert xid == rx.id and rx.complete
                case Error(code, _, xid):
                    assert xid == rx.id and code == "checksum"
                    assert rx.state is ReceiveState.FAILED
                case Accept(xid, ranges):
                    assert xid == rx.id and sum(b - a for a, b in ranges) == rx.have_count
                case _:
                    raise AssertionError(f"unexpected reply {r!r}")
        if rx.complete:
            assert rx.have_count == rx.nchunks
            if self.crc:
                assert self.end is not None and self.end.crc is not None
                assert crc32c(dest) == self.end.crc, "stored a tensor that fails its crc32c"
        if rx.state is ReceiveState.FAILED:
            assert rx.have_count == 0
        if self.final is not None:
            assert rx.state is self.final, f"{self.final.value} transfer became {rx.state.value}"
        elif rx.state is not ReceiveState.RECEIVING:
            self.final = rx.state


def check_receive(flags: int, stream: bytes | memoryview) -> ReceiveProbe | None:
    dec = FrameDecoder(max_payload=lz4_bound(MAX_CHUNK), max_tensor_bytes=MAX_TENSOR)
    dec.feed(stream)
    try:
        begin = dec.next_message()
        if not isinstance(begin, Begin):
            return None
        array = begin.meta.empty_array()  # what the node allocates for a Begin it accepts
        assert array.nbytes == begin.meta.nbytes
        probe = ReceiveProbe(begin, crc=bool(flags & CRC))
    except ProtocolError as exc:
        assert exc.code in CODES, exc.code
        return None
    rx = probe.rx
    try:
        while not rx.complete:
            msg = dec.next_message()
            if msg is None:
                break
            if isinstance(msg, Chunk):
                payload = dec.take_payload()
                if len(payload) < msg.wire_len:
                    break  # the stream ends inside the payload
                probe.chunk(msg, payload)
            elif isinstance(msg, End):
                probe.end_(msg)
            elif isinstance(msg, Begin) and rx.matches(msg):
                probe.rebegin(msg)
            else:
                break  # the I/O layer: a protocol error (or the sender's Error), and a close
            if rx.state is ReceiveState.FAILED:
                break
    except ProtocolError as exc:
        assert exc.code in CODES, exc.code
    probe.check()
    return probe


def _pump(tx: SendTransfer, data: bytes, outstanding: set[int]) -> None:
    """Send what the sender will send now, checking every chunk it produces."""
    while (out := tx.next_chunk()) is not None:
        h = out.header
        assert h.id == tx.id and 0 <= h.index < tx.nchunks
        assert h.offset == h.index * tx.chunk_size and h.raw_len == tx.chunk_len(h.index)
        assert h.wire_len == len(out.payload)
        raw = data[h.offset : h.offset + h.raw_len]
        if h.compressed:
            assert lz4.block.decompress(out.payload, uncompressed_size=h.raw_len) == raw
        else:
            assert bytes(out.payload) == raw
        assert h.crc == (crc32c(out.payload) if tx.crc else None)
        outstanding.add(h.index)
        assert len(outstanding) <= tx.window, "more chunks in flight than the window"
    if tx.wants_end:
        e = tx.end()
        assert e.crc == (crc32c(data) if tx.crc else None)


def check_send(flags: int, size: int, stream: bytes | memoryview) -> SendTransfer:
    nbytes = size * 1000
    data = bytes(nbytes // 2) + bytes(range(256)) * (nbytes // 512) + bytes(nbytes)
    data = data[:nbytes]
    meta = TensorMeta("t", "|u1", (nbytes,), nbytes)
    compressor = AdaptiveCompressor() if flags & COMPRESS else None
    tx = SendTransfer(
        XID,
        meta,
        memoryview(data),
        chunk_size=MIN_CHUNK,
        window=1 + size % 7,
        crc=bool(flags & CRC),
        compressor=compressor,
    )
    outstanding: set[int] = set()  # our own count of what is in flight
    dec = FrameDecoder()
    dec.feed(stream)
    try:
        _pump(tx, data, outstanding)
        while (msg := dec.next_message()) is not None:
            if payload_len(msg):
                dec.take_payload()
            if isinstance(msg, Ping):  # the connection was cut: resume on a new one
                tx.begin(resume=True)
                outstanding.clear()
            else:
                tx.on_message(msg)
                match msg:
                    case Ack(_, upto, ranges):
                        outstanding = {
                            i
                            for i in outstanding
                            if not (i < upto or any(a <= i < b for a, b in ranges))
                        }
                    case Nack(_, index):
                        outstanding.discard(index)
                    case Accept():
                        outstanding.clear()
                    case Stored():
                        assert tx.state is SendState.DONE
                    case Error():
                        assert tx.state is SendState.FAILED
            assert 0 <= tx.bytes_acked <= nbytes
            if tx.state in (SendState.DONE, SendState.FAILED):
                break
            _pump(tx, data, outstanding)
    except ProtocolError as exc:
        assert exc.code in CODES, exc.code
    return tx


def check(data: bytes) -> ReceiveProbe | SendTransfer | None:
    """One fuzz input (see the module docstring for its layout)."""
    if len(data) < 2:
        return None
    flags, size, stream = data[0], data[1], memoryview(data)[2:]
    if flags & SENDER:
        return check_send(flags, size, stream)
    return check_receive(flags, stream)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mutator import run_fuzzer

    run_fuzzer(check)


if __name__ == "__main__":
    main()
