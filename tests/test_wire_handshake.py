"""Hello and capability negotiation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensord.errors import ProtocolError
from tensord.wire import (
    Agreement,
    FrameDecoder,
    Hello,
    accept_reply,
    answer_hello,
    encode,
    local_features,
    make_hello,
)
from tensord.wire.handshake import ALL_FEATURES, VERSIONS
from tensord.wire.messages import PROTOCOL_NAME

MiB = 1 << 20


def negotiate(dialer: Hello, listener: Hello) -> tuple[Agreement, Agreement]:
    """Both sides of a handshake, with the frames going through the codec as on a socket."""
    dec = FrameDecoder()
    dec.feed(encode(dialer))
    heard = dec.next_message()
    assert heard == dialer
    reply, listener_view = answer_hello(listener, heard)
    dec.feed(encode(reply))
    heard_reply = dec.next_message()
    assert isinstance(heard_reply, Hello)
    return accept_reply(dialer, heard_reply), listener_view


def test_full_features_on_both_sides() -> None:
    feats = local_features(streaming=True, compression=True)
    assert feats == ALL_FEATURES
    a, b = negotiate(make_hello("a", feats, 4 * MiB), make_hello("b", feats, 1 * MiB))
    assert a.features == b.features == ALL_FEATURES
    assert a.version == b.version == max(VERSIONS)
    assert (a.peer_id, b.peer_id) == ("b", "a")
    assert (a.peer_max_chunk, b.peer_max_chunk) == (1 * MiB, 4 * MiB)
    assert a.chunked and a.crc and a.lz4 and a.resume


@settings(max_examples=100, deadline=None)
@given(
    ours=st.frozensets(st.sampled_from(sorted(ALL_FEATURES | {"future", "x-y"}))),
    theirs=st.frozensets(st.sampled_from(sorted(ALL_FEATURES | {"future", "zz"}))),
)
def test_features_intersect(ours: frozenset[str], theirs: frozenset[str]) -> None:
    a, b = negotiate(make_hello("a", ours, MiB), make_hello("b", theirs, MiB))
    assert a.features == b.features == ours & theirs
    assert a.chunked == ("chunked" in ours & theirs)
    assert a.resume == ({"chunked", "resume"} <= ours & theirs)


def test_streaming_disabled_means_no_chunked_and_legacy_mode() -> None:
    feats = local_features(streaming=False, compression=True)
    assert "chunked" not in feats and "resume" not in feats
    assert {"lz4", "crc32c"} <= feats
    full = local_features(streaming=True, compression=True)
    for dialer, listener in ((feats, full), (full, feats)):
        a, b = negotiate(make_hello("a", dialer, MiB), make_hello("b", listener, MiB))
        assert a.chunked is False and b.chunked is False
        assert a.resume is False and b.resume is False
        assert a.crc and a.lz4


def test_compression_disabled_means_no_lz4() -> None:
    feats = local_features(streaming=True, compression=False)
    assert "lz4" not in feats and "chunked" in feats
    a, _ = negotiate(make_hello("a", ALL_FEATURES, MiB), make_hello("b", feats, MiB))
    assert a.lz4 is False and a.chunked is True


def test_resume_needs_chunked() -> None:
    ag = Agreement(1, "p", frozenset({"resume", "crc32c"}), MiB)
    assert ag.resume is False


def test_no_common_version() -> None:
    with pytest.raises(ProtocolError) as info:
        answer_hello(make_hello("b", ALL_FEATURES, MiB), make_hello("a", ALL_FEATURES, MiB, (2, 3)))
    assert info.value.code == "version"
    assert "[1]" in str(info.value) and "[2, 3]" in str(info.value)


def test_peer_offering_a_future_version_agrees_on_ours() -> None:
    listener = make_hello("b", ALL_FEATURES, MiB)
    dialer = make_hello("a", ALL_FEATURES, MiB, (1, 99))
    reply, ag = answer_hello(listener, dialer)
    assert reply.versions == (1,)
    assert ag.version == 1
    assert accept_reply(dialer, reply).version == 1


def test_highest_common_version_wins() -> None:
    reply, ag = answer_hello(
        make_hello("b", ALL_FEATURES, MiB, (1, 2, 3)), make_hello("a", ALL_FEATURES, MiB, (2, 3, 4))
    )
    assert reply.versions == (3,) and ag.version == 3


@pytest.mark.parametrize("proto", ["http", "", "TENSORD", "tensord2"])
def test_wrong_protocol_name_is_refused(proto: str) -> None:
    stranger = Hello(proto, VERSIONS, "x", ALL_FEATURES, MiB)
    me = make_hello("me", ALL_FEATURES, MiB)
    with pytest.raises(ProtocolError) as info:
        answer_hello(me, stranger)
    assert info.value.code == "bad_protocol"
    with pytest.raises(ProtocolError) as info:
        accept_reply(me, stranger)
    assert info.value.code == "bad_protocol"


def test_accept_reply_refuses_added_features() -> None:
    ours = local_features(streaming=True, compression=False)
    dialer = make_hello("a", ours, MiB)
    reply = Hello(PROTOCOL_NAME, (1,), "b", ours | {"lz4"}, MiB)
    with pytest.raises(ProtocolError) as info:
        accept_reply(dialer, reply)
    assert "lz4" in str(info.value)


@pytest.mark.parametrize("versions", [(2,), (1, 2), (), (1, 1)])
def test_accept_reply_refuses_a_version_not_offered_or_not_single(
    versions: tuple[int, ...],
) -> None:
    dialer = make_hello("a", ALL_FEATURES, MiB, (1,))
    reply = Hello(PROTOCOL_NAME, versions, "b", ALL_FEATURES, MiB)
    with pytest.raises(ProtocolError) as info:
        accept_reply(dialer, reply)
    assert info.value.code == "version"


def test_accept_reply_accepts_fewer_features() -> None:
    dialer = make_hello("a", ALL_FEATURES, MiB)
    ag = accept_reply(dialer, Hello(PROTOCOL_NAME, (1,), "b", frozenset({"crc32c"}), 8 * MiB))
    assert ag == Agreement(1, "b", frozenset({"crc32c"}), 8 * MiB)
    assert not ag.chunked and ag.crc and not ag.lz4
