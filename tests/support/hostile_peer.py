"""A hostile but well-formed peer against a real ``tensord serve``, for the stateful fuzzer.

hypothesis drives its state machines synchronously, while the peers are trio code (RawPeer, a
TensorNode client). So one trio loop runs in a thread for the whole test (:class:`Portal`) and
the state machine's steps call into it: the raw connections, their reader tasks, the daemon's
log pump and the honest client all live in that one loop, across steps and examples.

The daemon is a real subprocess (tests/support/daemons.py) so that a crash shows as a process
exit, and its RSS is read from /proc. It runs without a cluster secret on loopback because
hand-written peers do not authenticate - which is also the worst case: anyone who reaches the
port is a peer.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import trio

from tensord.errors import ProtocolError
from tensord.node import TensorNode
from tensord.store import TensorStore
from tensord.wire.frames import FrameDecoder, encode
from tensord.wire.handshake import ALL_FEATURES, make_hello
from tensord.wire.messages import Begin, Legacy, Ping, Pong

from .daemons import Daemon, daemon, free_port
from .raw_peer import RawPeer, header, unauthenticated

T = TypeVar("T")

#: How long a reply may take before the node counts as hung (generous: 2 cores, other tests).
REPLY_TIMEOUT = 15.0
#: The node's RSS may grow by at most this much over the whole run (issue 12: "< 64 MiB").
RSS_MARGIN = 64 << 20
#: The store cap of the node under test: the fuzzer's Begins reserve disk space for real.
STORE_MAX_BYTES = 1 << 30
#: A stored tensor the fuzzer's Requests name: pulling it at a one-byte max-chunk was the
#: "+330 MiB for a 4 MiB tensor" of issue 12.
BIG = "legit/big"
BIG_BYTES = 4 << 20


class Portal:
    """A trio loop in a thread, for synchronous code (hypothesis steps) to call into."""

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._error: BaseException | None = None

    async def _main(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._stop = trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise

    def __enter__(self) -> Portal:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._stop is not None:
            with suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(60)

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``afn(*args)`` in the loop and return its result (or raise its exception)."""
        assert self._token is not None
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def spawn(self, afn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Start a background task in the loop's nursery."""
        assert self._token is not None and self._nursery is not None
        trio.from_thread.run_sync(self._nursery.start_soon, afn, *args, trio_token=self._token)

    async def start_in(self, afn: Callable[..., Awaitable[object]], *args: Any) -> Any:
        assert self._nursery is not None
        return await self._nursery.start(afn, *args)


# ---------------------------------------------------------------------------------------------
# The node under test


@dataclass
class Victim:
    """A running ``tensord serve`` with a store, no secret, on a loopback port."""

    daemon: Daemon
    port: int
    outer: Path  # the daemon's home is outer/home: nothing else may appear in outer
    stop: trio.Event
    exited: trio.Event
    rss_start: int = 0

    @property
    def pid(self) -> int:
        return int(self.daemon.proc.pid)

    @property
    def alive(self) -> bool:
        return self.daemon.proc.poll() is None

    @property
    def state_dir(self) -> Path:
        return self.outer / "home" / "state"

    def rss(self) -> int:
        """VmRSS of the daemon process, in bytes."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        assert match is not None, status
        return int(match.group(1)) * 1024

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.daemon.text.splitlines()[-n:])

    def stored_names(self) -> list[str]:
        """The names of the tensors in the daemon's store, read from its files."""
        return [info.name for info in TensorStore(self.state_dir).list()]


async def _run_victim(
    outer: Path, *, task_status: trio.TaskStatus[Victim] = trio.TASK_STATUS_IGNORED
) -> None:
    port = free_port()
    env = {
        "TENSORD_LISTEN": f"127.0.0.1:{port}",
        "TENSORD_NODE_ID": "victim",
        "TENSORD_CLUSTER_SECRET_FILE": "",  # hand-written peers do not authenticate
        "TENSORD_STORE_MAX_BYTES": str(STORE_MAX_BYTES),
    }
    home = outer / "home"
    home.mkdir()
    stop, exited = trio.Event(), trio.Event()
    try:
        async with daemon(env, home=home) as d:
            await d.wait_for("listening on")
            task_status.started(Victim(d, port, outer, stop, exited))
            with trio.CancelScope() as scope:
                # Ends at stop, or when the daemon exits by itself (a crash the steps report).
                async def watch() -> None:
                    await d.proc.wait()
                    scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    await stop.wait()
                    nursery.cancel_scope.cancel()
    finally:
        exited.set()


# ---------------------------------------------------------------------------------------------
# Raw connections that keep reading in the background


@dataclass
class Conn:
    """One hostile connection: what was sent, and everything the node answered."""

    peer: RawPeer
    label: str
    messages: list[object] = field(default_factory=list)
    eof: bool = False
    garbled: str | None = None  # the node sent bytes our decoder refused
    pulled: bool = False  # the node started sending a tensor: payload bytes are discarded
    fresh: bool = True  # nothing sent since the handshake
    begun: dict[str, dict[str, Any]] = field(default_factory=dict)  # Begins sent here, by id
    grew: trio.Event = field(default_factory=trio.Event)

    def _note(self) -> None:
        self.grew.set()
        self.grew = trio.Event()

    async def read(self) -> None:
        """Decode the node's frames until EOF; after the node starts sending a tensor (a pull
        was served), discard the rest unread: the fuzzer never acknowledges it anyway."""
        dec: FrameDecoder = self.peer.decoder
        stream = self.peer.stream
        try:
            while True:
                if self.pulled:
                    if not await stream.receive_some(1 << 16):
                        break
                    continue
                msg = dec.next_message()
                if msg is None:
                    data = await stream.receive_some(1 << 16)
                    if not data:
                        break
                    dec.feed(data)
                    continue
                self.messages.append(msg)
                self._note()
                if isinstance(msg, Begin | Legacy):
                    self.pulled = True
        except ProtocolError as exc:
            self.garbled = f"{type(exc).__name__}: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.eof = True
            self._note()

    async def reply(self, after: int) -> object | None:
        """The first message past index ``after``, or None at EOF."""
        with trio.fail_after(REPLY_TIMEOUT):
            while len(self.messages) <= after and not self.eof:
                await self.grew.wait()
        return self.messages[after] if len(self.messages) > after else None

    async def send(self, data: bytes) -> bool:
        """Send raw bytes; False if the node already closed the connection."""
        self.fresh = False
        try:
            with trio.fail_after(REPLY_TIMEOUT):
                await self.peer.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        except trio.TooSlowError:
            return False  # the node stopped reading (a stalled transfer): its choice
        return True

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.peer.stream.aclose()

    async def finish(self) -> None:
        """Half-close, and wait for the node to close its side: by then it has handled every
        frame sent here (the barrier that makes a step's effect show in the same example). A
        connection the node is sending a tensor on (it waits for acks, not reading) is closed
        outright: its send fails at once. Never raises."""
        if not self.pulled and not self.eof:
            with trio.move_on_after(REPLY_TIMEOUT):
                try:
                    await self.peer.stream.send_eof()
                    while not self.eof:
                        await self.grew.wait()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        await self.aclose()


async def open_conn(portal: Portal, port: int, hello: dict[str, Any], label: str) -> Conn:
    """Connect, send ``hello`` (any map), and start reading what the node answers."""
    with trio.fail_after(REPLY_TIMEOUT):
        peer = await RawPeer.connect(port, hello=False)
        conn = Conn(peer, label)
        await portal.start_in(_reader, conn)
        await conn.send(header(hello))
        conn.fresh = True
        await conn.reply(0)  # the node's Hello, its Error, or EOF
    return conn


async def _reader(
    conn: Conn, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    await conn.read()


async def ping_fresh(port: int, seq: int) -> None:
    """The liveness probe: a new connection, a standard Hello, a Ping answered by its Pong.
    Every way of failing is the same AssertionError, raised outside any ``except`` (hypothesis
    tells failures apart by their context too: a refused connect and a reset one are the same
    failure here, a dead node)."""
    problem: str | None = None
    try:
        with trio.fail_after(REPLY_TIMEOUT):
            peer = await RawPeer.connect(port, hello=False)
            try:
                await peer.stream.send_all(encode(make_hello("probe", ALL_FEATURES, 1 << 26)))
                await peer.stream.send_all(header({"t": "ping", "s": seq}))
                replies = [await peer.next_message(), await peer.next_message()]
            finally:
                await peer.stream.aclose()
        if not (isinstance(replies[1], Pong) and replies[1].seq == seq):
            problem = f"a Hello and a Ping got {replies!r}"
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, ProtocolError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        raise AssertionError(f"the node no longer answers a ping on a new connection: {problem}")


# ---------------------------------------------------------------------------------------------
# The honest client


async def _run_client(
    *, task_status: trio.TaskStatus[TensorNode] = trio.TASK_STATUS_IGNORED
) -> None:
    async with TensorNode(unauthenticated()) as node:
        task_status.started(node)
        await trio.sleep_forever()


async def legit_round_trip(client: TensorNode, port: int, n: int) -> None:
    """An honest peer sends a tensor and pulls it back: other peers are still served."""
    addr = f"127.0.0.1:{port}"
    array = np.arange(1000 + n, dtype=np.float32)
    with trio.fail_after(60):
        await client.send_tensor(addr, f"legit/t{n % 4}", array)
        back = await client.pull_tensor(addr, f"legit/t{n % 4}")
    assert np.array_equal(back, array)


# ---------------------------------------------------------------------------------------------
# What the fuzzer knows about names, independently of tensord's validator


def hostile_name(name: object) -> bool:
    """A name no store may ever hold: not a string, empty, over 256 characters, an empty / .
    / .. path segment (``layers//0``, ``a/../b``, a leading or trailing ``/``), or a control
    character, NUL included. (Other characters are the validator's policy, not checked here.)"""
    if not isinstance(name, str) or not 1 <= len(name) <= 256:
        return True
    if any(seg in ("", ".", "..") for seg in name.split("/")):
        return True
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name) or "\\" in name


def consistent_nbytes(dtype: str, shape: list[int]) -> int | None:
    sizes = {"<f4": 4, "|u1": 1, "<f8": 8, "bfloat16": 2, ">i2": 2, "<c16": 16}
    return math.prod(shape) * sizes[dtype] if dtype in sizes else None


@dataclass
class World:
    """What lives across the examples of one test: the loop, the node under test, the client."""

    portal: Portal
    tmp: Path
    victim: Victim | None = None
    client: TensorNode | None = None
    crashes: list[str] = field(default_factory=list)
    round_trips: int = 0
    xids: int = 0

    def next_xid(self) -> str:
        """A transfer id no example used before (the node remembers completed ones)."""
        self.xids += 1
        return f"{self.xids:016x}"

    def ensure_victim(self) -> Victim:
        """The node under test, started again (in a fresh directory) if it is not running: an
        example starts from a living node, so a crash reproduces and shrinks."""
        v = self.victim
        if v is not None and v.alive:
            try:
                self.portal.run(ping_fresh, v.port, 0)
                return v
            except AssertionError:
                pass  # dying after an earlier example's failure: start a new one
        if v is not None:
            self.crashes.append(v.log_tail())
            self.stop_victim()
        outer = Path(tempfile.mkdtemp(prefix="victim-", dir=self.tmp))
        v = self.portal.run(self.portal.start_in, _run_victim, outer)
        assert v is not None
        self.victim = v
        self._seed(v)
        v.rss_start = v.rss()
        return v

    def _seed(self, v: Victim) -> None:
        """A 4 MiB tensor the hostile peer can ask for."""
        assert self.client is not None
        big = np.random.default_rng(0).integers(0, 255, BIG_BYTES, dtype=np.uint8)
        self.portal.run(self.client.send_tensor, f"127.0.0.1:{v.port}", BIG, big)

    def stop_victim(self) -> None:
        v = self.victim
        if v is None:
            return
        self.victim = None

        async def stop() -> None:
            v.stop.set()
            await v.exited.wait()

        self.portal.run(stop)

    def round_trip(self) -> None:
        v = self.victim
        assert v is not None and self.client is not None
        self.round_trips += 1
        self.portal.run(legit_round_trip, self.client, v.port, self.round_trips)


@contextmanager
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="hostile-peer-") as tmp, Portal() as portal:
        w = World(portal, Path(tmp))
        w.client = portal.run(portal.start_in, _run_client)
        try:
            yield w
        finally:
            w.stop_victim()


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def files_outside(outer: Path) -> list[str]:
    """Anything in ``outer`` but the daemon's home: a name that escaped the store."""
    return sorted(p for p in os.listdir(outer) if p != "home")


__all__ = [
    "BIG",
    "Conn",
    "Ping",
    "World",
    "consistent_nbytes",
    "files_outside",
    "hostile_name",
    "open_conn",
    "ping_fresh",
    "world",
]
