"""Valid frames for the codec's tests and fuzzers: hypothesis strategies, one per message type
(every value they produce is valid on the wire), one example of each type, and the helpers that
turn a frame into bytes and cut bytes where a test says."""

from __future__ import annotations

import math

from hypothesis import strategies as st

from tensord.wire import (
    Accept,
    Ack,
    Begin,
    Chunk,
    End,
    Error,
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
)
from tensord.wire.messages import payload_len
from tensord.wire.meta import ALLOWED_DTYPES

U63 = (1 << 63) - 1
U32 = 0xFFFFFFFF

utf8 = st.characters(codec="utf-8")
ids = st.from_regex(r"[0-9a-f]{8,64}", fullmatch=True)
crcs = st.none() | st.integers(0, U32)
segments = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.:@+=\-]{0,12}", fullmatch=True)
names = st.lists(segments, min_size=1, max_size=4).map("/".join)


@st.composite
def metas(draw: st.DrawFn, max_elems: int = 64) -> TensorMeta:
    dtype = draw(st.sampled_from(sorted(ALLOWED_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    if math.prod(shape) > max_elems:
        shape = (max_elems,)
    nbytes = math.prod(shape) * ALLOWED_DTYPES[dtype]
    return TensorMeta(draw(names), dtype, shape, nbytes, draw(st.booleans()))


hellos = st.builds(
    Hello,
    proto=st.text(utf8, max_size=32),
    versions=st.lists(st.integers(1, (1 << 16) - 1), min_size=1, max_size=16).map(tuple),
    node=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", fullmatch=True),
    features=st.frozensets(st.text(utf8, max_size=32), max_size=64),
    max_chunk=st.integers(4096, U63),
    nonce=st.none() | st.binary(min_size=32, max_size=32),
    proof=st.none() | st.binary(min_size=32, max_size=32),
)
ranges = st.lists(
    st.tuples(st.integers(0, (1 << 40) - 2), st.integers(1, 1 << 20)).map(
        lambda ab: (ab[0], min(ab[0] + ab[1], (1 << 40) - 1))
    ),
    max_size=20,
).map(tuple)
begins = st.builds(
    Begin,
    id=ids,
    meta=metas(),
    chunk_size=st.integers(1, U63),
    window=st.integers(1, 1 << 20),
    resume=st.booleans(),
)
accepts = st.builds(Accept, id=ids, have=ranges)
acks = st.builds(Ack, id=ids, upto=st.integers(0, U63), ranges=ranges)
nacks = st.builds(Nack, id=ids, index=st.integers(0, U63))
ends = st.builds(End, id=ids, crc=crcs)
storeds = st.builds(Stored, id=ids)
printable = st.characters(blacklist_categories=("Cs", "Cc"))  # a peer's control chars become "?"
errors = st.builds(
    Error,
    code=st.text(printable, max_size=64),
    message=st.text(printable, max_size=1024),
    id=st.none() | ids,
)
requests = st.builds(Request, name=names, resume=st.none() | ids)
pings = st.builds(Ping, seq=st.integers(0, U63))
pongs = st.builds(Pong, seq=st.integers(0, U63))


@st.composite
def chunks_with_payload(draw: st.DrawFn) -> tuple[Message, bytes]:
    payload = draw(st.binary(max_size=3000))
    msg = Chunk(
        draw(ids),
        draw(st.integers(0, U63)),
        draw(st.integers(0, U63)),
        draw(st.integers(0, U63)),
        len(payload),
        draw(crcs),
        draw(st.booleans()),
    )
    return msg, payload


@st.composite
def legacies_with_payload(draw: st.DrawFn) -> tuple[Message, bytes]:
    meta = draw(metas())
    payload = draw(st.binary(min_size=meta.nbytes, max_size=meta.nbytes))
    return Legacy(meta, draw(crcs), meta.nbytes), payload


payloadless = st.one_of(
    hellos, begins, accepts, acks, nacks, ends, storeds, errors, requests, pings, pongs
)
frames = st.one_of(
    payloadless.map(lambda m: (m, b"")), chunks_with_payload(), legacies_with_payload()
)

EXAMPLES: list[tuple[Message, bytes]] = [
    (Hello("tensord", (1,), "gpu-1", frozenset({"chunked", "lz4"}), 1 << 20), b""),
    (Begin("ab" * 8, TensorMeta("w", "<f4", (2, 2), 16), 4096, 8, True), b""),
    (Accept("ab" * 8, ((0, 3), (5, 9))), b""),
    (Chunk("ab" * 8, 2, 8192, 4096, 5, 123, True), b"hello"),
    (Ack("ab" * 8, 4, ((6, 8),)), b""),
    (Nack("ab" * 8, 3), b""),
    (End("ab" * 8, None), b""),
    (Stored("ab" * 8), b""),
    (Error("checksum", "bad", "ab" * 8), b""),
    (Error("refused", "no", None), b""),
    (Request("model.layers.0.attn.q_proj.weight"), b""),
    (Legacy(TensorMeta("x", "|u1", (3,), 3), 7, 3), b"abc"),
    (Ping(1), b""),
    (Pong(U63), b""),
]


def frame_bytes(msg: Message, payload: bytes) -> bytes:
    """The frame on the wire: ``msg``'s header, then its payload raw."""
    assert payload_len(msg) == len(payload)
    return encode(msg) + payload


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` in pieces, cut at each of ``cuts`` (past the end: at the end; empty pieces kept)."""
    points = sorted({min(c, len(data)) for c in cuts})
    out, start = [], 0
    for p in [*points, len(data)]:
        out.append(data[start:p])
        start = p
    return out
