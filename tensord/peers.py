"""The peers a node talks to: how it dials them, and the table of their connection pools.

Dialing is more than a connect: it picks the transport a peer's cluster-file entry names (QUIC,
falling back to TCP for a peer that does not listen on it), checks that the node at the address
is the one the ticket names, and publishes ``connected``/``connect_failed`` peer events. Each
:class:`Peer` holds one :class:`~tensord.net.pool.PeerPool` and the nursery of that pool's idle
reaper, started lazily under the node's nursery by the first transfer to it.

The raw dialer is a constructor argument (:data:`Dialer`, the real network by default), so that
tests drive the retry and timing logic above it with a fake network under ``autojump_clock``,
as trio's own ``test_highlevel_open_tcp_stream.py`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from .address import PeerAddress, resolve_peer
from .config import Settings
from .errors import AuthenticationFailed, BadAddress, PeerUnreachable, ProtocolError, TransferFailed
from .events import EventBus, PeerEvent
from .net.connection import Connection
from .net.pool import PeerPool
from .net.quic import QuicDialer, dial_quic
from .net.security import PeerSecurity
from .net.tcp import dial
from .wire.frames import FrameDecoder
from .wire.messages import Hello

log = logging.getLogger("tensord.transfer")

#: Connects to a peer's address and handshakes: the real network, or a test's fake one.
Dialer = Callable[[PeerAddress], Awaitable[Connection]]


class Peer:
    """A remote node we talk to: its connection pool, and the nursery of its background task
    (the pool's idle reaper). The daemon's supervised peer tasks live in the daemon's nursery."""

    def __init__(self, addr: PeerAddress, pool: PeerPool) -> None:
        self.addr = addr
        self.pool = pool
        self.node_id = addr.node_id
        self._nursery: trio.Nursery | None = None

    @property
    def name(self) -> str:
        return self.node_id or str(self.addr.hostport)

    @property
    def running(self) -> bool:
        """Its nursery is open: its pool may be used (else the node makes a new ``Peer``)."""
        return self._nursery is not None

    def close(self) -> None:
        """Stop this peer's tasks and close its connections (it left the cluster)."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.pool.reap_idle)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self.pool.aclose()


class Peers:
    """The peer table of one node: a :class:`Peer` per address, made on first use.

    ``nursery`` returns the node's nursery, under which a new peer's tasks run (it raises
    :class:`~tensord.errors.NodeClosed` when the node is not running). ``decoder`` makes the
    frame decoder of a new connection; ``dialer`` replaces the network (tests).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        hello: Hello,
        decoder: Callable[[], FrameDecoder],
        security: PeerSecurity,
        events: EventBus,
        quic: QuicDialer | None,
        nursery: Callable[[], trio.Nursery],
        dialer: Dialer | None = None,
    ) -> None:
        self.settings = settings
        self._hello = hello
        self._decoder = decoder
        self._security = security
        self._events = events
        self._quic = quic
        self._nursery = nursery
        self._dial_any: Dialer = dialer if dialer is not None else self.dial_network
        self._addresses: dict[str, PeerAddress] = {}
        self._peers: dict[tuple[str, int], Peer] = {}
        self._lock = trio.Lock()
        self._connected: dict[str, trio.Event] = {}

    def resolve(self, peer: str | PeerAddress) -> PeerAddress:
        """A node id, ticket or host:port as an address (remembered: no lookup per send)."""
        if isinstance(peer, PeerAddress):
            return peer
        addr = self._addresses.get(peer)
        if addr is None:
            addr = resolve_peer(self.settings, peer)
            if len(self._addresses) < 4096:
                self._addresses[peer] = addr
        return addr

    async def get(self, addr: PeerAddress) -> Peer:
        """The running :class:`Peer` at ``addr``, started if there is none."""
        key = (addr.host, addr.port)
        peer = self._peers.get(key)
        if peer is not None and peer.running:
            return peer  # the common case: no lock, no checkpoint
        async with self._lock:
            peer = self._peers.get(key)
            if peer is None or not peer.running:
                nursery = self._nursery()
                pool = PeerPool(
                    lambda: self.dial(addr),
                    max_connections=self.settings.pool.max_connections,
                    max_idle=self.settings.pool.max_idle_seconds,
                )
                peer = Peer(addr, pool)
                await nursery.start(peer.run)
                self._peers[key] = peer
            return peer

    def reconfigure(self, settings: Settings) -> None:
        """Close the connections to the peers that left the cluster; forget resolved names."""
        keep = {(n.addr.host, n.addr.port) for n in settings.nodes}
        for key, peer in list(self._peers.items()):
            if peer.node_id is not None and self.settings.node(peer.node_id) and key not in keep:
                peer.close()
                del self._peers[key]
        self.settings = settings
        self._addresses.clear()

    # -- pool stats ----------------------------------------------------------------------------

    def pool_size(self, peer: str | None = None) -> int:
        """Open outbound connections, to one peer or to all."""
        if peer is not None:
            return sum(
                p.pool.size()
                for p in self._peers.values()
                if peer in (p.node_id, str(p.addr.hostport), p.addr.ticket())
            )
        return sum(p.pool.size() for p in self._peers.values())

    def pool_stats(self) -> dict[str, dict[str, int]]:
        """Per peer: open, idle and in-use connections, dials, reuses, evictions, idle closes."""
        return {
            p.name: {
                "size": p.pool.size(),
                "idle": p.pool.idle,
                "in_use": p.pool.in_use,
                "dials": p.pool.stats.dials,
                "reuses": p.pool.stats.reuses,
                "evictions": p.pool.stats.evictions,
                "idle_closed": p.pool.stats.idle_closed,
            }
            for p in self._peers.values()
        }

    # -- dialing -------------------------------------------------------------------------------

    def transport_for(self, addr: PeerAddress) -> str:
        """QUIC for a peer whose cluster-file entry says so; for an address that is in no
        entry, this node's own transport."""
        entry = self.settings.node(addr.node_id) if addr.node_id is not None else None
        return entry.transport if entry is not None else self.settings.transport

    async def dial_network(self, addr: PeerAddress) -> Connection:
        """The real dialer: QUIC where :meth:`transport_for` says so (TCP if that fails to
        connect), else TCP."""
        t = self.settings.transfer
        if self._quic is not None and self.transport_for(addr) == "quic":
            try:
                return await dial_quic(
                    addr.hostport,
                    self._hello,
                    self._decoder,
                    connect_timeout=t.connect_timeout,
                    key=self._security.key,
                    tls=self.settings.security.tls,
                    dialer=self._quic,
                )
            except PeerUnreachable as exc:
                # A peer that does not listen on QUIC (or a network that drops UDP): TCP.
                log.info("peer %s: no QUIC (%s); dialling over TCP", addr, exc)
        return await dial(
            addr.hostport,
            self._hello,
            self._decoder,
            connect_timeout=t.connect_timeout,
            security=self._security,
        )

    async def dial(self, addr: PeerAddress) -> Connection:
        """A new connection to ``addr``, checked to be the node its ticket names; failures to
        connect are peer events, and incompatible protocols a :class:`TransferFailed`."""
        try:
            conn = await self._dial_any(addr)
        except AuthenticationFailed as exc:
            log.warning("peer %s refused: %s", addr, exc)
            self._events.publish(PeerEvent(str(addr), "connect_failed", str(exc)))
            raise
        except (PeerUnreachable, ProtocolError) as exc:
            self._events.publish(PeerEvent(str(addr), "connect_failed", str(exc)))
            if isinstance(exc, ProtocolError) and exc.code in ("version", "bad_protocol"):
                # Retrying cannot make two incompatible peers compatible.
                raise TransferFailed(f"{addr}: {exc}", code="incompatible") from None
            raise
        if addr.node_id is not None and conn.peer_id != addr.node_id:
            await conn.aclose()
            raise BadAddress(f"{addr.hostport} is node {conn.peer_id!r}, not {addr.node_id!r}")
        self._events.publish(PeerEvent(conn.peer_id, "connected"))
        waiting = self._connected.pop(conn.peer_id, None)
        if waiting is not None:
            waiting.set()
        return conn

    async def wait_connected(self, peer_id: str) -> None:
        """Return at the next successful dial of node ``peer_id`` (any caller's: a send that got
        through is news to the peer supervisor, which would otherwise wait out its backoff)."""
        event = self._connected.get(peer_id)
        if event is None:  # one per configured peer: the ids come from the cluster file
            event = self._connected[peer_id] = trio.Event()
        await event.wait()


__all__ = ["Dialer", "Peer", "Peers"]
