"""A test-owned TCP proxy that injects faults between two peers.

Faults apply per connection (numbered from 0 in accept order): given for chosen connections in
``faults``, drawn for the others by ``policy`` (a function of the connection's number), and
spread over a whole run at exact rates by :class:`RandomFaults`. Bytes forwarded are counted per
connection and direction so tests can assert how much was re-sent.

Byte faults (any protocol): cut the connection after N bytes, flip one byte at offset N (either
direction), stall the server->client direction, throttle (``rate``), delay every read (``delay``),
refuse a connection, hold its dial (``hold_dial``: connection attempts reach the target in
another order than they were made). Frame faults follow the chunk protocol's framing - a 4-byte
big-endian header length, a msgpack header, then for ``chunk``/``tensor`` frames ``n`` raw
payload bytes - and apply where it is not encrypted: cut a transfer attempt at a fraction of the
bytes it still has to send (``cut_in_transfer``), flip a byte inside chosen chunk payloads
(``corrupt_chunks``, or ``RandomFaults.corrupt_rate``), and cut the connection instead of
forwarding the first reply of a given type (``cut_before_down="stored"``: the receiver stored
the tensor but its confirmation is lost).

:func:`faulty_path` gives a test that runs over both transports the same byte faults (cut,
flip, downstream cut) from this proxy or, for QUIC, from the UDP proxy (tests/support/udp_proxy.py).
"""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from .udp_proxy import UdpFault, UdpProxy


@dataclass
class Fault:
    cut_after: int | None = None  # close both sides once this many bytes went upstream
    corrupt_at: int | None = None  # XOR 0xFF into the upstream byte at this offset
    # The same for the server->client direction (a download's data), and a stall: stop
    # forwarding downstream after this many bytes but keep the connection open.
    down_cut_after: int | None = None
    down_corrupt_at: int | None = None
    down_stall_after: int | None = None
    # Frame-aware faults (plaintext chunk protocol only):
    #: At the first transfer attempt (``begin``) upstream: cut after this fraction (0..1) of
    #: the bytes the attempt still has to send (a resumed attempt's, once ``accept`` said).
    cut_in_transfer: float | None = None
    #: Flip one byte inside the payload of these upstream chunk frames (counted from 0 on this
    #: connection, every transfer on it included).
    corrupt_chunks: frozenset[int] = frozenset()
    #: Cut the connection instead of forwarding the first downstream frame of this type.
    cut_before_down: str | None = None
    # Timing and connection faults:
    delay: float = 0.0  # seconds slept before forwarding each read, both directions
    hold_dial: float = 0.0  # seconds before dialling the target
    refuse: bool = False  # close the client's connection without dialling the target


@dataclass
class ConnStats:
    upstream: int = 0
    downstream: int = 0
    cut: bool = False
    corrupted: bool = False
    # Frame-aware counts (upstream): transfer attempts, chunk frames, chunks corrupted.
    begins: int = 0
    chunks: int = 0
    chunks_corrupted: int = 0
    cut_reason: str = ""


@dataclass
class Frame:
    """One frame found in a byte stream: where it starts, its header, where its payload is."""

    start: int
    header: Any
    payload_start: int
    payload_len: int

    @property
    def type(self) -> str | None:
        t = self.header.get("t") if isinstance(self.header, dict) else None
        return t if isinstance(t, str) else None


class FrameScanner:
    """Follows the frames of one direction of a connection as its bytes pass, without holding
    them back (payloads are skipped, headers are a few bytes). On anything that is not a frame
    (TLS, HTTP, garbage) it stops (``broken``) and reports nothing more."""

    MAX_HEADER = 1 << 20

    def __init__(self) -> None:
        self.pos = 0  # absolute offset of the next byte fed
        self.broken = False
        self._state = "prefix"
        self._need = 4
        self._buf = bytearray()
        self._start = 0

    def feed(self, data: bytes | bytearray) -> list[Frame]:
        out: list[Frame] = []
        i, n = 0, len(data)
        while i < n and not self.broken:
            take = min(self._need, n - i)
            if self._state == "payload":
                i += take
                self._need -= take
                if not self._need:
                    self._state, self._need, self._start = "prefix", 4, self.pos + i
                continue
            self._buf += data[i : i + take]
            i += take
            self._need -= take
            if self._need:
                continue
            if self._state == "prefix":
                (length,) = struct.unpack(">I", self._buf)
                self._buf.clear()
                if not 0 < length <= self.MAX_HEADER:
                    self.broken = True
                    break
                self._state, self._need = "header", length
                continue
            try:
                header = msgpack.unpackb(bytes(self._buf), raw=False, strict_map_key=False)
            except Exception:
                self.broken = True
                break
            self._buf.clear()
            payload = 0
            if isinstance(header, dict) and header.get("t") in ("chunk", "tensor"):
                payload = header.get("n")
                if not isinstance(payload, int) or payload < 0:
                    self.broken = True
                    break
            out.append(Frame(self._start, header, self.pos + i, payload))
            if payload:
                self._state, self._need = "payload", payload
            else:
                self._state, self._need, self._start = "prefix", 4, self.pos + i
        self.pos += n
        return out


class RandomFaults:
    """Faults spread over every connection of a proxy at exact rates, at random places.

    ``cut_rate``: this fraction of transfer attempts (``begin`` frames) have their connection cut
    at a random point of the bytes they still have to send. ``corrupt_rate``: this fraction of
    chunk payloads (upstream) get one byte flipped at a random position. The rates are exact
    (a running sum decides, with a random phase), the places are random; both come from
    ``seed``, so a run with the same traffic draws the same faults.
    """

    def __init__(self, *, cut_rate: float = 0.0, corrupt_rate: float = 0.0, seed: int = 0):
        self.cut_rate = cut_rate
        self.corrupt_rate = corrupt_rate
        self.rng = random.Random(seed)
        self._cut_acc = self.rng.random()
        self._corrupt_acc = self.rng.random()

    def cut(self) -> float | None:
        """For the next transfer attempt: the fraction to cut it at, or None."""
        self._cut_acc += self.cut_rate
        if self._cut_acc >= 1.0:
            self._cut_acc -= 1.0
            return self.rng.random()
        return None

    def refund_cut(self) -> None:
        """A drawn cut never happened (the attempt ended first): the next attempt gets it."""
        self._cut_acc += 1.0

    def corrupt(self, payload_len: int) -> int | None:
        """For the next chunk payload: the offset inside it to flip, or None."""
        self._corrupt_acc += self.corrupt_rate
        if payload_len and self._corrupt_acc >= 1.0:
            self._corrupt_acc -= 1.0
            return self.rng.randrange(payload_len)
        return None


@dataclass
class _ConnState:
    """What the frame faults of one connection are waiting for."""

    fault: Fault
    cut_at: int | None = None  # absolute upstream offset of a frame-aware cut
    pending: dict[str, float] = field(default_factory=dict)  # resumed id -> cut fraction
    random_cut: bool = False  # the armed cut came from RandomFaults (refunded if missed)
    corrupt: list[int] = field(default_factory=list)  # absolute upstream offsets to flip
    transfers: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (nbytes, cs)
    begun: bool = False


@dataclass
class ChaosProxy:
    target_port: int
    target_host: str = "127.0.0.1"
    faults: dict[int, Fault] = field(default_factory=dict)
    conns: list[ConnStats] = field(default_factory=list)
    port: int = 0
    cut_event: trio.Event = field(default_factory=trio.Event)
    #: If set, connections after the first wait for it before dialling the target (a test
    #: restarts the target meanwhile).
    hold_later: trio.Event | None = None
    #: Upstream bytes per second, per connection (None: as fast as it goes).
    rate: float | None = None
    #: Faults for connections not in ``faults`` (called with the connection's number).
    policy: Callable[[int], Fault] | None = None
    #: Faults at exact rates over all connections (frame-aware: plaintext only).
    random_faults: RandomFaults | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def _fault(self, index: int) -> Fault:
        if index in self.faults:
            return self.faults[index]
        return self.policy(index) if self.policy is not None else Fault()

    # -- frame faults ---------------------------------------------------------------------------

    def _on_up_frame(self, frame: Frame, st: _ConnState, stats: ConnStats) -> None:
        t = frame.type
        h = frame.header
        if t == "begin":
            stats.begins += 1
            meta = h.get("meta") if isinstance(h.get("meta"), dict) else {}
            nbytes, cs = meta.get("nbytes"), h.get("cs")
            xid = h.get("id")
            if not (isinstance(nbytes, int) and isinstance(cs, int) and isinstance(xid, str)):
                return
            st.transfers[xid] = (nbytes, cs)
            self._disarm(st)  # a cut still armed for an earlier attempt never happened
            fraction: float | None = None
            if st.fault.cut_in_transfer is not None and not st.begun:
                fraction = st.fault.cut_in_transfer
            elif self.random_faults is not None:
                fraction = self.random_faults.cut()
                st.random_cut = fraction is not None
            st.begun = True
            if fraction is None:
                return
            if h.get("resume"):
                st.pending[xid] = fraction  # placed once "accept" says what is left
            else:
                st.cut_at = frame.payload_start + int(fraction * nbytes)
        elif t in ("chunk", "tensor"):
            index = stats.chunks
            stats.chunks += 1
            if not frame.payload_len:
                return
            at: int | None = None
            if index in st.fault.corrupt_chunks:
                at = random.randrange(frame.payload_len)
            elif self.random_faults is not None:
                at = self.random_faults.corrupt(frame.payload_len)
            if at is not None:
                st.corrupt.append(frame.payload_start + at)

    def _on_down_frame(self, frame: Frame, st: _ConnState, upstream: int) -> None:
        if frame.type == "accept" and isinstance(frame.header, dict):
            xid = frame.header.get("id")
            fraction = st.pending.pop(xid, None) if isinstance(xid, str) else None
            if fraction is None or xid not in st.transfers:
                return
            nbytes, cs = st.transfers[xid]
            have = 0
            for r in frame.header.get("have") or ():
                if isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r):
                    have += max(0, r[1] - r[0]) * cs
            left = max(0, nbytes - have)
            if left:
                st.cut_at = upstream + int(fraction * left)
            elif st.random_cut:
                self._refund(st)

    def _disarm(self, st: _ConnState) -> None:
        if (st.cut_at is not None or st.pending) and st.random_cut:
            self._refund(st)
        st.cut_at = None
        st.pending.clear()

    def _refund(self, st: _ConnState) -> None:
        if self.random_faults is not None:
            self.random_faults.refund_cut()
        st.random_cut = False

    # -- forwarding -----------------------------------------------------------------------------

    async def _handle(self, client: trio.SocketStream) -> None:
        index = len(self.conns)
        stats = ConnStats()
        self.conns.append(stats)
        fault = self._fault(index)
        if fault.refuse:
            stats.cut = True
            stats.cut_reason = "refused"
            await client.aclose()
            return
        if index > 0 and self.hold_later is not None:
            await self.hold_later.wait()
        if fault.hold_dial:
            await trio.sleep(fault.hold_dial)
        try:
            server = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            await client.aclose()
            return
        st = _ConnState(fault)
        up_frames, down_frames = FrameScanner(), FrameScanner()

        def cut_here(reason: str) -> None:
            stats.cut = True
            stats.cut_reason = reason
            self.cut_event.set()

        try:
            async with client, server, trio.open_nursery() as nursery:

                async def up() -> None:
                    while True:
                        data = bytearray(await client.receive_some(65536))
                        if not data:
                            await server.send_eof()
                            return
                        if fault.delay:
                            await trio.sleep(fault.delay)
                        start = stats.upstream
                        end = start + len(data)
                        if not up_frames.broken:
                            for frame in up_frames.feed(data):
                                self._on_up_frame(frame, st, stats)
                        if fault.corrupt_at is not None and start <= fault.corrupt_at < end:
                            data[fault.corrupt_at - start] ^= 0xFF
                            stats.corrupted = True
                        for at in [a for a in st.corrupt if start <= a < end]:
                            st.corrupt.remove(at)
                            data[at - start] ^= 0xFF
                            stats.corrupted = True
                            stats.chunks_corrupted += 1
                        cuts = [
                            (c, why)
                            for c, why in ((fault.cut_after, "offset"), (st.cut_at, "transfer"))
                            if c is not None and end >= c
                        ]
                        if cuts:
                            limit, why = min(cuts)
                            limit = max(limit, start)
                            await server.send_all(data[: limit - start])
                            stats.upstream = limit
                            st.cut_at = None
                            cut_here(why)
                            nursery.cancel_scope.cancel()
                            return
                        await server.send_all(data)
                        stats.upstream = end
                        if self.rate is not None:
                            await trio.sleep(len(data) / self.rate)

                async def down() -> None:
                    while True:
                        data = bytearray(await server.receive_some(65536))
                        if not data:
                            await client.send_eof()
                            return
                        if fault.delay:
                            await trio.sleep(fault.delay)
                        start = stats.downstream
                        if not down_frames.broken:
                            for frame in down_frames.feed(data):
                                if fault.cut_before_down and frame.type == fault.cut_before_down:
                                    keep = max(0, frame.start - start)
                                    await client.send_all(data[:keep])
                                    stats.downstream = start + keep
                                    cut_here(f"before {frame.type}")
                                    nursery.cancel_scope.cancel()
                                    return
                                self._on_down_frame(frame, st, stats.upstream)
                        at = fault.down_corrupt_at
                        if at is not None and start <= at < start + len(data):
                            data[at - start] ^= 0xFF
                            stats.corrupted = True
                        for limit, stall in (
                            (fault.down_cut_after, False),
                            (fault.down_stall_after, True),
                        ):
                            if limit is not None and start + len(data) >= limit:
                                await client.send_all(data[: limit - start])
                                stats.downstream = limit
                                cut_here("stall" if stall else "offset")
                                if stall:
                                    await trio.sleep_forever()
                                nursery.cancel_scope.cancel()
                                return
                        await client.send_all(data)
                        stats.downstream += len(data)

                nursery.start_soon(up)
                nursery.start_soon(down)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # one side went away: the other side sees the close
        finally:
            self._disarm(st)

    @property
    def bytes_upstream(self) -> int:
        return sum(c.upstream for c in self.conns)

    @property
    def cuts(self) -> int:
        """Connections cut (by any fault)."""
        return sum(c.cut for c in self.conns)

    @property
    def chunks_corrupted(self) -> int:
        return sum(c.chunks_corrupted for c in self.conns)

    @property
    def transfer_attempts(self) -> int:
        """``begin`` frames seen upstream."""
        return sum(c.begins for c in self.conns)

    @property
    def chunks(self) -> int:
        """Chunk frames seen upstream."""
        return sum(c.chunks for c in self.conns)


@asynccontextmanager
async def proxied(
    port: int,
    faults: dict[int, Fault],
    rate: float | None = None,
    *,
    policy: Callable[[int], Fault] | None = None,
    random_faults: RandomFaults | None = None,
    host: str = "127.0.0.1",
) -> AsyncIterator[ChaosProxy]:
    """A running proxy to ``host:port`` for the duration of the block."""
    async with trio.open_nursery() as nursery:
        proxy = ChaosProxy(
            port,
            target_host=host,
            faults=faults,
            rate=rate,
            policy=policy,
            random_faults=random_faults,
        )
        await nursery.start(proxy.run)
        yield proxy
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def faulty_path(transport: str, port: int, faults: dict[int, Fault]) -> AsyncIterator[Any]:
    """A proxy in front of ``port`` applying ``faults`` per connection: the TCP chaos proxy,
    or the UDP proxy (same numbering, same ``addr``/``conns[i].upstream|cut|corrupted``)."""
    if transport == "tcp":
        async with proxied(port, faults) as proxy:
            yield proxy
        return
    udp = {
        i: UdpFault(cut_after=f.cut_after, corrupt_at=f.corrupt_at, down_cut_after=f.down_cut_after)
        for i, f in faults.items()
    }
    async with trio.open_nursery() as nursery:
        proxy = UdpProxy(("127.0.0.1", port), faults=udp)
        await nursery.start(proxy.run)
        yield proxy
        nursery.cancel_scope.cancel()
