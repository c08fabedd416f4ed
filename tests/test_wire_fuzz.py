"""Structured fuzzing of tensord/wire against a hostile peer, with hypothesis.

The contract: any byte sequence fed to ``FrameDecoder`` yields valid messages or raises
``ProtocolError`` - never another exception type, never more than one header's worth of bytes
waited for, never a frame that consumes nothing. A ``ReceiveTransfer`` fed any well-typed but
hostile message sequence raises only ``ProtocolError``, writes nothing outside its destination,
never overwrites a chunk it verified, and answers ``stored`` only for bytes that match the
whole-tensor crc32c.

test_wire_frames.py and test_wire_transfer.py test the codec and the state machines on their own
terms; this file attacks them: (a) random bytes and msgpack token soup, (b) mutations of valid
frames, (c) valid streams read through a reused receive buffer, (d) hostile transfers. The byte
level tests read through ``fuzz/fuzz_frames.py``'s ``Reader`` and the transfer tests through
``fuzz/fuzz_transfer.py``'s probes - the code the atheris harnesses run - so the invariants they
assert hold on every example here too. Regressions for the bugs found while building this (and
what finds them again when the fix is taken out) are at the end.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lz4.block
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import fuzz_frames, fuzz_transfer, make_corpus
from fuzz.fuzz_transfer import ReceiveProbe
from tensord.errors import ProtocolError
from tensord.wire.compress import lz4_bound
from tensord.wire.crc import crc32c
from tensord.wire.frames import DEFAULT_MAX_HEADER, MAX_HEADER_DEPTH, PREFIX, FrameDecoder, encode
from tensord.wire.messages import (
    Accept,
    Ack,
    Auth,
    Begin,
    Chunk,
    End,
    Error,
    Hello,
    Message,
    Nack,
    Ping,
    Stored,
    from_header,
    payload_len,
    to_header,
)
from tensord.wire.meta import ALLOWED_DTYPES, TensorMeta
from tensord.wire.transfer import ReceiveState, SendState, SendTransfer, chunk_count

from .support.frame_strategies import EXAMPLES, frame_bytes, split_at
from .support.frame_strategies import frames as valid_frames

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
XID = "0123456789abcdef"
U63 = (1 << 63) - 1

#: Every message type with a payload-less example (or a chunk with its payload), the auth ones too.
ALL_EXAMPLES: list[tuple[Message, bytes]] = [
    *EXAMPLES,
    (Hello("tensord", (1, 2), "gpu-2", frozenset({"crc32c"}), 4096, b"n" * 32, b"p" * 32), b""),
    (Auth(b"\x01" * 32), b""),
]
extra_frames = st.sampled_from(ALL_EXAMPLES)
any_frames = st.one_of(valid_frames, extra_frames)


def read(
    data: bytes,
    cuts: list[int] | tuple[int, ...] = (),
    *,
    direct: bool = False,
    small: bool = False,
) -> tuple[list[tuple[Message, bytes]], ProtocolError | None]:
    """Read ``data`` cut at ``cuts`` like the I/O layer: the complete frames, and the error."""
    flags = (fuzz_frames.DIRECT if direct else 0) | (fuzz_frames.SMALL if small else 0)
    reader = fuzz_frames.Reader(fuzz_frames.decoder(flags), direct)
    try:
        for piece in split_at(data, list(cuts)):
            reader.receive(piece)
    except ProtocolError as exc:
        assert exc.code in fuzz_frames.CODES, exc.code
        return reader.out, exc
    return reader.out, None


def assert_restatable(frames: list[tuple[Message, bytes]]) -> None:
    """Whatever the decoder accepted is a message we can encode, and it decodes to itself."""
    for msg, payload in frames:
        assert len(payload) == payload_len(msg)
        dec = FrameDecoder(max_payload=1 << 30)
        dec.feed(encode(msg))
        assert dec.next_message() == msg


def raw_frame(header: object) -> bytes:
    body = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(len(body)) + body


def decode_one(data: bytes) -> Message | None:
    dec = FrameDecoder()
    dec.feed(data)
    return dec.next_message()


# ---------------------------------------------------------------------------------------------
# (a) random bytes


@FAST
@given(
    prefix=st.lists(any_frames, max_size=4),
    junk=st.binary(min_size=1, max_size=1500),
    cuts=st.lists(st.integers(0, 6000), max_size=8),
    direct=st.booleans(),
    small=st.booleans(),
)
def test_a_valid_conversation_that_turns_to_junk(
    prefix: list[tuple[Message, bytes]], junk: bytes, cuts: list[int], direct: bool, small: bool
) -> None:
    """Every frame before the junk arrives intact; the junk yields messages or ProtocolError."""
    good = b"".join(frame_bytes(m, p) for m, p in prefix)
    small = small and all(  # the small limits only where the good frames are within them
        len(encode(m)) - PREFIX.size <= fuzz_frames.SMALL_HEADER
        and len(p) <= fuzz_frames.SMALL_PAYLOAD
        for m, p in prefix
    )
    got, err = read(good + junk, cuts, direct=direct, small=small)
    assert got[: len(prefix)] == prefix
    assert err is not None or len(got) >= len(prefix)
    assert_restatable(got)


HEADER_WORDS = (
    "t", "id", "i", "o", "r", "n", "c", "z", "u", "meta", "name", "dtype", "shape", "nbytes", "cs",
    "w", "resume", "have", "v", "f", "mc", "nc", "pf", "code", "msg", "s", "chunk", "begin",
    "tensor", "hello", "auth", "ack", "accept", "end", "error", "ping", XID, "<f4", "|u1",
    "bfloat16", "x",
)  # fmt: skip

#: Pieces of msgpack a header is made of, valid and not: containers with counts that may not
#: match, the protocol's own keys and names, every int width (with their extremes), floats,
#: strings and binaries whose declared length overruns, ext types, the never-used byte 0xc1.
_TOKENS = st.one_of(
    st.integers(0x80, 0x8F).map(lambda b: bytes([b])),  # fixmap
    st.integers(0x90, 0x9F).map(lambda b: bytes([b])),  # fixarray
    st.sampled_from([b"\xdc\x00\x02", b"\xdc\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xde\x00\x03"]),
    st.sampled_from([b"\xde\x00\x41", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff"]),
    st.sampled_from(HEADER_WORDS).map(msgpack.packb),
    st.integers(-(1 << 63), (1 << 64) - 1).map(msgpack.packb),
    st.sampled_from([0, 1, 4096, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -1, -(1 << 63)]).map(
        msgpack.packb
    ),
    st.sampled_from(
        [b"\xc0", b"\xc2", b"\xc3", b"\xc1", b"\xca\x7f\xc0\x00\x00", b"\xcb" + bytes(8)]
    ),
    st.binary(max_size=40).map(lambda b: msgpack.packb(b, use_bin_type=True)),
    st.sampled_from([b"\xc4\x40", b"\xc5\xff\xff", b"\xd4\x01\x00", b"\xd6\xff" + bytes(4)]),
    st.sampled_from([b"\xc7\x00\x05", b"\xc7\x00\xff", b"\xa5ab"]),
    st.binary(min_size=1, max_size=4),
)


@settings(max_examples=400, deadline=None)
@given(
    tokens=st.lists(_TOKENS, min_size=1, max_size=40),
    t=st.sampled_from(["chunk", "begin", "tensor", "hello", "auth", "ack", "accept", "error"]),
    typed=st.booleans(),
    prefix_delta=st.sampled_from([0, 0, 0, -1, 1, 7]),
)
def test_msgpack_token_soup(tokens: list[bytes], t: str, typed: bool, prefix_delta: int) -> None:
    """Headers assembled from msgpack tokens reach deep into msgpack and field validation."""
    body = b"".join(tokens)
    if typed:  # a map whose first key is a real type, so the soup reaches the field checks
        body = b"\x8f\xa1t" + msgpack.packb(t) + body
    hlen = max(len(body) + prefix_delta, 0)
    got, err = read(PREFIX.pack(hlen) + body + bytes(8))
    assert err is not None or got or hlen > len(body) + 8
    assert_restatable(got)


# ---------------------------------------------------------------------------------------------
# (b) mutations of valid frames


@st.composite
def mutations(draw: st.DrawFn, size: int) -> tuple[int, Callable[[bytearray], None]]:
    """A mutation of a ``size``-byte stream, and the first offset it may change."""
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "delete", "repeat", "insert"]))
    pos = draw(st.integers(0, max(size - 1, 0)))
    n = draw(st.integers(1, 64))
    if kind == "flip":
        bit = draw(st.integers(0, 7))

        def flip(b: bytearray) -> None:
            if pos < len(b):
                b[pos] ^= 1 << bit

        return pos, flip
    if kind == "truncate":
        return pos, lambda b: b.__delitem__(slice(pos, None))
    if kind == "delete":
        return pos, lambda b: b.__delitem__(slice(pos, pos + n))
    if kind == "insert":
        junk = draw(st.binary(min_size=1, max_size=64))
        return pos, lambda b: b.__setitem__(slice(pos, pos), junk)
    src = draw(st.integers(0, max(size - 1, 0)))
    if kind == "repeat":  # a stretch of the stream again, right after itself
        return pos, lambda b: b.__setitem__(slice(pos, pos), b[pos : pos + n])
    # splice: bytes from elsewhere in the stream (another frame's header) pasted over these
    return pos, lambda b: b.__setitem__(slice(pos, pos + n), b[src : src + n])


@st.composite
def length_edits(
    draw: st.DrawFn, stream: list[tuple[Message, bytes]]
) -> tuple[int, Callable[[bytearray], None]]:
    """A frame's header-length prefix edited: off by a little, zero, at and past the limit."""
    k = draw(st.integers(0, len(stream) - 1))
    start = sum(len(frame_bytes(m, p)) for m, p in stream[:k])
    hlen = len(encode(stream[k][0])) - PREFIX.size
    new = draw(
        st.one_of(
            st.integers(max(hlen - 8, 0), hlen + 8),
            st.sampled_from([0, 1, DEFAULT_MAX_HEADER, DEFAULT_MAX_HEADER + 1, 0xFFFFFFFF]),
        )
    )
    return start, lambda b: b.__setitem__(slice(start, start + PREFIX.size), PREFIX.pack(new))


@FAST
@given(
    stream=st.lists(any_frames, min_size=1, max_size=4),
    data=st.data(),
    cuts=st.lists(st.integers(0, 6000), max_size=6),
    direct=st.booleans(),
)
def test_mutated_streams(
    stream: list[tuple[Message, bytes]], data: st.DataObject, cuts: list[int], direct: bool
) -> None:
    """Bit flips, truncations, splices, repeats, insertions and length edits: the frames before
    the first changed byte arrive intact, and what follows is messages or ProtocolError."""
    original = b"".join(frame_bytes(m, p) for m, p in stream)
    ops = data.draw(
        st.lists(st.one_of(mutations(len(original)), length_edits(stream)), min_size=1, max_size=3)
    )
    mutated = bytearray(original)
    for _, op in ops:
        op(mutated)
    first = min(pos for pos, _ in ops)
    intact, end = 0, 0
    for m, p in stream:
        end += len(frame_bytes(m, p))
        if end > first:
            break
        intact += 1
    got, err = read(bytes(mutated), cuts, direct=direct)
    assert got[:intact] == stream[:intact]
    if bytes(mutated) == original:
        assert got == stream and err is None
    assert_restatable(got)


def _paths(node: object, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], object]]:
    """Every (path, value) in a header: map values and list items, at every depth."""
    if isinstance(node, dict):
        items: Any = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return
    for key, value in items:
        yield (*path, key), value
        yield from _paths(value, (*path, key))


def _set(header: dict[str, Any], path: tuple[Any, ...], value: object) -> dict[str, Any]:
    out = copy.deepcopy(header)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def _delete(header: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    out = copy.deepcopy(header)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


#: Values no header field accepts: every field is an int in a range that excludes these, a
#: string, a boolean, a list of ints/strings/ranges, a map (``meta``) or 32 bytes.
NEVER_VALID: list[object] = [
    1.5,
    float("nan"),
    -1,
    1 << 63,
    (1 << 64) - 1,
    -(1 << 63),
    [[[0]]],
    {"x": {"y": 1}},
    b"\x00" * 5,
]


def _wrong_for(value: object) -> list[object]:
    """More values of a type other than the field's (the field's own type is judged by value)."""
    if isinstance(value, bool):
        return [0, 1, "true", None]
    if isinstance(value, int):
        return [True, False, "7", 7.0]
    if isinstance(value, str):
        return [7, True, [value]]
    if isinstance(value, bytes):
        return [value.hex(), list(value), value[:-1], value + b"\x00"]
    if value is None:  # an optional crc or transfer id
        return ["x", False, [1]]
    return [None, "x", 0]


MSG_IDS = [type(m).__name__ + str(k) for k, (m, _) in enumerate(ALL_EXAMPLES)]


@pytest.mark.parametrize(("msg", "payload"), ALL_EXAMPLES, ids=MSG_IDS)
def test_every_field_with_a_value_of_the_wrong_type_is_refused(
    msg: Message, payload: bytes
) -> None:
    header = to_header(msg)
    checked = 0
    for path, value in _paths(header):
        if path == ("msg",) and isinstance(msg, Error):
            continue  # the message text: any string goes, and it is truncated rather than refused
        for junk in [*NEVER_VALID, *_wrong_for(value)]:
            bad = _set(header, path, junk)
            with pytest.raises(ProtocolError):
                decode_one(raw_frame(bad) + payload)
            checked += 1
    assert checked >= 10


#: Keys a message may leave out, and what leaving them out means.
OPTIONAL = {
    "hello": {"nc", "pf"},
    "begin": {"resume", ("meta", "grad")},
    "accept": {"have"},
    "chunk": {"c", "z"},
    "ack": {"r"},
    "end": {"c"},
    "error": {"id"},
    "tensor": {"c", ("meta", "grad")},
}


@pytest.mark.parametrize(("msg", "payload"), ALL_EXAMPLES, ids=MSG_IDS)
def test_missing_fields(msg: Message, payload: bytes) -> None:
    """A required field left out is refused; an optional one takes its default."""
    header = to_header(msg)
    optional = OPTIONAL.get(header["t"], set())
    for path, _ in _paths(header):
        if isinstance(path[-1], int) or path == ("t",):
            continue
        less = _delete(header, path)
        key = path[0] if len(path) == 1 else path
        if key not in optional:
            with pytest.raises(ProtocolError):
                decode_one(raw_frame(less) + payload)
            continue
        got = decode_one(raw_frame(less) + payload)
        assert type(got) is type(msg)
        again = to_header(got)  # the same message but for the field left out
        for p, v in _paths(less):
            if p[: len(path)] != path and path[: len(p)] != p:  # not it, nor what holds it
                assert _lookup(again, p) == v


def _lookup(header: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        header = header[key]
    return header


@FAST
@given(
    example=extra_frames,
    key=st.one_of(st.integers(-(1 << 63), (1 << 64) - 1), st.floats(), st.booleans(), st.none()),
    inside_meta=st.booleans(),
)
def test_non_string_keys_are_refused(
    example: tuple[Message, bytes], key: object, inside_meta: bool
) -> None:
    msg, payload = example
    header: dict[Any, Any] = to_header(msg)
    target = header["meta"] if inside_meta and "meta" in header else header
    target[key] = 1
    with pytest.raises(ProtocolError):
        decode_one(raw_frame(header) + payload)


@FAST
@given(
    example=extra_frames,
    extra=st.dictionaries(
        st.text(min_size=3, max_size=8),  # no key of the message's own: they are 1-2 letters or
        # always present (a clash is overwritten by the real value below)
        st.none()
        | st.integers(-5, 5)
        | st.text(max_size=5)
        | st.lists(st.integers(0, 9), max_size=3),
        max_size=5,
    ),
)
def test_unknown_string_keys_are_ignored(
    example: tuple[Message, bytes], extra: dict[str, object]
) -> None:
    """Forward compatibility: a newer peer's extra fields don't change what we decode."""
    msg, payload = example
    header = {**extra, **to_header(msg)}
    dec = FrameDecoder()
    dec.feed(raw_frame(header) + payload)
    assert dec.next_message() == msg


# ---------------------------------------------------------------------------------------------
# (c) valid streams survive any split, read through a receive buffer that is reused


@FAST
@given(
    stream=st.lists(any_frames, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 8000), max_size=40),
    direct=st.booleans(),
    tight=st.booleans(),
)
def test_valid_streams_through_a_reused_receive_buffer(
    stream: list[tuple[Message, bytes]], cuts: list[int], direct: bool, tight: bool
) -> None:
    """The I/O layer reads into one buffer and hands the decoder a view of it; the next read
    overwrites it. The decoder must have copied what it keeps. With ``tight`` limits, the largest
    header and payload in the stream are exactly at the limits."""
    data = b"".join(frame_bytes(m, p) for m, p in stream)
    if tight:
        dec = FrameDecoder(
            max_header=max(len(encode(m)) - PREFIX.size for m, _ in stream),
            max_payload=max(len(p) for _, p in stream),
        )
    else:
        dec = FrameDecoder()
    reader = fuzz_frames.Reader(dec, direct)
    recv_buf = bytearray(8192)
    for piece in split_at(data, cuts):
        for pos in range(0, len(piece), len(recv_buf)):
            part = piece[pos : pos + len(recv_buf)]
            recv_buf[: len(part)] = part
            reader.receive(memoryview(recv_buf)[: len(part)])
            recv_buf[:] = b"\xee" * len(recv_buf)  # the next recv_into scribbles over it
    assert reader.out == stream
    assert dec.buffered == 0 and dec.payload_pending == 0
    assert dec.next_message() is None


# ---------------------------------------------------------------------------------------------
# (d) hostile transfers


def tensor_bytes(n: int, seed: int) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)
    data[: n // 3] = 0  # some chunks compress
    return data.tobytes()


@st.composite
def transfer_setups(draw: st.DrawFn) -> tuple[Begin, int, bool]:
    """A Begin, the seed of the tensor's bytes and whether crc32c was negotiated."""
    nbytes = draw(
        st.sampled_from([3 * 4096 + 100, 5 * 4096, 0, 1, 4095, 4096, 4097])
        | st.integers(2 * 4096, 6 * 4096)
    )
    chunk_size = draw(st.sampled_from([4096, 4096, 4096, 8192, 5000, 3 * 4096]))
    meta = TensorMeta("model.w", "|u1", (nbytes,), nbytes)
    window = draw(st.integers(1, 16))
    return Begin(XID, meta, chunk_size, window), draw(st.integers(0, 99)), draw(st.booleans())


#: What can be wrong with a chunk: a header that disagrees with the transfer (overlapping or
#: misplaced offsets, lengths off by one or huge, another transfer's id), a payload length other
#: than the one read, a payload damaged on the way, a wrong or missing checksum. A chunk gets
#: none, one or two of them.
FAULTS = (
    "offset-1", "offset+1", "offset=next", "offset=0", "offset=end", "offset=huge",
    "raw-1", "raw+1", "raw=chunk", "raw=0", "raw=huge",
    "wire-1", "wire+1", "wire=raw", "wire=bound", "wire=bound+1", "wire=0",
    "crc-wrong", "crc-none", "crc-of-raw", "other-id", "damaged", "damaged", "damaged",
)  # fmt: skip
PAYLOADS = ["data"] * 4 + ["junk", "zeros", "neighbour"]
chunk_events = st.tuples(
    st.just("chunk"),
    st.integers(0, 31),  # the index: modulo nchunks + 1, but 30 and 31 stand for huge ones
    st.just(()) | st.lists(st.sampled_from(FAULTS), min_size=1, max_size=2).map(tuple),
    st.sampled_from(PAYLOADS),
    st.booleans(),  # compressed
    st.integers(0, 2**32 - 1),  # seed of the junk
)
end_events = st.tuples(
    st.just("end"),
    st.sampled_from(["right", "right", "wrong", "none"]),
    st.sampled_from([XID] * 4 + ["fedcba9876543210"]),
)
_EVENTS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "chunk": chunk_events,
    "end": end_events,
    "reconnect": st.tuples(st.just("reconnect"), st.booleans()),
    "fill": st.tuples(st.just("fill"), st.integers(1, 6)),  # an honest sender: its next 1-6 chunks
    "finish": st.tuples(st.just("finish")),  # an honest sender: every missing chunk, then End
    "damaged": st.tuples(  # a good chunk damaged on the way, and nothing else wrong
        st.just("chunk"),
        st.integers(0, 29),
        st.just(("damaged",)),
        st.just("data"),
        st.booleans(),
        st.just(0),
    ),
}
events = st.sampled_from(["chunk"] * 4 + ["end", "reconnect", "fill", "finish", "damaged"]).flatmap(
    _EVENTS.__getitem__
)


def _hostile_chunk(probe: ReceiveProbe, data: bytes, ev: tuple[Any, ...]) -> tuple[Chunk, bytes]:
    """The chunk header and payload an event stands for, relative to the transfer."""
    _, index, faults, pay_kind, compressed, seed = ev
    rx = probe.rx
    index = {30: U63, 31: 1 << 40}.get(index, index % (rx.nchunks + 1))
    cs = rx.chunk_size
    offset = index * cs
    raw_len = rx.chunk_len(index) if index < rx.nchunks else 100
    for fault in faults:
        match fault:
            case "offset-1" | "offset+1":
                offset = max(offset + (1 if fault == "offset+1" else -1), 0)
            case "offset=next":
                offset += cs
            case "offset=0" | "offset=end" | "offset=huge":
                offset = {"offset=0": 0, "offset=end": len(data), "offset=huge": U63}[fault]
            case "raw-1" | "raw+1":
                raw_len = max(raw_len + (1 if fault == "raw+1" else -1), 0)
            case "raw=chunk" | "raw=0" | "raw=huge":
                raw_len = {"raw=chunk": cs, "raw=0": 0, "raw=huge": 1 << 40}[fault]
    start = min(index * cs, len(data))
    n = min(raw_len, 3 * cs)
    raw = {
        "data": data[start : start + n],
        "junk": np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes(),
        "zeros": bytes(n),
        "neighbour": data[start + cs : start + cs + n],
    }[pay_kind]
    body = lz4.block.compress(raw, store_size=False) if compressed else raw
    wire_len = len(body)
    for fault in faults:
        match fault:
            case "wire-1" | "wire+1":
                wire_len = max(wire_len + (1 if fault == "wire+1" else -1), 0)
            case "wire=raw" | "wire=0":
                wire_len = raw_len if fault == "wire=raw" else 0
            case "wire=bound" | "wire=bound+1":
                wire_len = lz4_bound(raw_len) + (fault == "wire=bound+1")
    wire_len = min(wire_len, 4 * cs)
    payload = (body + bytes(wire_len))[:wire_len]  # the I/O layer reads exactly wire_len bytes
    crc: int | None = crc32c(payload)
    if "damaged" in faults and payload:  # on the way: the crc32c is of what was sent
        payload = bytes([payload[0] ^ 0x40]) + payload[1:]
    if "crc-wrong" in faults:
        crc = crc32c(payload) ^ 1
    elif "crc-none" in faults:
        crc = None
    elif "crc-of-raw" in faults:
        crc = crc32c(raw)
    xid = "fedcba9876543210" if "other-id" in faults else XID
    return Chunk(xid, index, offset, raw_len, wire_len, crc, compressed), payload


def _drive(probe: ReceiveProbe, begin: Begin, data: bytes, ev: tuple[Any, ...]) -> None:
    rx = probe.rx
    match ev[0]:
        case "chunk":
            probe.chunk(*_hostile_chunk(probe, data, ev))
        case "end":
            crc = {"right": crc32c(data), "wrong": crc32c(data) ^ 1, "none": None}[ev[1]]
            probe.end_(End(ev[2], crc))
        case "reconnect":
            probe.rebegin(Begin(begin.id, begin.meta, begin.chunk_size, begin.window, ev[1]))
        case "fill":  # an honest sender sends (up to ev[1] of) the chunks still missing, in order
            have, _ = rx.progress()
            missing = [i for i in range(rx.nchunks) if not have[i]][: ev[1]]
            for i in missing:
                if rx.state is ReceiveState.RECEIVING:
                    off = i * rx.chunk_size
                    payload = data[off : off + rx.chunk_len(i)]
                    c = Chunk(rx.id, i, off, len(payload), len(payload), crc32c(payload))
                    probe.chunk(c, payload)
        case "finish":
            _drive(probe, begin, data, ("fill", None))
            if rx.state is ReceiveState.RECEIVING:
                probe.end_(End(XID, crc32c(data)))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=transfer_setups(), script=st.lists(events, max_size=25))
def test_hostile_transfer(setup: tuple[Begin, int, bool], script: list[tuple[Any, ...]]) -> None:
    """Overlapping offsets, indices out of range, lengths that disagree with the meta, junk and
    damaged payloads, duplicates, chunks and ends after the end, ends of another transfer, cuts
    and resumes. Only ProtocolError comes out; after one, the node keeps the partial and the
    sender resumes on a new connection. ReceiveProbe asserts, after every step, that nothing
    outside the tensor was written, no verified chunk changed, every reply is well-formed and
    ``stored`` came only with bytes that match the whole-tensor crc32c."""
    begin, seed, crc = setup
    data = tensor_bytes(begin.meta.nbytes, seed)
    probe = ReceiveProbe(begin, crc=crc)
    rx = probe.rx
    refused = 0
    for ev in script:
        if rx.state is not ReceiveState.RECEIVING and ev[0] in ("reconnect", "fill", "finish"):
            continue  # the node forgets a finished transfer: nothing to resume
        try:
            _drive(probe, begin, data, ev)
        except ProtocolError:
            refused += 1
            if rx.state is ReceiveState.RECEIVING:
                probe.rebegin(Begin(begin.id, begin.meta, begin.chunk_size, begin.window, True))
        probe.check()
    if rx.complete:
        assert Stored(XID) in probe.replies
        assert rx.have_count == rx.nchunks == chunk_count(len(data), begin.chunk_size)
    if rx.state is ReceiveState.RECEIVING:
        # an honest sender still gets to an answer after whatever came before
        _drive(probe, begin, data, ("fill", None))
        if rx.state is ReceiveState.RECEIVING:
            replies = probe.end_(End(XID, crc32c(data) if crc else None))
            # stored, or (junk with a matching chunk crc was taken earlier) a checksum error
            assert replies == [Stored(XID)] or (crc and [type(r) for r in replies] == [Error])
        assert rx.state is not ReceiveState.RECEIVING
    assert refused or not any(ev[0] == "chunk" and "other-id" in ev[2] for ev in script)


@FAST
@given(
    size=st.integers(0, 40),
    flags=st.sampled_from([0, 1, 4, 5]),
    replies=st.lists(
        st.one_of(
            st.builds(Ack, st.just(XID), st.integers(0, 12), st.lists(
                st.tuples(st.integers(0, 12), st.integers(1, 4)).map(lambda t: (t[0], t[0] + t[1])),
                max_size=3).map(tuple)),
            st.builds(Nack, st.just(XID), st.integers(0, 12)),
            st.builds(Accept, st.just(XID), st.lists(
                st.tuples(st.integers(0, 12), st.integers(1, 1 << 30)).map(
                    lambda t: (t[0], min(t[0] + t[1], (1 << 40) - 1))), max_size=3).map(tuple)),
            st.builds(Stored, st.just(XID)),
            st.builds(Error, st.just("checksum"), st.just("x"), st.just(XID) | st.none()),
            st.builds(Ping, st.integers(0, 3)),  # a cut and a resume
            st.builds(End, st.just(XID), st.none()),  # not a reply at all
            st.builds(Ack, st.just("fedcba9876543210"), st.integers(0, 3)),
        ),
        max_size=20,
    ),
)  # fmt: skip
def test_hostile_replies_to_a_sender(size: int, flags: int, replies: list[Message]) -> None:
    """Acks of unsent chunks, nacks out of range, accepts past the end, stored before end: only
    ProtocolError, never more chunks in flight than the window, every chunk it sends is right."""
    stream = b"".join(encode(m) for m in replies)
    tx = fuzz_transfer.check_send(flags | fuzz_transfer.SENDER, size, stream)
    assert 0 <= tx.bytes_acked <= size * 1000
    assert tx.state is not SendState.DONE or tx.bytes_acked == size * 1000


def test_a_resume_must_be_for_the_same_tensor_and_chunking() -> None:
    meta = TensorMeta("model.w", "|u1", (10000,), 10000)
    probe = ReceiveProbe(Begin(XID, meta, 4096, 4), crc=True)
    rx = probe.rx
    assert rx.matches(Begin(XID, meta, 4096, 9, True))  # another window is fine
    assert not rx.matches(Begin("fedcba9876543210", meta, 4096, 4, True))
    assert not rx.matches(Begin(XID, meta, 8192, 4, True))
    for other in (
        TensorMeta("model.v", "|u1", (10000,), 10000),
        TensorMeta("model.w", "|i1", (10000,), 10000),
        TensorMeta("model.w", "|u1", (100, 100), 10000),
        TensorMeta("model.w", "|u1", (10000,), 10000, True),
    ):
        assert not rx.matches(Begin(XID, other, 4096, 4, True))


# ---------------------------------------------------------------------------------------------
# Seeds


CORPUS = Path(make_corpus.__file__).parent / "corpus"


def test_the_committed_corpus_is_what_make_corpus_writes() -> None:
    expected = make_corpus.outputs()
    for path, data in expected.items():
        assert path.exists(), f"{path} is missing: run fuzz/make_corpus.py"
        assert path.read_bytes() == data, f"{path} is stale: run fuzz/make_corpus.py"
    on_disk = {p for p in CORPUS.rglob("*") if p.is_file()}
    assert on_disk == {p for p in expected if CORPUS in p.parents}


@pytest.mark.parametrize("path", sorted((CORPUS / "frames").glob("*.bin")), ids=lambda p: p.name)
def test_frame_seeds_decode_whole(path: Path) -> None:
    data = path.read_bytes()
    frames = fuzz_frames.check(data)
    assert frames, "a seed that decodes to nothing gives the fuzzer nothing to start from"
    assert sum(len(frame_bytes(m, p)) for m, p in frames) == len(data) - 2


@pytest.mark.parametrize("path", sorted((CORPUS / "transfer").glob("*.bin")), ids=lambda p: p.name)
def test_transfer_seeds_complete(path: Path) -> None:
    result = fuzz_transfer.check(path.read_bytes())
    if isinstance(result, ReceiveProbe):
        assert result.rx.complete and result.replies[-1] == Stored(XID)
    else:
        assert isinstance(result, SendTransfer)
        assert result.state in (SendState.ENDED, SendState.DONE, SendState.FAILED)
        assert result.stats.chunks_sent > 0


# ---------------------------------------------------------------------------------------------
# Regressions. Each bug was found reviewing the wire code for this file; each docstring says which
# fuzzer finds it again, unaided, when the fix is taken out.


def _nested(depth: int) -> bytes:
    """msgpack of ``[[[...[]...]]]``, ``depth`` lists deep."""
    return b"\x91" * (depth - 1) + b"\x90"


def _header_with(position: str, value: bytes) -> bytes:
    """A header map whose ``position`` holds the raw msgpack ``value`` (the rest is valid)."""

    def kv(k: str, v: bytes) -> bytes:
        return msgpack.packb(k) + v

    p = msgpack.packb
    if position in ("t", "id", "extra"):
        fields = {"t": p("nack"), "id": p(XID), "i": p(0)}
        fields[position if position != "extra" else "zz"] = value
        body = bytes([0x80 | len(fields)]) + b"".join(kv(k, v) for k, v in fields.items())
    else:
        key = position.split(".")[1]
        meta = {"name": p("w"), "dtype": p("<f4"), "shape": p([1]), "nbytes": p(4)}
        meta[key] = value
        meta_raw = bytes([0x80 | len(meta)]) + b"".join(kv(k, v) for k, v in meta.items())
        fields = {"t": p("begin"), "id": p(XID), "cs": p(4096), "w": p(1), "meta": meta_raw}
        body = bytes([0x80 | len(fields)]) + b"".join(kv(k, v) for k, v in fields.items())
    return PREFIX.pack(len(body)) + body


def _at_stack_depth(frames: int, fn: Callable[[], object]) -> object:
    """Call ``fn`` with ``frames`` more Python frames on the stack (trio's stack is deep)."""
    if frames <= 0:
        return fn()
    return _at_stack_depth(frames - 1, fn)


@pytest.mark.parametrize("depth", [MAX_HEADER_DEPTH + 1, 100, 900, 990, 1000, 1010, 1023])
@pytest.mark.parametrize("position", ["t", "id", "extra", "meta.name", "meta.dtype", "meta.shape"])
@pytest.mark.parametrize("stack", [0, 300])
def test_deeply_nested_header_is_a_protocol_error(depth: int, position: str, stack: int) -> None:
    """msgpack nests up to 1024 deep, and the ``repr`` in the error message for a bad type or
    tensor name raised RecursionError past ~990 levels (fewer under trio's deeper stack).
    fuzz_frames with mutator.py finds it in under a hundred runs without the depth limit."""
    data = _header_with(position, _nested(depth))

    def decode() -> None:
        with pytest.raises(ProtocolError):
            decode_one(data)

    _at_stack_depth(stack, decode)
    assert fuzz_frames.check(bytes([0, 0]) + data) == []


def test_fuzzer_reproducer_of_the_nesting_crash() -> None:
    """fuzz_frames' crash input (the depth limit taken out): a nack whose type is nested 1010 deep.
    Its 1046 bytes are mostly 0x91, so it is rebuilt here rather than pasted."""
    header = b"\x83\xa1t" + b"\x91" * 1009 + b"\xa4nack\xa2id\xb0" + XID.encode() + b"\xa1i\x03"
    data = bytes([0, 0]) + PREFIX.pack(len(header)) + header
    assert len(data) == 1046
    assert fuzz_frames.check(data) == []
    with pytest.raises(ProtocolError, match="nests deeper"):
        decode_one(data[2:])


def test_nesting_up_to_the_limit_is_accepted() -> None:
    ok = _header_with("extra", _nested(MAX_HEADER_DEPTH - 1))  # the header map is level 1
    assert decode_one(ok) == Nack(XID, 0)
    with pytest.raises(ProtocolError, match="nests deeper"):
        decode_one(_header_with("extra", _nested(MAX_HEADER_DEPTH)))


def test_from_header_alone_survives_a_deep_type() -> None:
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ProtocolError):
        from_header({"t": deep}, 1 << 40)


@pytest.mark.parametrize(
    "shape",
    [[0, (1 << 62) - 1, 4], [0, 1 << 40, 1 << 40], [1 << 31, 0, 1 << 33], [0] + [1 << 61] * 31],
)
def test_empty_tensor_with_huge_dimensions_is_refused(shape: list[int]) -> None:
    """nbytes 0 and a zero dimension passed validation, but numpy cannot make an array of that
    shape, even empty (ValueError from the node's allocation, not a ProtocolError).
    test_every_accepted_meta_can_be_allocated finds it without the check."""
    raw = {"name": "w", "dtype": "<f4", "shape": shape, "nbytes": 0}
    with pytest.raises(ProtocolError) as info:
        TensorMeta.from_wire(raw, 1 << 40)
    assert info.value.code == "bad_meta"
    begin = {"t": "begin", "id": XID, "cs": 4096, "w": 1, "meta": raw}
    with pytest.raises(ProtocolError):
        decode_one(raw_frame(begin))


@FAST
@given(
    dtype=st.sampled_from(sorted(ALLOWED_DTYPES)),
    shape=st.lists(
        st.sampled_from([0, 0, 1, 2, 3, 1 << 20, 1 << 31, 1 << 40, (1 << 62) - 1]), max_size=6
    ),
)
def test_every_accepted_meta_can_be_allocated(dtype: str, shape: list[int]) -> None:
    nbytes = math.prod(shape) * ALLOWED_DTYPES[dtype]
    raw = {"name": "w", "dtype": dtype, "shape": shape, "nbytes": nbytes}
    try:
        meta = TensorMeta.from_wire(raw, 1 << 20)
    except ProtocolError as exc:
        assert exc.code in ("bad_meta", "too_large")
        return
    array = meta.empty_array()
    assert array.shape == tuple(shape) and array.nbytes == nbytes


def _finished(crc: bool = True) -> tuple[ReceiveProbe, bytes]:
    data = tensor_bytes(3 * 4096 + 100, 1)
    meta = TensorMeta("model.w", "|u1", (len(data),), len(data))
    probe = ReceiveProbe(Begin(XID, meta, 4096, 4), crc=crc)
    _drive(probe, probe.rx.begin, data, ("fill", None))
    assert probe.end_(End(XID, crc32c(data) if crc else None)) == [Stored(XID)]
    return probe, data


def test_end_after_stored_cannot_discard_the_verified_tensor() -> None:
    """A second End with another crc re-ran the whole-tensor check on a stored tensor, turned it
    FAILED and forgot every chunk. test_hostile_transfer finds it without the fix (3 runs in 4)."""
    probe, data = _finished()
    with pytest.raises(ProtocolError):
        probe.end_(End(XID, crc32c(data) ^ 1))
    assert probe.rx.complete and probe.rx.have_count == probe.rx.nchunks
    assert bytes(probe.dest) == data
    # a resumed attempt's honest End is answered again
    probe.rebegin(Begin(XID, probe.rx.meta, 4096, 4, True))
    assert probe.end_(End(XID, crc32c(data))) == [Stored(XID)]


def test_end_after_a_checksum_failure_is_refused() -> None:
    """An empty tensor failed by a bad End was revived as stored by the next End."""
    meta = TensorMeta("e", "<f4", (0,), 0)
    probe = ReceiveProbe(Begin(XID, meta, 4096, 4), crc=True)
    (err,) = probe.end_(End(XID, 1))
    assert isinstance(err, Error) and err.code == "checksum"
    with pytest.raises(ProtocolError):
        probe.end_(End(XID, 0))
    assert probe.rx.state is ReceiveState.FAILED


def test_end_without_crc_when_crc32c_was_negotiated_is_refused() -> None:
    """End(crc=None) skipped the whole-tensor check, which a chunk without a crc can't skip.
    fuzz_transfer finds it within seconds without the fix; its crash input was the seed transfer
    with the crc of its End dropped, rebuilt here."""
    data = bytes(range(256)) * 50 + b"tail"  # receive-crc.bin's tensor
    meta = TensorMeta("model.w", "|u1", (len(data),), len(data))
    tx = SendTransfer(XID, meta, memoryview(data), chunk_size=4096, window=64)
    frames = [encode(tx.begin())]
    frames += [encode(c.header) + bytes(c.payload) for c in iter(tx.next_chunk, None)]
    crash = bytes([fuzz_transfer.CRC, 0]) + b"".join(frames) + encode(End(XID, None))
    probe = fuzz_transfer.check(crash)
    assert isinstance(probe, ReceiveProbe)
    assert probe.rx.have_count == probe.rx.nchunks == 4 and not probe.rx.complete
    # the same End with its crc is stored
    assert probe.end_(End(XID, crc32c(data))) == [Stored(XID)]
    assert bytes(probe.dest) == data
    # without crc32c negotiated, End carries none and none is checked
    _finished(crc=False)


class TooMuchWork(AssertionError):
    pass


@contextmanager
def python_lines_at_most(budget: int) -> Iterator[None]:
    """Fail as soon as the block has executed more than ``budget`` Python lines (any frame's):
    a bound on the work done, which neither a slow machine nor a busy one can break, unlike a
    wall-clock bound (the time itself is a benchmark's figure). C code runs untraced, so slices
    and ``bytes.find`` count as one line - which is the point."""
    count = 0

    def local(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if event == "line":
            count += 1
            if count > budget:
                raise TooMuchWork(
                    f"over {budget} Python lines executed (now in {frame.f_code.co_qualname} "
                    f"of {frame.f_code.co_filename}:{frame.f_lineno})"
                )
        return local

    before = sys.gettrace()  # coverage's tracer, when there is one: restored after
    sys.settrace(lambda frame, event, arg: local)
    try:
        yield
    finally:
        sys.settrace(before)


def test_accept_with_many_huge_ranges_is_cheap() -> None:
    """A hostile receiver's Accept of 4096 ranges each covering every chunk made the sender loop
    4096 x nchunks times in Python (seconds of a blocked event loop for a big tensor)."""
    nchunks = 1 << 16
    meta = TensorMeta("t", "|u1", (nchunks * 4096,), nchunks * 4096)  # 4 KiB: the least chunk
    tx = SendTransfer(XID, meta, memoryview(bytes(meta.nbytes)), chunk_size=4096, window=8)
    have = ((0, (1 << 40) - 1),) * 4096
    # Linear work is one line per chunk (building the queue of chunks to send) plus a few per
    # range: ~70 thousand lines. The quadratic loop was 4096 x 65536 = 268 million.
    with python_lines_at_most(4 * nchunks + 50 * len(have)):
        tx.on_message(Accept(XID, have))
    assert tx.stats.skipped_by_resume == nchunks and tx.bytes_acked == meta.nbytes
    assert tx.next_chunk() is None and tx.wants_end
    tx.on_message(Accept(XID, ((3, 5), (1, 2), (nchunks - 1, 1 << 39))))
    assert tx.stats.skipped_by_resume == 4
    sent = [out.header.index for out in iter(tx.next_chunk, None)]
    assert sent[:4] == [0, 2, 5, 6] and len(sent) == 8  # the window
