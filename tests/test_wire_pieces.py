"""The ``pieces`` messages: round-trips through frames, and every bound a peer could break."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensord.errors import ProtocolError
from tensord.wire import FrameDecoder, encode
from tensord.wire.frames import PREFIX
from tensord.wire.handshake import ALL_FEATURES, answer_hello, make_hello
from tensord.wire.messages import (
    MAX_BLOB_BYTES,
    MAX_PIECE,
    MAX_QUERY_DIGESTS,
    MIN_PIECE,
    Announce,
    BlobEntry,
    Have,
    Message,
    Noted,
    PieceChunk,
    PieceRequest,
    Query,
    from_header,
    to_header,
)

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DIGEST = "sha256:" + "ab" * 32

digests = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)


@st.composite
def entries(draw: st.DrawFn) -> BlobEntry:
    piece = draw(st.integers(MIN_PIECE, MAX_PIECE))
    size = draw(st.integers(0, MAX_BLOB_BYTES))
    n = -(-size // piece)
    digest = draw(digests)
    if draw(st.booleans()):
        return BlobEntry.whole(digest, size, piece)
    cuts = sorted(set(draw(st.lists(st.integers(0, min(n, 1 << 30)), max_size=20))))
    pieces = tuple((cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2))
    return BlobEntry(digest, size, piece, False, pieces, draw(st.booleans()))


@st.composite
def piece_chunks(draw: st.DrawFn) -> tuple[PieceChunk, bytes]:
    payload = draw(st.binary(min_size=1, max_size=300))
    msg = PieceChunk(draw(st.integers(0, MAX_BLOB_BYTES - 1)), len(payload), draw(
        st.integers(0, 0xFFFFFFFF)))  # fmt: skip
    return msg, payload


messages = st.one_of(
    st.lists(digests, min_size=1, max_size=MAX_QUERY_DIGESTS).map(lambda d: Query(tuple(d))),
    st.lists(entries(), max_size=8).map(lambda e: Have(tuple(e))),
    entries().map(Announce),
    digests.map(Noted),
    st.builds(
        lambda d, o, n: PieceRequest(d, o, n),
        digests,
        st.integers(0, MAX_BLOB_BYTES - MAX_PIECE),
        st.integers(1, MAX_PIECE),
    ),
)


def roundtrip(msg: Message, payload: bytes = b"") -> tuple[Message, bytes]:
    dec = FrameDecoder()
    dec.feed(encode(msg) + payload)
    got = dec.next_message()
    assert got is not None
    return got, dec.take_payload()


@FAST
@given(messages)
def test_messages_round_trip(msg: Message) -> None:
    assert roundtrip(msg) == (msg, b"")


@FAST
@given(piece_chunks())
def test_piece_chunk_payload_follows_its_header_raw(case: tuple[PieceChunk, bytes]) -> None:
    msg, payload = case
    assert roundtrip(msg, payload) == (msg, payload)


def test_complete_entry_carries_no_piece_list() -> None:
    entry = BlobEntry.whole(DIGEST, 10 << 20, 4 << 20)
    assert entry.pieces == ((0, 3),) and entry.npieces == 3
    assert "p" not in to_header(Announce(entry))["b"]
    assert BlobEntry.whole(DIGEST, 0, 4 << 20).pieces == ()


def test_pieces_is_negotiated_like_any_feature() -> None:
    new = make_hello("a", ALL_FEATURES, 1 << 20)
    old = make_hello("b", ALL_FEATURES - {"pieces"}, 1 << 20)
    assert answer_hello(new, new)[1].pieces
    assert not answer_hello(new, old)[1].pieces


# ---------------------------------------------------------------------------------------------
# Bounds: a hostile but well-formed peer.


def refused(header: dict[str, Any]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        from_header(header, 1 << 40)
    return info.value


def entry_map(**over: Any) -> dict[str, Any]:
    return {"d": DIGEST, "s": 10 << 20, "ps": 4 << 20, "p": [[0, 2]], **over}


BAD_DIGESTS = [
    "sha256:" + "AB" * 32,  # upper case
    "sha256:" + "ab" * 31,  # short
    "sha256:" + "ab" * 32 + "\n",
    "sha512:" + "ab" * 32,
    "../../etc/passwd",
    "",
    7,
    None,
    ["sha256:" + "ab" * 32],
]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_bad_digests_are_refused_everywhere(digest: object) -> None:
    refused({"t": "piece", "d": digest, "o": 0, "l": 1})
    refused({"t": "noted", "d": digest})
    refused({"t": "query", "d": [DIGEST, digest]})
    refused({"t": "announce", "b": entry_map(d=digest)})


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 1), (0, 0), (0, MAX_PIECE + 1), (MAX_BLOB_BYTES, 1), (MAX_BLOB_BYTES - 1, 2),
     (1 << 64, 1), (0, True), ("0", 1), (0.5, 1)],
)  # fmt: skip
def test_piece_request_bounds(offset: object, length: object) -> None:
    refused({"t": "piece", "d": DIGEST, "o": offset, "l": length})


def test_query_counts_are_bounded() -> None:
    refused({"t": "query", "d": []})
    refused({"t": "query", "d": [DIGEST] * (MAX_QUERY_DIGESTS + 1)})
    refused({"t": "query", "d": DIGEST})
    refused({"t": "have", "b": [entry_map()] * (MAX_QUERY_DIGESTS + 1)})
    assert from_header({"t": "query", "d": [DIGEST] * MAX_QUERY_DIGESTS}, 1) == Query(
        (DIGEST,) * MAX_QUERY_DIGESTS
    )


@pytest.mark.parametrize(
    "over",
    [
        {"s": -1},
        {"s": MAX_BLOB_BYTES + 1},
        {"ps": MIN_PIECE - 1},
        {"ps": MAX_PIECE + 1},
        {"ps": 0},
        {"p": [[0, 4]]},  # 10 MiB in 4 MiB pieces: indices 0..2
        {"p": [[1, 2], [0, 1]]},  # unsorted
        {"p": [[0, 2], [1, 3]]},  # overlapping
        {"p": [[2, 2]]},  # empty
        {"p": [[0, 1, 2]]},
        {"p": "all"},
        {"c": 1},
        {"f": "yes"},
    ],
)
def test_entry_bounds(over: dict[str, Any]) -> None:
    refused({"t": "announce", "b": entry_map(**over)})
    refused({"t": "have", "b": [entry_map(**over)]})


def test_entry_must_be_a_map() -> None:
    refused({"t": "announce", "b": [DIGEST]})
    refused({"t": "have", "b": [DIGEST]})


@pytest.mark.parametrize(
    "header",
    [
        {"t": "pchunk", "o": 0, "n": 0, "c": 1},
        {"t": "pchunk", "o": 0, "n": MAX_PIECE + 1, "c": 1},
        {"t": "pchunk", "o": 0, "n": 4, "c": 1 << 32},
        {"t": "pchunk", "o": 0, "n": 4},  # a piece always carries its crc32c
        {"t": "pchunk", "o": -1, "n": 4, "c": 0},
    ],
)
def test_piece_chunk_bounds(header: dict[str, Any]) -> None:
    refused(header)


def test_decoder_refuses_a_payload_beyond_its_limit_before_reading_it() -> None:
    dec = FrameDecoder(max_payload=1 << 20)
    header = msgpack.packb({"t": "pchunk", "o": 0, "n": 2 << 20, "c": 0})
    dec.feed(PREFIX.pack(len(header)) + header)
    with pytest.raises(ProtocolError):
        dec.next_message()
