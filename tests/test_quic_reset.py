"""Stateless reset tokens and datagrams (tensord/net/quic/reset.py), without sockets."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from tensord.net.quic.reset import (
    MIN_RESET_SIZE,
    TOKEN_LENGTH,
    ResetTokens,
    is_stateless_reset,
    reset_key,
)

SECRET = b"s" * 32


def short_packet(cid: bytes, size: int) -> bytes:
    return bytes([0x41]) + cid + os.urandom(size - 1 - len(cid))


def test_the_key_survives_a_restart_and_differs_per_node_and_secret() -> None:
    key = reset_key("r", tls_key=None, secret=SECRET)
    assert key == reset_key("r", tls_key=None, secret=SECRET)  # a restarted process
    assert key != reset_key("s", tls_key=None, secret=SECRET)  # another node
    assert key != reset_key("r", tls_key=None, secret=b"t" * 32)  # another cluster
    # The TLS key, which only this node has, is preferred to the shared secret.
    assert reset_key("r", tls_key=b"pem", secret=SECRET) == reset_key(
        "r", tls_key=b"pem", secret=None
    )
    assert reset_key("r", tls_key=b"pem", secret=SECRET) != key
    # Nothing to derive from: random per process (resets only within its life).
    assert reset_key("r", tls_key=None, secret=None) != reset_key("r", tls_key=None, secret=None)


def test_a_reset_carries_the_token_of_the_connection_id_it_answers() -> None:
    tokens = ResetTokens(reset_key("r", tls_key=None, secret=SECRET), cid_length=8)
    cid = os.urandom(8)
    reset = tokens.reset_for(short_packet(cid, 1200))
    assert reset is not None
    assert len(reset) == 43 and reset[0] & 0xC0 == 0x40  # looks like a short-header packet
    assert is_stateless_reset(reset, tokens.token(cid))
    assert not is_stateless_reset(reset, tokens.token(os.urandom(8)))
    assert not is_stateless_reset(reset, None)  # a connection without a token
    # Another process with the same key recognises it: that is the point.
    again = ResetTokens(reset_key("r", tls_key=None, secret=SECRET), cid_length=8)
    assert again.token(cid) == tokens.token(cid)


@given(st.integers(min_value=1, max_value=60))
def test_resets_shrink_so_two_endpoints_cannot_reset_each_other_forever(size: int) -> None:
    tokens = ResetTokens(b"k" * 32, cid_length=8)
    packet = short_packet(b"\x01" * 8, max(size, 9))
    sizes = []
    while (reply := tokens.reset_for(packet)) is not None:
        assert MIN_RESET_SIZE <= len(reply) < len(packet)
        assert len(reply[-TOKEN_LENGTH:]) == TOKEN_LENGTH
        sizes.append(len(reply))
        packet = reply
    assert len(sizes) <= 43 - MIN_RESET_SIZE + 1


def test_long_header_packets_are_never_answered() -> None:
    tokens = ResetTokens(b"k" * 32, cid_length=8)
    initial = bytes([0xC3]) + os.urandom(1199)
    assert tokens.reset_for(initial) is None
