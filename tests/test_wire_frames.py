"""The frame codec: encode() and FrameDecoder, round-trips, arbitrary splits, and hostile bytes."""

from __future__ import annotations

import struct

import msgpack
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
    Hello,
    Legacy,
    Message,
    Nack,
    Ping,
    Pong,
    Request,
    Stored,
    TensorMeta,
    encode,
    encode_many,
)
from tensord.wire.frames import DEFAULT_MAX_HEADER
from tensord.wire.messages import payload_len

from .support.frame_strategies import (
    EXAMPLES,
    U32,
    U63,
    chunks_with_payload,
    frame_bytes,
    frames,
    legacies_with_payload,
    split_at,
    utf8,
)

MESSAGE_TYPES = (
    Hello, Begin, Accept, Chunk, Ack, Nack, End, Stored, Error, Request, Legacy, Ping, Pong
)  # fmt: skip

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# Helpers.


def drain(dec: FrameDecoder) -> list[tuple[Message, bytes]]:
    """Every complete frame buffered in ``dec`` (a frame whose payload is cut short is dropped)."""
    out = []
    while (msg := dec.next_message()) is not None:
        want = dec.payload_pending
        payload = dec.take_payload()
        if len(payload) < want:
            break
        out.append((msg, payload))
    return out


class Reader:
    """Feeds a decoder piece by piece, the way the I/O layer does.

    ``direct`` models ``recv_into``: once a header announced a payload, the decoder's buffered
    bytes are taken with ``take_payload_into`` and the rest of the payload is read from the stream
    straight into the destination, bypassing the decoder (``payload_received``).
    """

    def __init__(self, direct: bool) -> None:
        self.dec = FrameDecoder()
        self.direct = direct
        self.out: list[tuple[Message, bytes]] = []
        self._msg: Message | None = None
        self._payload = bytearray()
        self._filled = 0

    def _take_buffered(self) -> None:
        if self.direct:
            view = memoryview(self._payload)[self._filled :]
            self._filled += self.dec.take_payload_into(view)
        else:
            got = self.dec.take_payload()
            self._payload[self._filled : self._filled + len(got)] = got
            self._filled += len(got)

    def _finish_if_complete(self) -> bool:
        if self._msg is None or self._filled < len(self._payload):
            return False
        assert self.dec.payload_pending == 0
        self.out.append((self._msg, bytes(self._payload)))
        self._msg = None
        return True

    def _decode_all(self) -> None:
        while True:
            if self._msg is not None:
                self._take_buffered()
                if not self._finish_if_complete():
                    return
            msg = self.dec.next_message()
            if msg is None:
                return
            self._msg = msg
            self._payload = bytearray(payload_len(msg))
            self._filled = 0

    def receive(self, piece: bytes) -> None:
        if self.direct and self._msg is not None:
            # recv_into straight into the destination for what the decoder hasn't buffered
            n = min(len(piece), len(self._payload) - self._filled)
            self._payload[self._filled : self._filled + n] = piece[:n]
            self._filled += n
            self.dec.payload_received(n)
            self._finish_if_complete()
            piece = piece[n:]
            if not piece:
                return
        self.dec.feed(piece)
        self._decode_all()


# ---------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize(("msg", "payload"), EXAMPLES, ids=lambda v: type(v).__name__)
def test_every_message_type_round_trips(msg: Message, payload: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(frame_bytes(msg, payload))
    assert drain(dec) == [(msg, payload)]
    assert dec.buffered == 0
    assert dec.next_message() is None


def test_examples_cover_every_message_type() -> None:
    assert {type(m) for m, _ in EXAMPLES} == set(MESSAGE_TYPES)


@FAST
@given(frame=frames)
def test_round_trip(frame: tuple[Message, bytes]) -> None:
    msg, payload = frame
    dec = FrameDecoder()
    dec.feed(frame_bytes(msg, payload))
    got = dec.next_message()
    assert got == msg
    assert dec.payload_pending == len(payload)
    assert dec.take_payload() == payload
    assert dec.payload_pending == 0
    assert dec.next_message() is None


@FAST
@given(frame=st.one_of(chunks_with_payload(), legacies_with_payload()))
def test_payload_fed_after_the_header(frame: tuple[Message, bytes]) -> None:
    msg, payload = frame
    dec = FrameDecoder()
    dec.feed(encode(msg))
    assert dec.next_message() == msg
    assert dec.payload_pending == len(payload)
    dest = bytearray(len(payload))
    assert dec.take_payload_into(memoryview(dest)) == 0  # nothing buffered yet
    half = len(payload) // 2
    dec.feed(payload[:half])
    assert dec.take_payload_into(memoryview(dest)) == half
    dec.feed(payload[half:] + encode(Ping(7)))
    assert dec.take_payload_into(memoryview(dest)[half:]) == len(payload) - half
    assert bytes(dest) == payload
    assert dec.next_message() == Ping(7)


def test_next_message_refuses_to_skip_an_unconsumed_payload() -> None:
    dec = FrameDecoder()
    dec.feed(frame_bytes(Chunk("ab" * 8, 0, 0, 4, 4, None), b"abcd") + encode(Ping(1)))
    assert isinstance(dec.next_message(), Chunk)
    with pytest.raises(RuntimeError):
        dec.next_message()
    with pytest.raises(RuntimeError):
        dec.payload_received(5)
    assert dec.take_payload(limit=1) == b"a"
    assert dec.take_payload() == b"bcd"
    assert dec.next_message() == Ping(1)


def test_encode_many_is_the_concatenation() -> None:
    msgs = [Ping(1), Stored("ab" * 8), Pong(2)]
    data = encode_many(*msgs)
    assert data == b"".join(encode(m) for m in msgs)
    dec = FrameDecoder()
    dec.feed(data)
    assert [m for m, _ in drain(dec)] == msgs


@FAST
@given(
    stream=st.lists(frames, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 20_000), max_size=30),
    direct=st.booleans(),
)
def test_arbitrary_splits_yield_the_same_messages(
    stream: list[tuple[Message, bytes]], cuts: list[int], direct: bool
) -> None:
    data = b"".join(frame_bytes(m, p) for m, p in stream)
    reader = Reader(direct)
    for piece in split_at(data, cuts):
        reader.receive(piece)
    assert reader.out == stream
    assert reader.dec.buffered == 0


def test_byte_by_byte() -> None:
    data = b"".join(frame_bytes(m, p) for m, p in EXAMPLES)
    for direct in (False, True):
        reader = Reader(direct)
        for i in range(len(data)):
            reader.receive(data[i : i + 1])
        assert reader.out == EXAMPLES


# ---------------------------------------------------------------------------------------------
# Hostile input: messages, None (needs more) or ProtocolError - nothing else.


def feed_all(dec: FrameDecoder, pieces: list[bytes]) -> list[tuple[Message, bytes]]:
    out: list[tuple[Message, bytes]] = []
    for piece in pieces:
        dec.feed(piece)
        out += drain(dec)
    return out


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=5))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(
    data: bytes, cuts: list[int]
) -> None:
    dec = FrameDecoder(max_header=1024, max_payload=4096)
    try:
        feed_all(dec, split_at(data, cuts))
    except ProtocolError as exc:
        assert exc.code in ("protocol", "too_large", "unknown_message", "bad_name", "bad_dtype",
                            "bad_meta")  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=600))
def test_arbitrary_headers_never_raise_anything_but_protocol_error(body: bytes) -> None:
    """A correct length prefix in front of junk reaches the msgpack and field validation."""
    dec = FrameDecoder(max_header=1024, max_payload=4096)
    dec.feed(struct.pack(">I", len(body)) + body + bytes(8192))
    try:
        msg = dec.next_message()
    except ProtocolError:
        return
    assert msg is not None or not body  # a complete header decodes or raises


junk_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), U63)
    | st.floats()
    | st.text(utf8, max_size=20)
    | st.sampled_from(["chunk", "hello", "begin", "tensor", "ack", "accept", "error"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(utf8, max_size=6), inner),
    max_leaves=8,
)
header_keys = st.sampled_from(
    ["t", "id", "i", "o", "r", "n", "c", "z", "u", "v", "f", "mc", "node", "proto", "meta",
     "cs", "w", "resume", "have", "code", "msg", "name", "s"]
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    t=st.sampled_from(
        ["hello", "begin", "accept", "chunk", "ack", "nack", "end", "stored", "error", "request",
         "tensor", "ping", "pong"]
    ),
    fields=st.dictionaries(header_keys, junk_values, max_size=8),
)  # fmt: skip
def test_well_formed_msgpack_with_bad_fields(t: str, fields: dict[str, object]) -> None:
    header = {**fields, "t": t}
    packed = msgpack.packb(header, use_bin_type=True)
    dec = FrameDecoder(max_payload=1 << 20)
    dec.feed(struct.pack(">I", len(packed)) + packed)
    try:
        msg = dec.next_message()
    except ProtocolError:
        return
    assert msg is not None
    assert payload_len(msg) <= 1 << 20


@FAST
@given(
    stream=st.lists(frames, min_size=1, max_size=4),
    flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_flipped_bytes(stream: list[tuple[Message, bytes]], flips: list[tuple[int, int]]) -> None:
    data = bytearray(b"".join(frame_bytes(m, p) for m, p in stream))
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    try:
        got = feed_all(FrameDecoder(max_payload=1 << 20), [bytes(data)])
    except ProtocolError:
        return
    assert all(isinstance(m, MESSAGE_TYPES) and len(p) == payload_len(m) for m, p in got)


@FAST
@given(stream=st.lists(frames, min_size=1, max_size=4), cut=st.integers(0, 1 << 16))
def test_truncated_stream_waits_and_yields_a_prefix(
    stream: list[tuple[Message, bytes]], cut: int
) -> None:
    data = b"".join(frame_bytes(m, p) for m, p in stream)
    cut %= len(data)
    got = feed_all(FrameDecoder(), [data[:cut]])  # never raises: it only needs more bytes
    assert got == stream[: len(got)]
    assert len(got) < len(stream)


@FAST
@given(frame=frames, claimed=st.integers(DEFAULT_MAX_HEADER + 1, U32))
def test_huge_length_prefix_on_a_valid_frame(frame: tuple[Message, bytes], claimed: int) -> None:
    data = bytearray(frame_bytes(*frame))
    data[:4] = struct.pack(">I", claimed)
    dec = FrameDecoder()
    dec.feed(bytes(data))
    with pytest.raises(ProtocolError) as info:
        dec.next_message()
    assert info.value.code == "too_large"


def test_one_gib_header_prefix_raises_at_once_without_waiting() -> None:
    dec = FrameDecoder(max_header=64 * 1024)
    dec.feed(struct.pack(">I", 1 << 30))  # only the 4 prefix bytes: nothing else has arrived
    with pytest.raises(ProtocolError) as info:
        dec.next_message()
    assert info.value.code == "too_large"
    assert dec.buffered == 4  # it did not wait for (or make room for) a gigabyte


def test_header_at_the_limit_waits_and_one_above_raises() -> None:
    dec = FrameDecoder(max_header=1024)
    dec.feed(struct.pack(">I", 1024) + b"\x80")
    assert dec.next_message() is None  # within limits: needs more bytes
    dec = FrameDecoder(max_header=1024)
    dec.feed(struct.pack(">I", 1025))
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_zero_length_header_is_refused() -> None:
    dec = FrameDecoder()
    dec.feed(bytes(4))
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_short_prefix_needs_more() -> None:
    dec = FrameDecoder()
    dec.feed(b"\x00\x00\x00")
    assert dec.next_message() is None


def test_chunk_declaring_a_payload_above_max_payload_raises_on_the_header() -> None:
    limit = 1 << 20
    ok = Chunk("ab" * 8, 0, 0, limit, limit, None)
    too_big = Chunk("ab" * 8, 0, 0, limit + 1, limit + 1, None)
    dec = FrameDecoder(max_payload=limit)
    dec.feed(encode(ok))
    assert dec.next_message() == ok
    dec = FrameDecoder(max_payload=limit)
    dec.feed(encode(too_big))  # the header alone: no payload bytes follow
    with pytest.raises(ProtocolError) as info:
        dec.next_message()
    assert info.value.code == "too_large"
    assert dec.payload_pending == 0


def test_legacy_frame_above_max_payload_raises() -> None:
    meta = TensorMeta("big", "<f4", (1 << 20,), 4 << 20)
    dec = FrameDecoder(max_payload=1 << 20)
    dec.feed(encode(Legacy(meta, None, meta.nbytes)))
    with pytest.raises(ProtocolError) as info:
        dec.next_message()
    assert info.value.code == "too_large"


def test_begin_above_max_tensor_bytes_raises() -> None:
    meta = TensorMeta("big", "<f4", (1 << 20,), 4 << 20)
    dec = FrameDecoder(max_tensor_bytes=1 << 20)
    dec.feed(encode(Begin("ab" * 8, meta, 4096, 4)))
    with pytest.raises(ProtocolError) as info:
        dec.next_message()
    assert info.value.code == "too_large"


def test_legacy_wire_len_must_equal_nbytes() -> None:
    meta = TensorMeta("x", "|u1", (3,), 3)
    dec = FrameDecoder()
    dec.feed(encode(Legacy(meta, None, 4)))
    with pytest.raises(ProtocolError):
        dec.next_message()


def raw_frame(header: object) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed


@pytest.mark.parametrize(
    "header",
    [{"t": "bogus"}, {"t": "Chunk"}, {"t": 3}, {"t": None}, {"s": 1}, {"t": ["ping"]}],
)
def test_unknown_message_type(header: object) -> None:
    dec = FrameDecoder()
    dec.feed(raw_frame(header))
    with pytest.raises(ProtocolError) as info:
        dec.next_message()
    assert info.value.code == "unknown_message"


@pytest.mark.parametrize(
    "header",
    [
        [1, 2, 3],
        "chunk",
        {"t": "ping", "s": -1},
        {"t": "ping", "s": True},
        {"t": "ping", "s": 1.5},
        {"t": "nack", "id": "ABCDEF01", "i": 0},  # ids are lowercase hex
        {"t": "nack", "id": "abc", "i": 0},
        {"t": "nack", "id": "deadbeef\n", "i": 0},  # "$" would let a trailing newline through
        {"t": "end", "id": "ab" * 8, "c": 1 << 32},
        {"t": "chunk", "id": "ab" * 8, "i": 0, "o": 0, "r": 1, "n": 1, "z": "yes"},
        {"t": "accept", "id": "ab" * 8, "have": [[3, 3]]},
        {"t": "accept", "id": "ab" * 8, "have": [[0, 1, 2]]},
        {"t": "hello", "proto": "tensord", "v": [], "node": "n", "f": [], "mc": 1},
        {"t": "hello", "proto": "tensord", "v": [1], "node": "n", "f": ["x" * 33], "mc": 1},
        {"t": "begin", "id": "ab" * 8, "meta": {"name": "../x"}, "cs": 4096, "w": 1},
        {"t": "error", "code": "x", "msg": "y" * 1025},
    ],
)
def test_invalid_fields_raise_protocol_error(header: object) -> None:
    dec = FrameDecoder()
    dec.feed(raw_frame(header))
    with pytest.raises(ProtocolError):
        dec.next_message()


@pytest.mark.parametrize(
    "name", ["layers//0", "a/../b", "/abs", "x/", ".", "nul\x00byte", "x" * 4096, "", 7, None]
)
def test_a_request_with_a_bad_name_is_refused_as_bad_name(name: object) -> None:
    """The pull that killed the serving daemon (issue 12): a bad name never leaves the decoder."""
    dec = FrameDecoder()
    dec.feed(raw_frame({"t": "request", "name": name}))
    with pytest.raises(ProtocolError, match="bad tensor name") as info:
        dec.next_message()
    assert info.value.code == "bad_name"


@pytest.mark.parametrize("mc", [0, 1, 4095])
def test_a_hello_announcing_a_tiny_max_chunk_is_refused(mc: int) -> None:
    """A peer's ``mc`` sizes our chunking of what we send it: below 4 KiB it would make the
    sender build per-chunk state for one-byte chunks (80 bytes of RAM per tensor byte)."""
    dec = FrameDecoder()
    dec.feed(
        raw_frame({"t": "hello", "proto": "tensord", "v": [1], "node": "n", "f": [], "mc": mc})
    )
    with pytest.raises(ProtocolError, match="'mc'"):
        dec.next_message()


def test_invalid_msgpack_raises_protocol_error() -> None:
    for body in (b"\xc1", b"\x81\xa1t", b"\xd9\x05ab", b"\x81\xc4\x01x\x01", b"\xa2\xff\xfe"):
        dec = FrameDecoder()
        dec.feed(struct.pack(">I", len(body)) + body)
        with pytest.raises(ProtocolError):
            dec.next_message()


def test_trailing_bytes_inside_the_header_are_refused() -> None:
    packed = msgpack.packb({"t": "ping", "s": 1}) + b"\x00"
    dec = FrameDecoder()
    dec.feed(struct.pack(">I", len(packed)) + packed)
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_long_error_message_is_truncated_not_refused() -> None:
    dec = FrameDecoder()
    dec.feed(encode(Error("failed", "x" * 5000, None)))
    msg = dec.next_message()
    assert isinstance(msg, Error)
    assert msg.message == "x" * 1024


def test_a_peers_error_text_loses_its_control_characters_and_bad_node_ids_are_refused() -> None:
    dec = FrameDecoder()
    dec.feed(encode(Error("x\x1b[2J", "line\nbreak\x07 \x9bcsi", None)))
    assert dec.next_message() == Error("x?[2J", "line?break? ?csi", None)
    for node in ("", "a b", "x\n", "-lead", "\x1b[31m"):
        dec = FrameDecoder()
        hello = {"t": "hello", "proto": "tensord", "v": [1], "node": node, "f": [], "mc": 1}
        body = msgpack.packb(hello)
        dec.feed(struct.pack(">I", len(body)) + body)
        with pytest.raises(ProtocolError, match="node id"):
            dec.next_message()
