"""The cluster secret: the challenge-response in the Hello, from the wire up to real nodes."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio

from tensord.config import SecuritySettings, Settings
from tensord.errors import AuthenticationFailed, ConfigError, ProtocolError
from tensord.net.security import PeerSecurity
from tensord.node import TensorNode
from tensord.wire import FrameDecoder, encode
from tensord.wire.auth import ClusterKey, check_auth, check_reply, listener_reply, with_challenge
from tensord.wire.handshake import ALL_FEATURES, answer_hello, make_hello
from tensord.wire.messages import Auth, Error, Hello

from .support.cluster import write_cluster_file
from .support.helpers import LogWaiter, fast_settings, running

KEY = ClusterKey(b"k" * 32)
OTHER = ClusterKey(b"o" * 32)


def exchange(
    dialer_key: ClusterKey | None, listener_key: ClusterKey | None
) -> tuple[Hello, Hello, bytes | None]:
    """The first two messages, as each side computes them."""
    hello = make_hello("dialer", ALL_FEATURES, 1 << 20)
    if dialer_key is not None:
        hello = with_challenge(hello)
    reply, _ = answer_hello(make_hello("listener", ALL_FEATURES, 1 << 20), hello)
    reply, expected = listener_reply(listener_key, hello, reply)
    return hello, reply, expected


# -- sans-I/O ----------------------------------------------------------------------------------


def test_same_secret_both_proofs_verify() -> None:
    hello, reply, expected = exchange(KEY, KEY)
    auth = check_reply(KEY, hello, reply)
    assert auth is not None and expected is not None
    check_auth(expected, auth, "dialer")
    # ...and they travel the wire intact.
    dec = FrameDecoder()
    dec.feed(encode(hello) + encode(reply) + encode(auth))
    assert dec.next_message() == hello and dec.next_message() == reply
    assert dec.next_message() == auth


def test_a_different_secret_fails_on_both_sides() -> None:
    hello, reply, expected = exchange(KEY, OTHER)
    with pytest.raises(ProtocolError, match="secret differs") as info:
        check_reply(KEY, hello, reply)
    assert info.value.code == "auth"
    assert expected is not None
    forged = Auth(KEY.proof(b"dialer", hello, replace(reply, proof=None)))
    with pytest.raises(ProtocolError, match="secret differs"):
        check_auth(expected, forged, "dialer")


def test_a_dialer_without_the_secret_is_refused_before_anything_else() -> None:
    hello, _, _ = exchange(None, None)
    reply, _ = answer_hello(make_hello("listener", ALL_FEATURES, 1 << 20), hello)
    with pytest.raises(ProtocolError, match="did not authenticate") as info:
        listener_reply(KEY, hello, reply)
    assert info.value.code == "auth"


def test_a_listener_without_the_secret_is_refused_by_the_dialer() -> None:
    hello, reply, expected = exchange(KEY, None)
    assert expected is None and reply.proof is None
    with pytest.raises(ProtocolError, match="did not prove"):
        check_reply(KEY, hello, reply)


def test_a_replayed_handshake_fails() -> None:
    """An eavesdropper replays a dialer's hello and auth: the listener's nonce is new."""
    hello, reply, _ = exchange(KEY, KEY)
    recorded = check_reply(KEY, hello, reply)
    assert recorded is not None
    reply2, _ = answer_hello(make_hello("listener", ALL_FEATURES, 1 << 20), hello)
    _, expected2 = listener_reply(KEY, hello, reply2)
    assert expected2 is not None
    with pytest.raises(ProtocolError, match="replayed"):
        check_auth(expected2, recorded, "dialer")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h: replace(h, node="someone-else"),
        lambda h: replace(h, features=h.features - {"crc32c"}),
        lambda h: replace(h, max_chunk=h.max_chunk * 2),
        lambda h: replace(h, versions=(2,)),
    ],
    ids=["node id", "features (crc32c stripped)", "max chunk", "versions"],
)
def test_a_reply_altered_in_flight_fails_the_check(tamper: object) -> None:
    hello, reply, _ = exchange(KEY, KEY)
    with pytest.raises(ProtocolError, match="secret differs"):
        check_reply(KEY, hello, tamper(reply))  # type: ignore[operator]


def test_the_secret_never_shows_in_reprs_and_short_ones_are_refused() -> None:
    key = ClusterKey(b"super-secret-value-123")
    assert "super-secret" not in repr(key)
    assert "super-secret" not in repr(PeerSecurity(key))
    with pytest.raises(ValueError, match="at least 16"):
        ClusterKey(b"short")
    assert ClusterKey.from_file_bytes(b"  0123456789abcdef\n").secret == b"0123456789abcdef"


def test_an_unreadable_or_short_secret_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        PeerSecurity.from_settings(SecuritySettings(secret_file=tmp_path / "missing"))
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16"):
        PeerSecurity.from_settings(SecuritySettings(secret_file=tmp_path / "short"))


# -- real nodes --------------------------------------------------------------------------------


def with_secret(path: Path | None) -> Settings:
    base = fast_settings(authenticated=False)
    return replace(base, security=SecuritySettings(secret_file=path))


@pytest.fixture
def secrets_dir(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.secret", tmp_path / "b.secret"
    a.write_bytes(b"A" * 32 + b"\n")
    b.write_bytes(b"B" * 32 + b"\n")
    return a, b


async def test_nodes_with_the_same_secret_transfer(secrets_dir: tuple[Path, Path]) -> None:
    a_secret, _ = secrets_dir
    array = np.arange(1 << 16, dtype=np.float32)
    async with running(with_secret(a_secret)) as a, running(with_secret(a_secret)) as b:
        await a.send_tensor(f"127.0.0.1:{b.port}", "w", array)
        got = await b.receive_tensor()
        assert np.array_equal(got.array, array)
        assert got.sender == a.node_id


@pytest.mark.parametrize(
    ("dialer", "listener", "dialer_says", "listener_logs"),
    [
        ("b", "a", "secret differs", "refused"),
        (None, "a", "did not authenticate", "did not authenticate"),
        ("a", None, "did not prove", "secret"),
    ],
    ids=["wrong secret", "no secret on the dialer", "no secret on the listener"],
)
async def test_refusals_are_typed_fast_and_logged_on_both_sides(
    secrets_dir: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
    dialer: str | None,
    listener: str | None,
    dialer_says: str,
    listener_logs: str,
) -> None:
    files = {"a": secrets_dir[0], "b": secrets_dir[1], None: None}
    caplog.set_level(logging.INFO, logger="tensord")
    seen = LogWaiter(lambda m: "refused" in m and listener_logs in m)
    with seen.watching("tensord"):
        async with (
            running(with_secret(files[dialer])) as d,
            running(with_secret(files[listener])) as lis,
        ):
            target = f"127.0.0.1:{lis.port}"
            with trio.fail_after(5), pytest.raises(AuthenticationFailed, match=dialer_says):
                await d.send_tensor(target, "w", np.zeros(16))
            with trio.fail_after(5):
                await seen.event.wait()  # the listener's side of the story, in its log
    # One attempt: an authentication failure is not retried (the same keys fail the same way).
    # (The dialer's own log lines name the listener's address; the listener's do not.)
    listener_side = [
        r for r in caplog.records if seen.match(r.getMessage()) and target not in r.getMessage()
    ]
    assert len(listener_side) == 1, [r.getMessage() for r in listener_side]


async def test_no_tensor_frame_is_read_before_auth(secrets_dir: tuple[Path, Path]) -> None:
    """A peer that skips Auth and sends a Begin is refused with an auth error."""
    from tensord.wire import Begin
    from tensord.wire.meta import TensorMeta

    async with running(with_secret(secrets_dir[0])) as node:
        stream = await trio.open_tcp_stream("127.0.0.1", node.port)
        hello = with_challenge(make_hello("sneaky", ALL_FEATURES, 1 << 20))
        meta = TensorMeta("x", "|u1", (16,), 16)
        await stream.send_all(encode(hello) + encode(Begin("ab" * 8, meta, 16, 1)))
        dec = FrameDecoder()
        got: list[object] = []
        with trio.fail_after(5):
            while data := await stream.receive_some(4096):
                dec.feed(data)
                while (m := dec.next_message()) is not None:
                    got.append(m)
        assert isinstance(got[0], Hello) and got[0].proof is not None
        assert isinstance(got[-1], Error) and got[-1].code == "auth"
        assert "Begin before authenticating" in got[-1].message
        assert node.tensors() == []


async def test_a_node_rejects_a_bad_secret_file_at_construction(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("tiny")
    with pytest.raises(ConfigError, match="4 bytes; at least 16"):
        TensorNode(with_secret(tmp_path / "s"))


# -- the daemon's start-up policy ---------------------------------------------------------------


def two_node_cluster(path: Path, **extra: object) -> Path:
    from .support.daemons import free_port

    return write_cluster_file(path, {k: free_port() for k in ("a", "b")}, **extra)


async def test_a_cluster_without_authentication_refuses_to_start(tmp_path: Path) -> None:
    from .support.daemons import daemon

    cluster = two_node_cluster(tmp_path / "c.json")
    env = {"TENSORD_NODE_ID": "a", "TENSORD_CLUSTER_SECRET_FILE": ""}
    async with daemon(env, "--cluster", str(cluster)) as d:
        with trio.fail_after(30):
            await d.proc.wait()
        await d.wait_for("there is no peer authentication")
    assert d.proc.returncode == 78
    assert "security.insecure: true" in d.text


async def test_insecure_is_explicit_and_warned_about_at_every_start(tmp_path: Path) -> None:
    from .support.daemons import daemon

    cluster = two_node_cluster(tmp_path / "c.json", security={"insecure": True})
    env = {"TENSORD_NODE_ID": "a", "TENSORD_CLUSTER_SECRET_FILE": ""}
    async with daemon(env, "--cluster", str(cluster)) as d:
        await d.wait_for("security.insecure is set: peers are not authenticated")
        await d.wait_for("listening on")


async def test_the_secret_never_appears_in_logs_or_status(tmp_path: Path) -> None:
    from tensord.control.client import AsyncClient

    from .support.daemons import daemon

    secret = tmp_path / "secret"
    value = "never-print-me-" + "x" * 24
    secret.write_text(value + "\n")
    cluster = two_node_cluster(tmp_path / "c.json")
    env = {"TENSORD_NODE_ID": "a", "TENSORD_CLUSTER_SECRET_FILE": str(secret),
           "TENSORD_LOG_LEVEL": "debug"}  # fmt: skip
    async with daemon(env, "--cluster", str(cluster)) as d:
        await d.wait_for("peer authentication: cluster secret")
        await d.wait_for("control socket")
        async with AsyncClient(d.socket) as client:
            status = await client.status()
            peers = await client.peers()
        d.terminate()
        with trio.fail_after(30):
            await d.proc.wait()
    assert value not in d.text and value not in repr(status) and value not in repr(peers)


@pytest.mark.parametrize("how", ["env", "single-node file"])
async def test_a_listener_off_loopback_without_authentication_refuses_to_start(
    tmp_path: Path, how: str
) -> None:
    """Hole 7 of issue 12: a single-node file or TENSORD_LISTEN binding a non-loopback address
    ran unauthenticated with no warning; now it is the multi-node rule: exit 78, unless
    ``security.insecure`` (then a warning at every start)."""
    from .support.daemons import daemon, free_port

    port = free_port()
    env = {"TENSORD_CLUSTER_SECRET_FILE": ""}
    args: tuple[str, ...] = ()
    if how == "env":
        env["TENSORD_LISTEN"] = f"0.0.0.0:{port}"
    else:
        path = write_cluster_file(tmp_path / "c.json", {"solo": f"10.1.2.3:{port}"})
        env["TENSORD_NODE_ID"] = "solo"
        args = ("--cluster", str(path))
    async with daemon(env, *args) as d:
        with trio.fail_after(30):
            await d.proc.wait()
        await d.wait_for("is not on loopback and there is no peer authentication")
    assert d.proc.returncode == 78
    env["TENSORD_LISTEN"] = f"0.0.0.0:{port}"
    insecure = write_cluster_file(tmp_path / "i.json", security={"insecure": True})
    async with daemon(env, "--cluster", str(insecure)) as d:
        await d.wait_for("security.insecure is set: peers are not authenticated")
        await d.wait_for("listening on")
