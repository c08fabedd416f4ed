"""The hot messages' decoders check their fields inline (chunk, end, stored) and encode without
the ``match`` (chunk, end, stored): they must accept exactly what the checked accessors accept,
produce the same messages and the same bytes."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensord.errors import ProtocolError
from tensord.wire.frames import FrameDecoder, encode
from tensord.wire.messages import (
    ChainOutcome,
    Chunk,
    End,
    Message,
    Stored,
    _Fields,
    _to_header,
    from_header,
    to_header,
)

XID = "0123456789abcdef"

#: Values a hostile peer may put in a field: in range, out of range, of the wrong type.
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(0xFFFFFFFE, 0x100000001),
    st.integers((1 << 63) - 2, 1 << 64),
    st.sampled_from([XID, "0123", "ABCDEF0123456789", XID + "\n", ""]),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2),
)


def _checked(h: dict[str, Any]) -> Message:
    """The message as the field accessors alone decode it (the reference)."""
    f = _Fields(h, h["t"])
    if h["t"] == "chunk":
        return Chunk(
            f.id(),
            f.int_("i"),
            f.int_("o"),
            f.int_("r"),
            f.int_("n"),
            f.opt_crc("c"),
            f.bool_("z"),
        )
    return End(f.id(), f.opt_crc("c"))


def _outcome(h: dict[str, Any]) -> Message | str:
    try:
        return from_header(h, 1 << 40)
    except ProtocolError as exc:
        return str(exc)


def _reference(h: dict[str, Any]) -> Message | str:
    try:
        return _checked(h)
    except ProtocolError as exc:
        return str(exc)


@given(
    st.fixed_dictionaries(
        {"t": st.just("chunk")},
        optional={k: values for k in ("id", "i", "o", "r", "n", "c", "z")},
    )
)
def test_a_chunk_header_decodes_as_the_checked_fields_say(h: dict[str, Any]) -> None:
    assert _outcome(h) == _reference(h)


@given(st.fixed_dictionaries({"t": st.just("end")}, optional={"id": values, "c": values}))
def test_an_end_header_decodes_as_the_checked_fields_say(h: dict[str, Any]) -> None:
    assert _outcome(h) == _reference(h)


@pytest.mark.parametrize(
    "header",
    [
        {"t": "stored", "id": XID, "out": None},
        {"t": "stored", "id": XID, "out": "x"},
        {"t": "stored", "id": "nope"},
        {"t": "stored"},
    ],
)
def test_bad_stored_headers_are_refused(header: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        from_header(header, 1 << 40)


@pytest.mark.parametrize(
    "msg",
    [
        Chunk(XID, 0, 0, 4096, 4096, None),
        Chunk(XID, 3, 3 << 20, 1 << 20, 1000, 0xFFFFFFFF, True),
        End(XID, None),
        End(XID, 12345),
        Stored(XID),
        Stored(XID, (ChainOutcome("tensord://b@127.0.0.1:9000", "stored", "", 1, 2, 3),)),
    ],
)
def test_hot_messages_encode_to_the_same_bytes_and_back(msg: Message) -> None:
    assert msgpack.packb(to_header(msg)) == msgpack.packb(_to_header(msg))
    decoder = FrameDecoder()
    decoder.feed(encode(msg))
    assert decoder.next_message() == msg


def test_a_deep_value_in_an_otherwise_flat_header_is_refused() -> None:
    deep: Any = 1
    for _ in range(9):
        deep = [deep]
    body = msgpack.packb({"t": "end", "id": XID, "c": None, "x": deep})
    decoder = FrameDecoder()
    decoder.feed(len(body).to_bytes(4, "big") + body)
    with pytest.raises(ProtocolError, match="nests deeper"):
        decoder.next_message()
