"""A test-owned UDP proxy that drops, reorders and delays datagrams, reproducibly.

Clients send to the proxy's port; each client address gets its own upstream socket connected
to the target, so replies find their way back. Every datagram, in either direction, draws from
one seeded ``random.Random``: with probability ``loss`` it is dropped, with probability
``reorder`` it is held back for ``reorder_delay`` seconds (so the datagrams behind it overtake
it), and otherwise it is forwarded after ``delay`` seconds (0: at once). The same seed and the
same traffic give the same decisions.

Each client address is one connection (tensord's QUIC dialer opens a UDP socket per QUIC
connection), numbered from 0 in the order of first datagram, with bytes forwarded counted per
direction. Per-connection faults (``faults``, by number) are the QUIC analogues of the TCP
chaos proxy's byte faults: ``cut_after`` (``down_cut_after``) - once this many bytes went
upstream (downstream) on that connection, its path goes dark for good in both directions
(QUIC has no RST: a peer gone or a NAT mapping lost look exactly like this); ``corrupt_at`` -
one byte of the upstream datagram holding this offset is flipped (QUIC's packet protection
rejects the datagram, so it is as if lost); ``rebind_after`` - a NAT rebinding: from then on
the target sees the connection's datagrams come from a new address, and what it sends to the
old one is dropped (the connection's counts carry on).
"""

from __future__ import annotations

import heapq
import math
import random
import socket
from dataclasses import dataclass, field

import trio

Address = tuple[str, int]


@dataclass
class ProxyStats:
    forwarded: int = 0
    dropped: int = 0
    reordered: int = 0
    rebound: int = 0  # NAT rebindings done (rebind_after)


@dataclass
class UdpFault:
    cut_after: int | None = None  # upstream bytes, then every datagram of the flow is dropped
    corrupt_at: int | None = None  # flip the upstream byte at this offset
    down_cut_after: int | None = None  # the same cut, counted in downstream bytes
    rebind_after: int | None = None  # upstream bytes, then a NAT rebinding (module notes)


@dataclass
class UdpConnStats:
    upstream: int = 0  # bytes let through the faults, client -> target
    downstream: int = 0
    cut: bool = False
    corrupted: bool = False


@dataclass
class UdpProxy:
    target: Address
    loss: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.003
    delay: float = 0.0
    seed: int = 0
    #: While True every datagram is dropped: the path goes dark (a cable pulled, a peer gone).
    blackhole: bool = False
    faults: dict[int, UdpFault] = field(default_factory=dict)
    stats: ProxyStats = field(default_factory=ProxyStats)
    conns: list[UdpConnStats] = field(default_factory=list)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __post_init__(self) -> None:
        self.port = 0
        self._rng = random.Random(self.seed)
        self._front = _udp_socket()
        self._upstreams: dict[Address, tuple[trio.socket.SocketType, int]] = {}
        self._rebind: set[Address] = set()
        self._old: list[trio.socket.SocketType] = []  # upstream sockets replaced by a rebind
        # (due time, sequence, socket, data, destination or None for a connected socket)
        self._queue: list[tuple[float, int, trio.socket.SocketType, bytes, Address | None]] = []
        self._seq = 0
        self._wake = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Proxy until cancelled; reports the port clients should send to."""
        await self._front.bind(("127.0.0.1", 0))
        self.port = self._front.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._release)
                task_status.started(self._front.getsockname()[1])
                while True:
                    data, client = await self._front.recvfrom(65536)
                    known = self._upstreams.get(client)
                    if known is not None:
                        fault = self.faults.get(known[1])
                        at = fault.rebind_after if fault is not None else None
                        if at is not None and self.conns[known[1]].upstream >= at:
                            fault.rebind_after = None  # once
                            self._rebind.add(client)
                    if known is None or client in self._rebind:
                        self._rebind.discard(client)
                        upstream = _udp_socket()
                        await upstream.connect(self.target)
                        if known is None:
                            self.conns.append(UdpConnStats())
                            index = len(self.conns) - 1
                        else:
                            self._old.append(known[0])
                            self.stats.rebound += 1
                            index = known[1]
                        known = self._upstreams[client] = (upstream, index)
                        nursery.start_soon(self._backward, known, client)
                    upstream, index = known
                    data = self._fault(index, data)
                    if data is not None:
                        self._submit(upstream, data, None)
        finally:
            self._front.close()
            for s, _ in self._upstreams.values():
                s.close()
            for s in self._old:
                s.close()

    async def _backward(self, known: tuple[trio.socket.SocketType, int], client: Address) -> None:
        upstream, index = known
        conn = self.conns[index]
        while True:
            try:
                data = await upstream.recv(65536)
            except ConnectionRefusedError:
                continue  # the target is gone for now; the client's retransmits find out
            if self._upstreams[client] is not known:  # rebound: the old mapping is gone
                self.stats.dropped += 1
                continue
            fault = self.faults.get(index)
            limit = fault.down_cut_after if fault is not None else None
            if limit is not None and conn.downstream + len(data) > limit:
                conn.cut = True
            if conn.cut:
                self.stats.dropped += 1
                continue
            conn.downstream += len(data)
            self._submit(self._front, data, client)

    def _fault(self, index: int, data: bytes) -> bytes | None:
        """Apply connection ``index``'s faults to an upstream datagram (None: dropped)."""
        conn = self.conns[index]
        fault = self.faults.get(index)
        start = conn.upstream
        if fault is not None and fault.cut_after is not None:
            conn.cut = conn.cut or start + len(data) > fault.cut_after
        if conn.cut:
            self.stats.dropped += 1
            return None
        conn.upstream += len(data)
        at = fault.corrupt_at if fault is not None else None
        if at is not None and start <= at < start + len(data):
            damaged = bytearray(data)
            damaged[at - start] ^= 0xFF
            conn.corrupted = True
            return bytes(damaged)
        return data

    def _submit(self, sock: trio.socket.SocketType, data: bytes, dest: Address | None) -> None:
        r = self._rng.random()
        if self.blackhole or r < self.loss:
            self.stats.dropped += 1
            return
        hold = self.delay
        if r < self.loss + self.reorder:
            self.stats.reordered += 1
            hold += self.reorder_delay
        self.stats.forwarded += 1
        self._seq += 1
        heapq.heappush(self._queue, (trio.current_time() + hold, self._seq, sock, data, dest))
        self._wake.set()

    async def _release(self) -> None:
        """Send held datagrams when they are due (a network's delay, not synchronisation)."""
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            while self._queue and self._queue[0][0] <= now:
                _, _, sock, data, dest = heapq.heappop(self._queue)
                await self._forward(sock, data, dest)
            due = self._queue[0][0] if self._queue else math.inf
            with trio.move_on_at(due):
                await self._wake.wait()

    async def _forward(
        self, sock: trio.socket.SocketType, data: bytes, dest: Address | None
    ) -> None:
        try:
            if dest is None:
                await sock.send(data)
            else:
                await sock.sendto(data, dest)
        except OSError:
            pass


#: Socket buffers as big as tensord's QUIC sockets ask for: with the kernel's default (208 KiB)
#: a loss-free burst overflowed the proxy's receive buffer (~0.2 % of the datagrams).
SOCKET_BUFFER = 4 << 20


def _udp_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    return sock
