"""atheris harness: ``FrameDecoder`` (and through it ``from_header`` and ``TensorMeta.from_wire``)
on hostile bytes.

Input layout: byte 0 holds flags (bit 0: the payload is read "directly", past the decoder, the
way ``recv_into`` does; bit 1: small limits, so that the header and payload caps are reachable),
byte 1 the size of the pieces the stream arrives in (0: all at once), the rest is the stream.

The contract (docs/PROTOCOL.md, "Frames"): any stream yields valid messages or ends in a
``ProtocolError``. Anything else is a crash: another exception type, a broken invariant below
(an ``AssertionError``), a hang (``-timeout``) or unbounded memory (``-rss_limit_mb``).

    .venv/bin/python fuzz/fuzz_frames.py fuzz/work/frames fuzz/corpus/frames -max_total_time=60
    .venv/bin/python fuzz/fuzz_frames.py fuzz/artifacts/frames-crash-...   # replay one input
"""

from __future__ import annotations

import sys
from pathlib import Path

from tensord.errors import ProtocolError
from tensord.wire.frames import DEFAULT_MAX_HEADER, PREFIX, FrameDecoder, encode
from tensord.wire.messages import Message, payload_len

#: Every code a decoding error may carry; another one means a validation path we don't know.
CODES = frozenset({"protocol", "too_large", "unknown_message", "bad_name", "bad_dtype", "bad_meta"})

DIRECT = 1
SMALL = 2
SMALL_HEADER = 256
SMALL_PAYLOAD = 4096
PAYLOAD = 1 << 16  # the real default is 64 MiB: the cap is what is checked, not the allocation


def decoder(flags: int) -> FrameDecoder:
    if flags & SMALL:
        return FrameDecoder(max_header=SMALL_HEADER, max_payload=SMALL_PAYLOAD)
    return FrameDecoder(max_header=DEFAULT_MAX_HEADER, max_payload=PAYLOAD)


class Reader:
    """Feeds a decoder the way the I/O layer does, asserting the decoder's invariants.

    ``direct`` models ``recv_into``: once a header announced a payload, the buffered part is taken
    with ``take_payload_into`` and the rest is read past the decoder (``payload_received``).
    Complete frames collect in ``out``; ``ProtocolError`` from the decoder propagates.
    """

    def __init__(self, dec: FrameDecoder, direct: bool) -> None:
        self.dec = dec
        self.direct = direct
        self.out: list[tuple[Message, bytes]] = []
        self._msg: Message | None = None
        self._payload = bytearray()
        self._filled = 0

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """One read from the socket."""
        dec = self.dec
        data = memoryview(data)
        if self.direct and self._msg is not None:
            n = min(len(data), len(self._payload) - self._filled)  # recv_into the destination
            self._payload[self._filled : self._filled + n] = data[:n]
            self._filled += n
            dec.payload_received(n)
            data = data[n:]
            self._complete()
        dec.feed(data)
        while True:
            if self._msg is not None:
                if self.direct:
                    self._filled += dec.take_payload_into(memoryview(self._payload)[self._filled :])
                else:
                    got = dec.take_payload()
                    self._payload[self._filled : self._filled + len(got)] = got
                    self._filled += len(got)
                if not self._complete():
                    assert dec.buffered == 0, "payload bytes left behind in the decoder"
                    return
            before = dec.buffered
            msg = dec.next_message()
            if msg is None:
                # it waits for at most one header: a length prefix can't make it hoard bytes
                assert dec.buffered < PREFIX.size + dec.max_header, dec.buffered
                return
            assert dec.buffered <= before - PREFIX.size - 1, "a frame consumed no bytes"
            n = payload_len(msg)
            assert 0 <= n <= dec.max_payload, n
            assert dec.payload_pending == n
            self._msg, self._payload, self._filled = msg, bytearray(n), 0

    def _complete(self) -> bool:
        if self._msg is None or self._filled < len(self._payload):
            return False
        assert self.dec.payload_pending == 0
        self.out.append((self._msg, bytes(self._payload)))
        self._msg = None
        return True


def check(data: bytes) -> list[tuple[Message, bytes]]:
    """One fuzz input: decode it, then re-encode what came out. Returns the complete frames."""
    if len(data) < 2:
        return []
    flags, piece = data[0], data[1] or len(data)
    reader = Reader(decoder(flags), bool(flags & DIRECT))
    stream = memoryview(data)[2:]
    try:
        for pos in range(0, len(stream), piece):
            reader.receive(stream[pos : pos + piece])
    except ProtocolError as exc:
        assert exc.code in CODES, exc.code
    for msg, payload in reader.out:
        assert len(payload) == payload_len(msg)
        # what we accepted, we can say again, and it means the same thing
        again = FrameDecoder(max_payload=reader.dec.max_payload)
        again.feed(encode(msg))
        assert again.next_message() == msg, msg
    return reader.out


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mutator import run_fuzzer

    run_fuzzer(check)


if __name__ == "__main__":
    main()
