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

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tensord.wire.crc import crc32c
from tensord.wire.handshake import ALL_FEATURES
from tensord.wire.messages import Accept, Ack, Begin, Error, Hello, Legacy, Stored

from .support.helpers import IN_CI
from .support.hostile_peer import (
    BIG,
    RSS_MARGIN,
    Conn,
    World,
    files_outside,
    hostile_name,
    open_conn,
    ping_fresh,
    world,
)
from .support.raw_peer import header

LONG = os.environ.get("TENSORD_FUZZ_LONG", "") not in ("", "0")

FUZZ = settings(
    max_examples=400 if LONG else 25,
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
BAD_IDS = ["AB" * 8, "a" * 7, "a" * 65, "", "zz" * 8, "ab" * 8 + "\n", "ab" * 512, 7]
bad_ids = st.sampled_from(BAD_IDS)
xids = st.one_of(st.sampled_from(IDS), bad_ids)

#: Names a node accepts. (Not the honest client's ``legit/*``: overwriting a tensor a peer may
#: send is allowed, and would only race the round trip.)
GOOD_NAMES = ["w", "layers/0", "model.embed_tokens:0", "x" * 256, "fz/a"]
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
#: Any name: good ones, hostile ones, odd ones, made-up ones.
names = st.one_of(
    st.sampled_from(GOOD_NAMES),
    st.sampled_from(BAD_NAMES),
    st.sampled_from(ODD_NAMES),
    st.text(alphabet="a/.\x00é_", max_size=12),
    st.builds(
        lambda s, n: s * n, st.sampled_from(["a", "/", "..", "é", "a/"]), st.integers(1, 4096)
    ),
)
#: What a pull asks for: also the tensors the node holds (a 4 MiB one among them).
request_names = st.one_of(st.sampled_from([*GOOD_NAMES, BIG, "legit/t1", "absent"]), names)

DTYPES = ["<f4", "|u1", "<f8", "bfloat16", ">i2", "<c16", "|O", "<U8", "xyz", "", 7, None]
SHAPES = [
    [],
    [0],
    [1],
    [4],
    [1024],
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
    "4",
    None,
]
CHUNK_SIZES = [0, 1, 4095, 4096, 65536, 1 << 20, 64 << 20, (64 << 20) + 1, (1 << 63) - 1, -1]
WINDOWS = [0, 1, 4, 1 << 20, (1 << 20) + 1, -1, True]
#: A Hello's max-chunk: the protocol's floor and ceiling, and past them. Drawn mostly from the
#: first list, so that the frames after the Hello get somewhere.
GOOD_MCS = [4096, 65536, 64 << 20]
EDGE_MCS = [0, 1, 2, 4095, -1, (64 << 20) + 1, 1 << 40, (1 << 63) - 1]
hello_mcs = st.one_of(*[st.sampled_from(GOOD_MCS)] * 3, st.sampled_from(EDGE_MCS))
#: Stands for "leave the field out" among the edge values.
MISSING = "<missing>"


def sample(*values: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(values)


@dataclass(frozen=True)
class Frame:
    """One frame as sent: a header map and ``payload`` zero bytes after it (printed short)."""

    header: dict[str, Any]
    payload: int = 0
    wrong: str | None = None  # the field set to an edge value, if one was

    def __repr__(self) -> str:
        wrong = f", wrong={self.wrong!r}" if self.wrong else ""
        return f"Frame({_short(self.header)}, payload={self.payload}{wrong})"

    def encode(self) -> bytes:
        return header(self.header) + bytes(self.payload)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str | list) and len(value) > 40:
        return f"{value[:8]!r} * {len(value)}" if isinstance(value, str) else f"[...{len(value)}]"
    return repr(value)


def one_wrong(
    draw: st.DrawFn, h: dict[str, Any], edges: dict[str, st.SearchStrategy[Any]], payload: int = 0
) -> Frame:
    """``h`` with at most one field (``meta.name`` is a field of ``meta``) set to an edge value
    or left out: the frame gets past every check but one, so the node's deeper states are
    reached, and each check is met with every kind of wrong."""
    key = draw(st.sampled_from([*[None] * len(edges), *edges])) if edges else None
    if key is None:
        return Frame(h, payload)
    value = draw(edges[key])
    target, _, leaf = key.rpartition(".")
    d = h[target] if target else h
    if isinstance(d, dict):
        if value == MISSING:
            d.pop(leaf, None)
        else:
            d[leaf] = value
    return Frame(h, payload, key)


META_EDGES: dict[str, st.SearchStrategy[Any]] = {
    "meta": sample(None, [], "x", {}),
    "meta.name": names,
    "meta.dtype": st.sampled_from(DTYPES),
    "meta.shape": st.sampled_from(SHAPES),
    "meta.nbytes": st.one_of(edge_ints, sample(None, "16", MISSING)),
    "meta.grad": sample("yes", 1, None, True),
}


@st.composite
def valid_metas(draw: st.DrawFn) -> dict[str, Any]:
    dtype, size = draw(sample(("|u1", 1), ("<f4", 4), ("bfloat16", 2)))
    n = draw(sample(0, 1, 4, 1024, 1025, 16384, 1 << 18))
    return {
        "name": draw(st.sampled_from(GOOD_NAMES)),
        "dtype": dtype,
        "shape": [n],
        "nbytes": n * size,
    }


BEGIN_EDGES: dict[str, st.SearchStrategy[Any]] = {
    **META_EDGES,
    "id": bad_ids,
    "cs": st.sampled_from(CHUNK_SIZES),
    "w": st.sampled_from(WINDOWS),
    "resume": sample("no", 1, None),
}


@st.composite
def begins(draw: st.DrawFn, xid: st.SearchStrategy[str] | None = None, edges: bool = True) -> Frame:
    h = {
        "t": "begin",
        "id": draw(xid if xid is not None else st.sampled_from(IDS)),
        "meta": draw(valid_metas()),
        "cs": draw(sample(4096, 65536)),
        "w": draw(sample(1, 4, 64)),
        "resume": draw(st.booleans()),
    }
    return one_wrong(draw, h, BEGIN_EDGES if edges else {})


CHUNK_EDGES: dict[str, st.SearchStrategy[Any]] = {
    "id": st.one_of(bad_ids, st.sampled_from(IDS)),
    "i": st.one_of(edge_ints, sample(None, "0")),
    "o": st.one_of(edge_ints, sample(MISSING)),
    "r": st.one_of(edge_ints, sample(MISSING)),
    "n": st.one_of(edge_ints, sample(MISSING)),  # a huge n: the node waits for bytes never sent
    "c": st.one_of(sample(None, 12345, 1 << 32, -1, MISSING)),
    "z": sample(True, 1, "yes"),
}


def chunk_frame(
    draw: st.DrawFn, xid: str, index: int, chunk_size: int, nbytes: int, edges: bool = True
) -> Frame:
    """Chunk ``index`` of a transfer, right (payload included) but for at most one field."""
    raw = max(0, min(chunk_size, nbytes - index * chunk_size, 1 << 20))
    h = {
        "t": "chunk",
        "id": xid,
        "i": index,
        "o": index * chunk_size,
        "r": raw,
        "n": raw,
        "c": crc32c(bytes(raw)),
    }
    return one_wrong(draw, h, CHUNK_EDGES if edges else {}, raw)


@st.composite
def chunks(draw: st.DrawFn) -> Frame:
    """A chunk of no transfer in particular (before any Begin, of another one, twice...)."""
    return chunk_frame(draw, draw(st.sampled_from(IDS)), draw(st.integers(0, 3)), 4096, 1 << 14)


@st.composite
def legacies(draw: st.DrawFn) -> Frame:
    """Legacy mode: the whole tensor in one frame."""
    meta = draw(valid_metas())
    h = {"t": "tensor", "meta": meta, "n": meta["nbytes"], "c": crc32c(bytes(meta["nbytes"]))}
    sent = meta["nbytes"]
    return one_wrong(draw, h, {**META_EDGES, "n": edge_ints, "c": sample(None, 7, -1)}, sent)


def _simple(t: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Frame]:
    return st.fixed_dictionaries(fields).map(lambda f: Frame({"t": t, **f}))


def _covering(n: int) -> list[list[int]]:
    """``n`` ranges each covering every chunk there could be (4096 is the protocol's most)."""
    return [[0, (1 << 40) - 1]] * n


ranges = st.one_of(
    st.just([]),
    st.just([[0, 1]]),
    st.builds(_covering, sample(4096, 4097)),
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
        code=sample("auth", "busy", "protocol", "x" * 64, "\x1b[31m"),
        msg=sample("", "no", "x" * 1024, "\x1b]0;pwned\x07"),
        id=st.one_of(st.none(), xids),
    ),
    _simple("auth", pf=sample(bytes(32), bytes(31), b"")),
    _simple(
        "hello",
        proto=st.just("tensord"),
        v=st.just([1]),
        node=st.just("again"),
        f=st.just(sorted(ALL_FEATURES)),
        mc=hello_mcs,
    ),
    _simple("request", name=request_names, id=xids),
    _simple("launch_missiles"),
    _simple("ping", s=sample(-1, 1 << 64 - 1, "1", None)),
)


def good_hellos() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "t": st.just("hello"),
            "proto": st.just("tensord"),
            "v": st.just([1]),
            "node": sample("fuzz", "fuzz2"),
            "f": st.just(sorted(ALL_FEATURES)),
            "mc": st.sampled_from(GOOD_MCS),
        }
    )


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


F = TypeVar("F", bound=Callable[..., Any])


def step(fn: F) -> F:
    """Marks the machine failed while ``fn`` runs, so that teardown knows a step raised."""

    @functools.wraps(fn)
    def wrapper(self: HostilePeer, *args: Any, **kwargs: Any) -> Any:
        self.failed = True
        result = fn(self, *args, **kwargs)
        self.failed = False
        return result

    return wrapper  # type: ignore[return-value]


class HostilePeer(RuleBasedStateMachine):
    world: World  # set by the test before the run

    conns = Bundle("conns")

    def __init__(self) -> None:
        super().__init__()
        self.w = type(self).world
        self.victim = self.w.ensure_victim()
        self.open: list[Conn] = []
        self.steps = 0
        self.failed = False
        self.log_from = len(self.victim.daemon.log)
        #: the Begins this example sent, by transfer id (for the frames that follow them)
        self.begun: dict[str, dict[str, Any]] = {}

    def _run(self, afn: Any, *args: Any) -> Any:
        return self.w.portal.run(afn, *args)

    def _send(self, conn: Conn, frame: Frame) -> None:
        self._run(conn.send, frame.encode())

    @initialize(target=conns, hello=good_hellos())
    @step
    def first_connection(self, hello: dict[str, Any]) -> Conn:
        return self.connect(hello)

    @precondition(lambda self: len(self.open) < MAX_CONNS)
    @rule(target=conns, hello=hellos())
    @step
    def connect(self, hello: dict[str, Any]) -> Conn:
        conn = self._run(open_conn, self.w.portal, self.victim.port, hello, f"c{len(self.open)}")
        self.open.append(conn)
        return conn

    @rule(conn=conns, data=st.data())
    @step
    def transfer(self, conn: Conn, data: st.DataObject) -> None:
        """A whole chunked transfer in one step: Begin, its chunks, End, each right but for at
        most one field, and then perhaps out of order (two swapped, one twice, one left out,
        a foreign frame in between). Sent whole and in order on a connection that did nothing
        else, it is stored."""
        fresh_xid = self.w.next_xid()
        # Which frame is wrong in one field: none (an honest transfer), the Begin, a chunk or
        # the End.
        wrong = data.draw(sample(None, None, "begin", "chunk", "end"))
        begin = data.draw(begins(st.sampled_from([fresh_xid, *IDS]), wrong == "begin"))
        h = begin.header
        meta = h.get("meta")
        if isinstance(meta, dict) and isinstance(h.get("id"), str):
            self.begun[h["id"]] = conn.begun[h["id"]] = h
        xid, cs, nbytes = self._geometry(h if isinstance(meta, dict) else {"id": "x", "meta": {}})
        nchunks = min(-(-nbytes // cs), 64)
        bad = data.draw(st.integers(0, max(nchunks - 1, 0))) if wrong == "chunk" else -1
        seq = [begin]
        seq += [chunk_frame(data.draw, xid, i, cs, nbytes, i == bad) for i in range(nchunks)]
        crc = crc32c(bytes(nbytes)) if nbytes <= 1 << 20 else 0
        end_crc = data.draw(sample(None, crc ^ 1, 1 << 32)) if wrong == "end" else crc
        seq.append(
            Frame({"t": "end", "id": xid, "c": end_crc}, wrong=None if end_crc == crc else "c")
        )
        how = data.draw(sample(None, None, None, "swap", "twice", "drop", "foreign", "end twice"))
        i, j = data.draw(st.integers(0, len(seq) - 1)), data.draw(st.integers(0, len(seq) - 1))
        if how == "swap":
            seq[i], seq[j] = seq[j], seq[i]
        elif how == "twice":
            seq.insert(j, seq[i])
        elif how == "drop":
            del seq[i]
        elif how == "foreign":
            seq.insert(i, data.draw(OTHER_FRAMES))
        elif how == "end twice":
            seq.append(seq[-1])
        honest = (
            how is None
            and all(f.wrong is None for f in seq)
            and xid == fresh_xid
            and conn.fresh
            and self._accepted(conn)
        )
        seen = len(conn.messages)
        self._run(conn.send, b"".join(f.encode() for f in seq))
        if honest:
            self._expect_stored(conn, seen, xid)

    def _accepted(self, conn: Conn) -> bool:
        """The node answered this connection's Hello with its own."""
        return bool(conn.messages) and isinstance(conn.messages[0], Hello) and not conn.eof

    def _expect_stored(self, conn: Conn, seen: int, xid: str) -> None:
        while True:
            reply = self._run(conn.reply, seen)
            seen += 1
            if isinstance(reply, Stored) and reply.id == xid:
                return
            if isinstance(reply, Error) and reply.code in ("quota", "busy"):
                return  # the store or this peer's budget is full: refused, and said so
            assert isinstance(reply, Ack | Accept), f"an honest transfer {xid} got {reply!r}"

    # Several rules send frames (hypothesis picks among the rules evenly: most steps send).
    @rule(conn=conns, frame=begins())
    @step
    def begin(self, conn: Conn, frame: Frame) -> None:
        h = frame.header
        meta = h.get("meta")
        if isinstance(meta, dict) and isinstance(h.get("id"), str):
            self.begun[h["id"]] = conn.begun[h["id"]] = h
        self._send(conn, frame)

    @rule(conn=conns, frame=st.one_of(chunks(), legacies(), OTHER_FRAMES))
    @step
    def send(self, conn: Conn, frame: Frame) -> None:
        self._send(conn, frame)

    def _a_begun(self, conn: Conn, data: st.DataObject) -> dict[str, Any] | None:
        """A Begin sent before: mostly one of this connection's, else any connection's."""
        pool = conn.begun if conn.begun and data.draw(st.booleans()) else self.begun
        if not pool:
            return None
        return pool[data.draw(st.sampled_from(sorted(pool)))]

    @staticmethod
    def _geometry(begin: dict[str, Any]) -> tuple[str, int, int]:
        xid, cs, nbytes = begin["id"], begin.get("cs"), begin["meta"].get("nbytes")
        if not (isinstance(cs, int) and isinstance(nbytes, int)) or cs <= 0 or nbytes < 0:
            cs, nbytes = 4096, 1 << 14  # the Begin was wrong there: chunks of some size
        return xid, cs, nbytes

    @rule(conn=conns, data=st.data())
    @step
    def chunk_of_begun(self, conn: Conn, data: st.DataObject) -> None:
        """A chunk (and maybe the End) of a transfer begun before: right but for at most one
        field."""
        begin = self._a_begun(conn, data)
        if begin is None:
            return
        xid, cs, nbytes = self._geometry(begin)
        index = data.draw(st.integers(0, min(-(-nbytes // cs), 1 << 20)))
        self._send(conn, chunk_frame(data.draw, xid, index, cs, nbytes))
        if data.draw(st.booleans()):
            self._end(conn, data, xid, nbytes)

    @rule(conn=conns, data=st.data())
    @step
    def rest_of_transfer(self, conn: Conn, data: st.DataObject) -> None:
        """Every chunk of a transfer begun before from some index on, all right, and its End:
        the honest finish of whatever came before."""
        begin = self._a_begun(conn, data)
        if begin is None:
            return
        xid, cs, nbytes = self._geometry(begin)
        nchunks = -(-nbytes // cs)
        if nbytes > 1 << 20:
            return
        first = data.draw(st.integers(0, nchunks))
        out = bytearray()
        for index in range(first, nchunks):
            raw = min(cs, nbytes - index * cs)
            c = crc32c(bytes(raw))
            h = {"t": "chunk", "id": xid, "i": index, "o": index * cs, "r": raw, "n": raw, "c": c}
            out += header(h) + bytes(raw)
        self._run(conn.send, bytes(out))
        self._end(conn, data, xid, nbytes)

    def _end(self, conn: Conn, data: st.DataObject, xid: str, nbytes: int) -> None:
        crc = crc32c(bytes(nbytes)) if nbytes <= 1 << 20 else 0
        end = data.draw(sample(crc, crc, None, crc ^ 1), label="End's crc")
        self._send(conn, Frame({"t": "end", "id": xid, "c": end}))

    @rule(conn=conns, name=request_names)
    @step
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
        assert reply is not None, f"the node closed the connection, no answer to {name[:80]!r}"
        if hostile_name(name):
            assert not isinstance(reply, Begin | Legacy), f"served a tensor named {name!r}"
            assert isinstance(reply, Error) and reply.code == "bad_name", (
                f"request for {name[:80]!r}: expected a bad_name error, got {reply!r}"
            )

    @rule(conn=conns, cut=st.integers(1, 12))
    @step
    def truncated_frame_then_close(self, conn: Conn, cut: int) -> None:
        data = Frame({"t": "ping", "s": 7}).encode()
        self._run(conn.send, data[:cut])
        self._close(conn)

    @rule(conn=consumes(conns))
    @step
    def close(self, conn: Conn) -> None:
        self._close(conn)

    def _close(self, conn: Conn) -> None:
        if conn in self.open:
            self.open.remove(conn)
        self._run(conn.aclose)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    @step
    def node_is_healthy(self) -> None:
        """The daemon runs and answers a Ping on a new connection, its RSS is within 64 MiB of
        its start, no handler raised an unexpected exception (the error boundary logs those
        with a traceback: a bug to fix even though the daemon lives on), no tensor is stored
        under a hostile name and nothing was written outside its home; every few steps an
        honest peer sends and pulls a tensor. One assertion for all of it: how a dying node
        is noticed first (its traceback, a refused connection) varies from run to run, and
        hypothesis would call two ways a "flaky" failure."""
        self.steps += 1
        problems = self._health(round_trip=self.steps % ROUND_TRIP_EVERY == 0)
        assert not problems, "\n".join(problems)

    def _health(self, *, round_trip: bool) -> list[str]:
        v = self.victim
        problems = []
        log = v.daemon.log[self.log_from :].decode(errors="replace")
        if "Traceback" in log:
            problems.append(f"an unexpected exception in the node:\n{log[-6000:]}")
        try:
            self._run(ping_fresh, v.port, self.steps)
        except AssertionError as exc:
            problems.append(str(exc))
        if not v.alive:
            problems.append(f"the daemon exited ({v.daemon.proc.returncode}):\n{v.log_tail()}")
            return problems
        grown = v.rss() - v.rss_start
        if grown >= RSS_MARGIN:
            problems.append(f"the daemon's RSS grew by {grown >> 20} MiB")
        problems += [
            f"the node sent bytes that do not decode: {c.garbled}" for c in self.open if c.garbled
        ]
        if bad := [n[:80] for n in v.stored_names() if hostile_name(n)]:
            problems.append(f"stored under hostile names: {bad!r}")
        if outside := files_outside(v.outer):
            problems.append(f"files outside the daemon's home: {outside}")
        if round_trip and not problems:
            try:
                self.w.round_trip()
            except Exception as exc:  # any failure of it is the finding
                problems.append(f"an honest peer's send and pull failed: {exc!r}")
        return problems

    def teardown(self) -> None:
        """The node handled everything this example sent, and survived it. After a failed
        step nothing here may raise (an exception in teardown would hide the step's failure),
        but the barrier still runs: the next example must not meet a node that this one's
        frames are still killing."""
        conns, self.open = self.open, []
        for conn in conns:
            self._run(conn.finish)
        if not self.failed:
            self.node_is_healthy()


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
