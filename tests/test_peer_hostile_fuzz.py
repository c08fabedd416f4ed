"""The stateful hostile-peer fuzzer (issue 12): a peer that speaks the protocol's frames, well
formed, with every field drawn from edge values and in every order, against a real
``tensord serve`` over TCP.

After every step the node must still be alive, answer a Ping on a fresh connection, hold its RSS
within 64 MiB of where it started, and hold no tensor under a hostile name; every few steps and at
the end of each example an honest TensorNode client must still send and pull a tensor. The
daemon is shared by the examples of a run (it is restarted only if one killed it, so that a
crash reproduces and shrinks), so what one example leaves behind is more hostile input for the
next.

``make test`` runs a bounded number of examples; ``TENSORD_FUZZ_LONG=1`` (``make chaos``) runs many
more. Under ``CI=true`` the run is derandomized: a red CI run is the same run again locally.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tensord.wire.crc import crc32c
from tensord.wire.handshake import ALL_FEATURES
from tensord.wire.messages import Begin, Error, Legacy

from .helpers import IN_CI
from .hostile_peer import (
    BIG,
    RSS_MARGIN,
    Conn,
    World,
    consistent_nbytes,
    files_outside,
    hostile_name,
    open_conn,
    ping_fresh,
    world,
)
from .test_hostile import header

LONG = os.environ.get("TENSORD_FUZZ_LONG", "") not in ("", "0")

FUZZ = settings(
    max_examples=300 if LONG else 8,
    stateful_step_count=60 if LONG else 25,
    deadline=None,
    derandomize=IN_CI,
    database=None if IN_CI else settings.default.database,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)

#: Raw connections open at once (each is a task on the node; hole 2 of issue 12 is tested apart).
MAX_CONNS = 6
#: An honest client's round trip every this many steps (and at the end of every example).
ROUND_TRIP_EVERY = 5

# ---------------------------------------------------------------------------------------------
# Edge values

EDGE_INTS = [
    0,
    1,
    -1,
    2,
    4095,
    4096,
    65536,
    1 << 20,
    64 << 20,
    (64 << 20) + 1,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
    -(1 << 63),
]
edge_ints = st.sampled_from(EDGE_INTS)
small_or_edge = st.one_of(st.integers(0, 4), edge_ints)

IDS = ["ab" * 8, "cd" * 8, "0123456789abcdef" * 4]
BAD_IDS = ["AB" * 8, "a" * 7, "a" * 65, "", "zz" * 8, "ab" * 8 + "\n", "ab" * 512]
xids = st.one_of(st.sampled_from(IDS), st.sampled_from(BAD_IDS))

GOOD_NAMES = ["w", "layers/0", "model.embed_tokens:0", BIG, "legit/t1", "x" * 256]
BAD_NAMES = [
    "layers//0",
    "a/../b",
    "..",
    ".",
    "/abs",
    "trail/",
    "a/./b",
    "nul\x00x",
    "\x00",
    "",
    "x" * 257,
    "y" * 4096,
    "a\\b",
    "new\nline",
    "../" * 20 + "etc/passwd",
]
ODD_NAMES = ["ünïcode", "层/0", "\u202e", "%2e%2e", "a b", "é" * 4096]
#: Any name: good ones (the node accepts them), hostile ones, odd ones.
names = st.one_of(
    st.sampled_from(GOOD_NAMES),
    st.sampled_from(BAD_NAMES),
    st.sampled_from(ODD_NAMES),
    st.text(alphabet="a/.\x00é_", max_size=12),
    st.builds(
        lambda s, n: s * n, st.sampled_from(["a", "/", "..", "é", "a/"]), st.integers(1, 4096)
    ),
)

#: Mostly good names, for transfers that get past their Begin.
mostly_good_names = st.one_of(*[st.sampled_from(GOOD_NAMES)] * 2, names)

DTYPES = ["<f4", "|u1", "<f8", "bfloat16", ">i2", "<c16", "|O", "<U8", "xyz", "", 7]
SHAPES = [
    [],
    [0],
    [1],
    [4],
    [1024],
    [4096],
    [1 << 20],
    [16 << 20],
    [1 << 62],
    [-1],
    [1 << 63],
    [(1 << 64) - 1],
    [1] * 32,
    [1] * 33,
    [0, 1 << 62],
    [1 << 31, 1 << 31],
    [2, -2],
]
shapes = st.one_of(st.sampled_from(SHAPES), st.lists(st.integers(0, 64), max_size=4))
CHUNK_SIZES = [0, 1, 4095, 4096, 65536, 1 << 20, 64 << 20, (64 << 20) + 1, (1 << 63) - 1, -1]
WINDOWS = [0, 1, 4, 1 << 20, (1 << 20) + 1, -1]
#: A Hello's max-chunk: the protocol's floor and ceiling, and past them. Drawn mostly from the
#: first list, so that the frames after the Hello get somewhere.
GOOD_MCS = [4096, 65536, 64 << 20]
EDGE_MCS = [0, 1, 2, 4095, -1, (64 << 20) + 1, 1 << 40, (1 << 63) - 1]
hello_mcs = st.one_of(*[st.sampled_from(GOOD_MCS)] * 3, st.sampled_from(EDGE_MCS))


def packable(n: int) -> bool:
    return -(1 << 63) <= n < 1 << 64


@dataclass(frozen=True)
class Frame:
    """One frame as sent: a header map and ``payload`` zero bytes after it (printed short)."""

    header: dict[str, Any]
    payload: int = 0

    def __repr__(self) -> str:
        h = {
            k: (v if not isinstance(v, str) or len(v) <= 80 else f"{v[:20]!r}*{len(v)}")
            for k, v in self.header.items()
        }
        return f"Frame({h!r}, payload={self.payload})"

    def encode(self) -> bytes:
        return header(self.header) + bytes(self.payload)


@st.composite
def metas(draw: st.DrawFn) -> dict[str, Any]:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes)
    n = consistent_nbytes(dtype, shape) if isinstance(dtype, str) else None
    nbytes = n if n is not None and packable(n) and draw(st.booleans()) else draw(edge_ints)
    meta: dict[str, Any] = {"name": draw(names), "dtype": dtype, "shape": shape, "nbytes": nbytes}
    grad = draw(st.sampled_from([None, False, True, "yes"]))
    if grad is not None:
        meta["grad"] = grad
    return meta


@st.composite
def small_metas(draw: st.DrawFn) -> dict[str, Any]:
    """Metadata that a node accepts unless the name is bad: small, consistent."""
    n = draw(st.sampled_from([0, 1, 16, 4096, 4097, 65536]))
    return {"name": draw(mostly_good_names), "dtype": "|u1", "shape": [n], "nbytes": n}


@st.composite
def begins(draw: st.DrawFn) -> Frame:
    """A Begin: half of them plausible (small, consistent, good chunking), the rest anything."""
    if draw(st.booleans()):
        meta, cs, w = draw(small_metas()), draw(st.sampled_from([4096, 65536])), 4
    else:
        meta = draw(st.one_of(small_metas(), metas()))
        cs, w = draw(st.sampled_from(CHUNK_SIZES)), draw(st.sampled_from(WINDOWS))
    h = {"t": "begin", "id": draw(xids), "meta": meta, "cs": cs, "w": w}
    h["resume"] = draw(st.sampled_from([False, True, "no"]))
    return Frame(h)


@st.composite
def chunks(draw: st.DrawFn) -> Frame:
    payload = draw(st.sampled_from([0, 1, 16, 4096]))
    n = payload if draw(st.booleans()) else draw(edge_ints)
    h: dict[str, Any] = {
        "t": "chunk",
        "id": draw(xids),
        "i": draw(small_or_edge),
        "o": draw(st.sampled_from([0, 4096, -1, 1 << 40, (1 << 63) - 1])),
        "r": draw(st.sampled_from([payload, 0, 1 << 62, -1])),
        "n": n,  # a huge n: the node waits for bytes that never come
    }
    crc = draw(st.sampled_from(["right", "wrong", "none", "huge"]))
    if crc == "right":
        h["c"] = crc32c(bytes(payload))
    elif crc == "wrong":
        h["c"] = 12345
    elif crc == "huge":
        h["c"] = 1 << 40
    if draw(st.booleans()):
        h["z"] = draw(st.sampled_from([True, False, 1, "yes"]))
    return Frame(h, payload)


@st.composite
def legacies(draw: st.DrawFn) -> Frame:
    meta = draw(st.one_of(small_metas(), metas()))
    n = meta["nbytes"] if isinstance(meta["nbytes"], int) else 0
    sent = n if 0 <= n <= 65536 else draw(st.sampled_from([0, 16]))
    h = {
        "t": "tensor",
        "meta": meta,
        "n": n,
        "c": crc32c(bytes(sent)) if draw(st.booleans()) else None,
    }
    return Frame(h, sent)


def _simple(t: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Frame]:
    return st.fixed_dictionaries(fields).map(lambda f: Frame({"t": t, **f}))


ranges = st.one_of(
    st.just([]),
    st.just([[0, 1]]),
    st.just([[0, (1 << 40) - 1]] * 4096),
    st.just([[0, (1 << 40) - 1]] * 4097),
    st.just([[5, 2]]),
    st.just([[-1, 3]]),
    st.lists(st.lists(small_or_edge, min_size=2, max_size=2), max_size=4),
)

#: Frames a client never sends a listener, or sends only in another order.
OTHER_FRAMES = st.one_of(
    _simple("end", id=xids, c=st.one_of(st.none(), small_or_edge, st.just(crc32c(b"")))),
    _simple("accept", id=xids, have=ranges),
    _simple("ack", id=xids, u=small_or_edge, r=ranges),
    _simple("nack", id=xids, i=small_or_edge),
    _simple("stored", id=xids),
    _simple("pong", s=small_or_edge),
    _simple("ping", s=small_or_edge),
    _simple(
        "error",
        code=st.sampled_from(["auth", "busy", "protocol", "x" * 64, "\x1b[31m"]),
        msg=st.sampled_from(["", "no", "x" * 1024, "\x1b]0;pwned\x07"]),
        id=st.one_of(st.none(), xids),
    ),
    _simple("auth", pf=st.sampled_from([bytes(32), bytes(31), b""])),
    _simple(
        "hello",
        proto=st.just("tensord"),
        v=st.just([1]),
        node=st.just("again"),
        f=st.just(sorted(ALL_FEATURES)),
        mc=hello_mcs,
    ),
    _simple("request", name=names, id=xids),
    _simple("launch_missiles"),
)

frames = st.one_of(begins(), chunks(), legacies(), OTHER_FRAMES)


@st.composite
def hellos(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly a Hello the node accepts (so that the frames after it reach the handlers), with
    an edge max-chunk; sometimes one field is wrong."""
    hello: dict[str, Any] = {
        "t": "hello",
        "proto": "tensord",
        "v": [1],
        "node": draw(st.sampled_from(["fuzz", "fuzz2", "a" * 63])),
        "f": sorted(ALL_FEATURES),
        "mc": draw(hello_mcs),
    }
    wrong = draw(st.sampled_from([None] * 8 + ["proto", "v", "node", "f"]))
    if wrong == "proto":
        hello["proto"] = draw(st.sampled_from(["http", "", "tensord" * 10]))
    elif wrong == "v":
        hello["v"] = draw(st.sampled_from([[1, 2], [2], [], [0], [1] * 17]))
    elif wrong == "node":
        hello["node"] = draw(st.sampled_from(["a" * 64, "bad id", "", "-x", "\x1b[2J"]))
    elif wrong == "f":
        hello["f"] = draw(
            st.lists(st.sampled_from([*sorted(ALL_FEATURES), "bogus"]), max_size=6, unique=True)
        )
    return hello


# ---------------------------------------------------------------------------------------------
# The machine


class HostilePeer(RuleBasedStateMachine):
    world: World  # set by the test before the run

    conns = Bundle("conns")

    def __init__(self) -> None:
        super().__init__()
        self.w = type(self).world
        self.victim = self.w.ensure_victim()
        self.open: list[Conn] = []
        self.steps = 0
        self.log_from = len(self.victim.daemon.log)
        #: transfers this machine began with a name that is fine (for consistent chunks)
        self.begun: dict[str, dict[str, Any]] = {}

    def _run(self, afn: Any, *args: Any) -> Any:
        return self.w.portal.run(afn, *args)

    def _send(self, conn: Conn, frame: Frame) -> None:
        self._run(conn.send, frame.encode())

    @precondition(lambda self: len(self.open) < MAX_CONNS)
    @rule(target=conns, hello=hellos())
    def connect(self, hello: dict[str, Any]) -> Conn:
        conn = self._run(open_conn, self.w.portal, self.victim.port, hello, f"c{len(self.open)}")
        self.open.append(conn)
        return conn

    # Four rules send frames (hypothesis picks among rules evenly: most steps send).
    @rule(conn=conns, frame=begins())
    def begin(self, conn: Conn, frame: Frame) -> None:
        self.send(conn, frame)

    @rule(conn=conns, frame=st.one_of(chunks(), legacies()))
    def payload(self, conn: Conn, frame: Frame) -> None:
        self.send(conn, frame)

    @rule(conn=conns, frame=frames)
    def send(self, conn: Conn, frame: Frame) -> None:
        if frame.header.get("t") == "begin" and isinstance(frame.header.get("meta"), dict):
            meta = frame.header["meta"]
            if not hostile_name(meta.get("name")) and isinstance(frame.header.get("cs"), int):
                self.begun[frame.header["id"]] = frame.header
        self._send(conn, frame)

    @rule(conn=conns, data=st.data())
    def chunk_of_begun(self, conn: Conn, data: st.DataObject) -> None:
        """A chunk that fits a transfer begun before (on any connection): deeper states."""
        if not self.begun:
            return
        xid = data.draw(st.sampled_from(sorted(self.begun)))
        begin = self.begun[xid]
        cs, nbytes = begin["cs"], begin["meta"]["nbytes"]
        if not (isinstance(nbytes, int) and cs > 0 and 0 <= nbytes <= 1 << 20):
            return
        nchunks = -(-nbytes // cs) if nbytes else 0
        index = data.draw(st.integers(0, nchunks))
        raw = max(0, min(cs, nbytes - index * cs))
        self._send(
            conn,
            Frame(
                {
                    "t": "chunk",
                    "id": xid,
                    "i": index,
                    "o": index * cs,
                    "r": raw,
                    "n": raw,
                    "c": crc32c(bytes(raw)),
                },
                raw,
            ),
        )
        if data.draw(st.booleans()):
            self._send(conn, Frame({"t": "end", "id": xid, "c": crc32c(bytes(nbytes))}))

    @rule(conn=conns, name=names)
    def request(self, conn: Conn, name: str) -> None:
        """A pull. As the first message after the handshake, a hostile name gets a ``bad_name``
        error and nothing else (never a tensor)."""
        fresh = (
            conn.fresh
            and not conn.eof
            and conn.messages
            and not isinstance(conn.messages[0], Error)
        )
        seen = len(conn.messages)
        self._send(conn, Frame({"t": "request", "name": name}))
        if not fresh:
            return
        reply = self._run(conn.reply, seen)
        if hostile_name(name):
            assert not isinstance(reply, Begin | Legacy), f"served a tensor named {name!r}"
            assert isinstance(reply, Error) and reply.code == "bad_name", (
                f"request for {name[:80]!r}: expected a bad_name error, got {reply!r}"
            )

    @rule(conn=conns, cut=st.integers(1, 12))
    def truncated_frame_then_close(self, conn: Conn, cut: int) -> None:
        data = Frame({"t": "ping", "s": 7}).encode()
        self._run(conn.send, data[:cut])
        self._close(conn)

    @rule(conn=consumes(conns))
    def close(self, conn: Conn) -> None:
        self._close(conn)

    def _close(self, conn: Conn) -> None:
        if conn in self.open:
            self.open.remove(conn)
        self._run(conn.aclose)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def node_is_alive_and_answers(self) -> None:
        v = self.victim
        self.steps += 1
        assert v.alive, f"the daemon exited ({v.daemon.proc.returncode}):\n{v.log_tail()}"
        self._run(ping_fresh, v.port, self.steps)
        assert v.alive, f"the daemon exited ({v.daemon.proc.returncode}):\n{v.log_tail()}"
        grown = v.rss() - v.rss_start
        assert grown < RSS_MARGIN, f"the daemon's RSS grew by {grown >> 20} MiB"
        for conn in self.open:
            assert conn.garbled is None, f"the node sent bytes that do not decode: {conn.garbled}"
        if self.steps % ROUND_TRIP_EVERY == 0:
            self.w.round_trip()

    @invariant()
    def no_hostile_name_is_stored(self) -> None:
        v = self.victim
        bad = [n for n in v.stored_names() if hostile_name(n)]
        assert not bad, f"stored under hostile names: {bad!r}"
        assert not files_outside(v.outer), (
            f"files outside the daemon's home: {files_outside(v.outer)}"
        )

    @invariant()
    def no_handler_crashed(self) -> None:
        log = self.victim.daemon.log[self.log_from :].decode(errors="replace")
        assert "Traceback" not in log, f"an exception escaped a handler:\n{log[-6000:]}"

    def teardown(self) -> None:
        # Nothing here may raise: an exception in teardown would hide the step's failure.
        for conn in list(self.open):
            self._close(conn)


@pytest.fixture(scope="module")
def hostile_world() -> Iterator[World]:
    with world() as w:
        yield w


def test_a_hostile_peer_cannot_kill_bloat_or_poison_the_node(hostile_world: World) -> None:
    HostilePeer.world = hostile_world
    run_state_machine_as_test(HostilePeer, settings=FUZZ)
    assert not hostile_world.crashes, hostile_world.crashes[0]
    # After all of it, an honest peer is still served.
    hostile_world.ensure_victim()
    hostile_world.round_trip()
    assert not hostile_world.crashes, hostile_world.crashes[0]
