"""``TensorNode``: send, pull and receive tensors over the chunk protocol.

A node owns one nursery. Under it run the peer listener (one task per inbound connection) and
one nursery per peer it talks to, holding that peer's background tasks (the connection pool's
idle reaper). A send or pull runs in the caller's task - no task is spawned per transfer, which
matters for small-tensor latency - inside a cancel scope the node owns: shutting the node down
cancels every transfer (nothing leaks, nothing hangs) and the caller gets ``NodeClosed``; a caller
that is cancelled cancels just its own transfer.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import numpy as np
import trio

from .address import PeerAddress, resolve_peer
from .backoff import Backoff
from .boundary import report_unexpected
from .config import MAX_CHUNK_SIZE, HostPort, Settings
from .errors import (
    AuthenticationFailed,
    BadAddress,
    BadTensor,
    NodeClosed,
    PeerUnreachable,
    ProtocolError,
    TensorError,
    TensorNotFound,
    TransferFailed,
)
from .events import ArrivalEvent, EventBus, PeerEvent, TransferEvent
from .lifecycle import Event, Lifecycle, State
from .limits import chunk_size_for
from .net.connection import (
    Connection,
    receive_chunked,
    receive_legacy,
    send_chunked,
    send_legacy,
)
from .net.pool import PeerPool
from .net.quic import (
    ListenerStats,
    QuicDialer,
    QuicStreamTransport,
    QuicTuning,
    dial_quic,
    serve_quic,
)
from .net.security import PeerSecurity
from .net.stream import ConnectionClosed
from .net.tcp import dial, open_listeners, serve
from .sink import MemorySink, Sink, StoreSink, flat_bytes
from .store import TensorInfo, TensorStore, checked_name
from .wire.compress import AdaptiveCompressor
from .wire.frames import FrameDecoder
from .wire.handshake import VERSIONS, Agreement, local_features, make_hello
from .wire.messages import (
    Accept,
    Begin,
    Chunk,
    End,
    Error,
    Hello,
    Legacy,
    Ping,
    Pong,
    Request,
    Stored,
)
from .wire.meta import TensorMeta
from .wire.transfer import ReceiveState, ReceiveTransfer, SendTransfer

log = logging.getLogger("tensord.transfer")
T = TypeVar("T")

MAX_BACKOFF = 5.0
#: How often a receive into the store saves its progress (what a ``kill -9`` can cost, at most).
CHECKPOINT_INTERVAL = 1.0
#: How often partial receives abandoned on disk are looked for and removed.
SWEEP_INTERVAL = 60.0
#: Errors after which a transfer attempt is retried on a new connection.
RETRIABLE = (
    PeerUnreachable,
    ProtocolError,
    ConnectionClosed,
    OSError,
    TimeoutError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


class Arrival(NamedTuple):
    """A received tensor, as returned by :meth:`TensorNode.receive_tensor`."""

    name: str
    array: np.ndarray[Any, Any]
    sender: str


@dataclass(frozen=True)
class TransferResult:
    """What a completed send or pull cost."""

    id: str
    name: str
    peer: str
    nbytes: int
    seconds: float
    retries: int
    bytes_sent: int = 0  # payload bytes on the wire (after compression), resends included
    bytes_resent: int = 0
    chunks_compressed: int = 0
    nacks: int = 0
    legacy: bool = False
    transport: str = "tcp"  # of the attempt that completed: "tcp" or "quic"

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")


def _transport_of(conn: Connection) -> str:
    return "quic" if isinstance(conn.stream.transport, QuicStreamTransport) else "tcp"


def _only_cancelled(exc: BaseException) -> bool:
    """``trio.Cancelled``, or an exception group holding nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def retry_backoff(base_ms: int) -> Backoff:
    """The transfers' retry policy: ``tensor_protocol.retry_base_delay`` (milliseconds, as
    Ollama spells it) doubling per attempt that moved nothing, capped at 5 s, +-20 %."""
    return Backoff(base=base_ms / 1000, cap=MAX_BACKOFF)


@dataclass
class _Partial:
    xfer: ReceiveTransfer
    sink: Sink
    expires: float


@dataclass(frozen=True)
class _Completed:
    """A receive that was committed, remembered for ``partial_ttl_seconds``: if the sender never
    got our ``Stored`` (a cut at the last moment) its resumed ``Begin`` is confirmed again, with
    no second commit, no second arrival and no chunk sent twice."""

    meta: TensorMeta
    chunk_size: int
    nchunks: int
    crc: int | None
    expires: float

    def matches(self, begin: Begin) -> bool:
        return begin.meta == self.meta and begin.chunk_size == self.chunk_size


@dataclass
class _PulledPartial:
    """A pull's receive, kept across its attempts so that a retry resumes it."""

    xfer: ReceiveTransfer | None = None
    sink: Sink | None = None

    async def discard(self) -> None:
        if self.sink is not None:
            await self.sink.discard()
        self.xfer = self.sink = None


@dataclass
class _Active:
    scope: trio.CancelScope
    released: trio.Event
    nbytes: int = 0


class Peer:
    """A remote node we talk to: its connection pool, and the nursery of its background tasks
    (the pool's idle reaper; the daemon adds its supervised peer tasks here)."""

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


class TensorNode:
    """A node of the cluster: send, pull and receive tensors.

    ``TensorNode()`` is a library node on embedded defaults (a random id, 127.0.0.1 on an
    ephemeral port); pass a :class:`Settings` for anything else. Use it as ``async with node:``
    or run it in your own nursery with ``await node.start(nursery)``; ``node.shutdown()`` stops
    it. ``features`` restricts what the node offers (tests use it to play an older peer).

    With ``settings.state_dir`` set (the daemon always sets it) tensors live in a
    :class:`~tensord.store.TensorStore` there: received straight into memory-mapped files,
    checkpointed while they arrive and resumable across restarts. Without it (a library node on
    defaults) they are kept in memory.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        features: frozenset[str] | None = None,
        versions: tuple[int, ...] = VERSIONS,
    ) -> None:
        self.settings = settings if settings is not None else Settings.for_library()
        proto = self.settings.tensor_protocol
        self.features = (
            features
            if features is not None
            else local_features(
                streaming=proto.use_streaming_protocol, compression=proto.enable_compression
            )
        )
        self.versions = versions
        self.events = EventBus()
        self.node_id = self.settings.node_id
        state = self.settings.state_dir
        self.store: TensorStore | None = (
            TensorStore(state, max_bytes=self.settings.store.max_bytes)
            if state is not None
            else None
        )
        self._hello = make_hello(self.node_id, self.features, MAX_CHUNK_SIZE, versions)
        #: The cluster secret and TLS contexts (read once, here: a bad file fails construction).
        self.security = PeerSecurity.from_settings(self.settings.security)
        #: One QUIC connection per peer, when this node or any peer in the cluster uses QUIC.
        uses_quic = self.settings.transport == "quic" or any(
            n.transport == "quic" for n in self.settings.nodes
        )
        q = self.settings.quic
        self._quic_tuning = QuicTuning(
            max_datagram_size=q.max_datagram_size,
            congestion_control=q.congestion_control,
            idle_timeout=q.idle_timeout,
            stream_window=q.stream_window,
            connection_window=q.connection_window,
        )
        self._quic: QuicDialer | None = QuicDialer(self._quic_tuning) if uses_quic else None
        #: What the QUIC listener admitted, refused and shed (when this node listens on QUIC).
        self.quic_stats = ListenerStats()
        self._tensors: dict[str, np.ndarray[Any, Any]] = {}
        self._arrivals: deque[Arrival] = deque()
        self._arrived = trio.Event()
        self._partials: dict[tuple[str, str], _Partial] = {}
        self._inbound: Counter[str] = Counter()  # inbound connections per peer
        #: Committed receives per peer, oldest first (``_Completed``), keyed by transfer id.
        self._completed: dict[str, dict[str, _Completed]] = {}
        self._active: dict[tuple[str, str], _Active] = {}
        self._jobs: set[trio.CancelScope] = set()
        self._busy = 0
        self._quiet = trio.Event()
        self._accepting = trio.CancelScope()
        self._draining = False
        self._xid_prefix = secrets.token_hex(4)
        self._xid_counter = 0
        self._addresses: dict[str, PeerAddress] = {}
        self._peers: dict[tuple[str, int], Peer] = {}
        self._peer_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._life = Lifecycle(self.node_id)
        self._port = 0
        self._started_at = 0.0
        self.max_arrivals = 100_000

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> TensorNode:
        self._outer = trio.open_nursery()
        nursery = await self._outer.__aenter__()
        try:
            await nursery.start(self.run)
        except BaseException:
            await self._outer.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The body's own exception propagates unchanged (not wrapped in an ExceptionGroup):
        # the node's nursery only ever held the node's tasks, which shutdown() stops.
        self.shutdown()
        await self._outer.__aexit__(None, None, None)

    async def start(self, nursery: trio.Nursery) -> TensorNode:
        """Start the node as a task of ``nursery``; returns once the listener is bound."""
        await nursery.start(self.run)
        return self

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`shutdown` (or cancellation). Signals readiness once listening."""
        self._life.fire(Event.START)
        listeners: list[trio.SocketListener] = []
        started = False
        try:
            listeners = await open_listeners(self.settings.listen)
            self._port = listeners[0].socket.getsockname()[1]
            if self._life.state is State.STARTING:  # not shut down while binding
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self._sweep_partials)
                    if self._quic is not None:
                        await nursery.start(self._quic.run)
                    await nursery.start(self._serve, listeners, nursery)
                    if self._life.state is State.STARTING:
                        self._life.fire(Event.STARTED)
                        started = True
                        self._started_at = time.monotonic()
                        log.debug("node %s listening on %s", self.node_id, self.addr)
                        task_status.started()
            if not started:
                raise NodeClosed(f"node {self.node_id} was shut down while it started")
        finally:
            self._life.fire(Event.STOPPED)
            self._nursery = None
            self._arrived.set()
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
                # Receives that stopped midway: their progress was saved when they stopped.
                partials, self._partials = self._partials, {}
                for partial in partials.values():
                    await partial.sink.close()

    async def _sweep_partials(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Report what a previous run left to resume, then drop abandoned partial receives
        (untouched for ``transfer.partial_ttl_seconds``) on a timer - an idle node too frees
        the space they hold - and, with a store, their files."""
        store = self.store
        if store is not None:
            found = await trio.to_thread.run_sync(store.partials)
            for p in found:
                log.info(
                    "partial receive %s of %r: %d of %d bytes on disk, resumable when its "
                    "sender retries",
                    p.key,
                    p.meta.name,
                    p.bytes_have,
                    p.meta.nbytes,
                )
        task_status.started()
        ttl = self.settings.transfer.partial_ttl_seconds
        while True:
            try:
                self._expire_partials()  # closes expired ones, so the store's sweep removes them
                if store is not None:
                    await trio.to_thread.run_sync(store.expire_partials, ttl)
            except Exception as exc:  # a bug: logged and counted; the next sweep tries again
                report_unexpected(log, "peer", "the sweep of partial receives", exc)
            await trio.sleep(min(SWEEP_INTERVAL, max(ttl / 2, 0.05)))

    async def _run_job(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a transfer in the caller's task, under a scope that shutdown() cancels."""
        self._check_running()
        scope = trio.CancelScope()
        self._jobs.add(scope)
        self._busy += 1
        try:
            with scope:
                return await fn()
        finally:
            self._jobs.discard(scope)
            self._idle_if_done()
        raise NodeClosed(f"node {self.node_id} shut down during the transfer")

    def _idle_if_done(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._quiet.set()
            self._quiet = trio.Event()

    @property
    def transfers_in_flight(self) -> int:
        """Sends, pulls and receives running now."""
        return self._busy

    async def drain(self, grace: float) -> bool:
        """Stop accepting connections, wait up to ``grace`` s for the transfers in flight to
        finish, then shut down. Returns whether everything finished in time."""
        self._draining = True
        self._accepting.cancel()
        with trio.move_on_after(grace):
            while self._busy:
                await self._quiet.wait()
        drained = not self._busy
        self.shutdown()
        return drained

    def shutdown(self) -> None:
        """Stop the node: in-flight transfers are cancelled, later calls raise NodeClosed."""
        self._life.fire(Event.SHUTDOWN)
        for scope in self._jobs:
            scope.cancel()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    @property
    def state(self) -> State:
        """Where the node is in its lifecycle (:mod:`tensord.lifecycle`)."""
        return self._life.state

    @property
    def running(self) -> bool:
        return self._life.state is State.RUNNING

    def _check_running(self) -> None:
        if self._life.state is not State.RUNNING:
            raise NodeClosed(
                f"node {self.node_id} is not running (state: {self._life.state.value}); "
                "start it with `async with node:` and call it before shutdown()"
            )

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def addr(self) -> str:
        """This node's ticket, ``tensord://<node-id>@host:port``, for peers to dial."""
        host = self.settings.listen.host
        if host in ("0.0.0.0", "::"):
            me = self.settings.node(self.node_id)
            host = me.addr.host if me is not None else socket.gethostname()
        return PeerAddress(host, self._port, self.node_id).ticket()

    # -- local tensors -----------------------------------------------------------------------

    def put_tensor(
        self,
        name: str,
        array: np.ndarray[Any, Any],
        *,
        requires_grad: bool = False,
        dtype: str | None = None,
    ) -> None:
        """Make a tensor available to peers' pulls (and, with a store, keep it on disk)."""
        meta = _meta_of(name, array, requires_grad, dtype)
        if self.store is not None:
            self.store.put(name, array, requires_grad=requires_grad, dtype=meta.dtype)
        else:
            self._tensors[name] = _contiguous(array)

    def get_tensor(self, name: str) -> np.ndarray[Any, Any]:
        """A tensor held by this node (received or put); from a store, memory-mapped read-only.
        Raises :class:`TensorNotFound`."""
        if self.store is not None:
            return self.store.load(name)
        try:
            return self._tensors[name]
        except KeyError:
            raise TensorNotFound(f"no tensor named {name!r} on node {self.node_id}") from None

    def tensor_info(self, name: str) -> TensorInfo:
        """A held tensor's metadata (wire dtype, shape, size, sender, time stored)."""
        if self.store is not None:
            return self.store.meta(name)
        return TensorInfo.of(_meta_of(name, self.get_tensor(name)), "", 0.0)

    def tensors(self) -> list[TensorInfo]:
        """Every tensor this node holds, sorted by name."""
        if self.store is not None:
            return self.store.list()
        return [self.tensor_info(n) for n in sorted(self._tensors)]

    def delete_tensor(self, name: str) -> None:
        if self.store is not None:
            self.store.delete(name)
        elif self._tensors.pop(name, None) is None:
            raise TensorNotFound(f"no tensor named {name!r} on node {self.node_id}")

    def tensor_names(self) -> list[str]:
        return [i.name for i in self.tensors()]

    async def receive_tensor(self) -> Arrival:
        """The next tensor that arrived from a peer (waits for one)."""
        while not self._arrivals:
            self._check_running()
            await self._arrived.wait()
        return self._arrivals.popleft()

    # -- pool --------------------------------------------------------------------------------

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

    def reconfigure(self, settings: Settings) -> list[str]:
        """Adopt a reloaded configuration: peers, protocol, pool and transfer settings.

        The node id and listen address cannot change while running (returned as warnings).
        Connections to peers that left the cluster are closed; those to others are untouched.
        """
        warnings = []
        if settings.node_id != self.node_id:
            warnings.append(f"node id change {self.node_id} -> {settings.node_id} needs a restart")
        if settings.listen != self.settings.listen:
            warnings.append(f"listen address change to {settings.listen} needs a restart")
        keep = {(n.addr.host, n.addr.port) for n in settings.nodes}
        for key, peer in list(self._peers.items()):
            if peer.node_id is not None and self.settings.node(peer.node_id) and key not in keep:
                peer.close()
                del self._peers[key]
        self.settings = replace(settings, node_id=self.node_id, listen=self.settings.listen)
        self._addresses.clear()
        return warnings

    def _next_id(self) -> str:
        """A transfer id: a random per-node prefix and a counter (no syscall per transfer)."""
        self._xid_counter += 1
        return f"{self._xid_prefix}{self._xid_counter & 0xFFFFFFFF:08x}"

    def _resolve(self, peer: str | PeerAddress) -> PeerAddress:
        if isinstance(peer, PeerAddress):
            return peer
        addr = self._addresses.get(peer)
        if addr is None:
            addr = resolve_peer(self.settings, peer)
            if len(self._addresses) < 4096:
                self._addresses[peer] = addr
        return addr

    async def _peer(self, addr: PeerAddress) -> Peer:
        key = (addr.host, addr.port)
        peer = self._peers.get(key)
        if peer is not None and peer.running:
            return peer  # the common case: no lock, no checkpoint
        async with self._peer_lock:
            peer = self._peers.get(key)
            if peer is None or not peer.running:
                self._check_running()
                assert self._nursery is not None
                pool = PeerPool(
                    lambda: self._dial(addr),
                    max_connections=(self.settings.pool.max_connections),
                    max_idle=self.settings.pool.max_idle_seconds,
                )
                peer = Peer(addr, pool)
                await self._nursery.start(peer.run)
                self._peers[key] = peer
            return peer

    def _transport_for(self, addr: PeerAddress) -> str:
        """QUIC for a peer whose cluster-file entry says so; for an address that is in no
        entry, this node's own transport."""
        entry = self.settings.node(addr.node_id) if addr.node_id is not None else None
        return entry.transport if entry is not None else self.settings.transport

    async def _dial_any(self, addr: PeerAddress) -> Connection:
        t = self.settings.transfer
        if self._quic is not None and self._transport_for(addr) == "quic":
            try:
                return await dial_quic(
                    addr.hostport,
                    self._hello,
                    self._decoder,
                    connect_timeout=t.connect_timeout,
                    key=self.security.key,
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
            security=self.security,
        )

    async def _dial(self, addr: PeerAddress) -> Connection:
        try:
            conn = await self._dial_any(addr)
        except AuthenticationFailed as exc:
            log.warning("peer %s refused: %s", addr, exc)
            self.events.publish(PeerEvent(str(addr), "connect_failed", str(exc)))
            raise
        except (PeerUnreachable, ProtocolError) as exc:
            self.events.publish(PeerEvent(str(addr), "connect_failed", str(exc)))
            if isinstance(exc, ProtocolError) and exc.code in ("version", "bad_protocol"):
                # Retrying cannot make two incompatible peers compatible.
                raise TransferFailed(f"{addr}: {exc}", code="incompatible") from None
            raise
        if addr.node_id is not None and conn.peer_id != addr.node_id:
            await conn.aclose()
            raise BadAddress(f"{addr.hostport} is node {conn.peer_id!r}, not {addr.node_id!r}")
        self.events.publish(PeerEvent(conn.peer_id, "connected"))
        return conn

    def _decoder(self) -> FrameDecoder:
        t = self.settings.transfer
        return FrameDecoder(
            max_header=t.max_header_bytes,
            max_payload=MAX_CHUNK_SIZE,
            max_tensor_bytes=t.max_tensor_bytes,
        )

    # -- sending -----------------------------------------------------------------------------

    async def send_tensor(
        self,
        peer: str | PeerAddress,
        name: str,
        array: np.ndarray[Any, Any],
        *,
        requires_grad: bool = False,
        dtype: str | None = None,
    ) -> TransferResult:
        """Send ``array`` as ``name`` to ``peer`` (node id, ticket or host:port).

        Returns once the peer confirmed it verified and stored the whole tensor. Retries with
        exponential backoff; a retry resumes from the peer's first missing chunk.
        """
        self._check_running()
        addr = self._resolve(peer)
        array = _contiguous(array)
        meta = _meta_of(name, array, requires_grad, dtype)
        if meta.nbytes > self.settings.transfer.max_tensor_bytes:
            limit = self.settings.transfer.max_tensor_bytes
            raise BadTensor(
                f"tensor {name!r} is {meta.nbytes} bytes, over the limit of {limit} "
                "(transfer.max_tensor_bytes)"
            )
        p = await self._peer(addr)
        return await self._run_job(lambda: self._send_job(p, meta, flat_bytes(array)))

    async def _send_job(self, peer: Peer, meta: TensorMeta, data: memoryview) -> TransferResult:
        proto = self.settings.tensor_protocol
        t = self.settings.transfer
        xid = self._next_id()
        xfer: SendTransfer | None = None
        started = time.perf_counter()
        retries = 0
        legacy = False
        connected = False

        def progress(done: int) -> None:
            if self.events.active:
                self._publish_transfer("send", xid, meta, peer.name, "progress", done, retries)

        self._publish_transfer("send", xid, meta, peer.name, "started", 0)
        # The retry budget counts consecutive attempts that moved nothing: an attempt that got
        # chunks acknowledged before it failed (a flaky link, a restarted receiver) starts the
        # count again, so a long transfer is not failed by interruptions it keeps surviving.
        stalled = 0
        transport = "tcp"
        try:
            while True:
                acked_before = xfer.bytes_acked if xfer is not None else 0
                try:
                    async with peer.pool.connection() as conn:
                        connected = True
                        transport = _transport_of(conn)
                        agr = conn.agreement
                        if not agr.chunked:
                            legacy = True
                            await send_legacy(conn, meta, data, io_timeout=t.io_timeout)
                        else:
                            chunk = self._chunk_size(meta, agr)
                            resume = xfer is not None and agr.resume
                            if xfer is None or xfer.crc != agr.crc or xfer.chunk_size != chunk:
                                xfer = self._new_send(xid, meta, data, agr)
                                resume = False
                            await send_chunked(
                                conn,
                                xfer,
                                resume=resume,
                                io_timeout=t.io_timeout,
                                progress=progress,
                            )
                    break
                except TransferFailed as exc:
                    self._transfer_failed(xid, meta, peer, retries, exc)
                    raise
                except RETRIABLE as exc:
                    retries += 1
                    progressed = xfer is not None and xfer.bytes_acked > acked_before
                    stalled = 0 if progressed else stalled + 1
                    if stalled > proto.max_retries or not proto.max_retries:
                        err: TensorError
                        if not connected and isinstance(exc, PeerUnreachable):
                            err = PeerUnreachable(
                                f"cannot reach peer {peer.name} after {retries} attempts: {exc}"
                            )
                        else:
                            err = TransferFailed(
                                f"sending {meta.name!r} to {peer.name} failed after "
                                f"{retries} attempts: {_why(exc)}"
                            )
                        self._transfer_failed(xid, meta, peer, retries, err)
                        raise err from None
                    delay = retry_backoff(proto.retry_base_delay).delay(stalled)
                    log.info(
                        "tensor transfer %s: send %r to %s: attempt %d failed (%s); "
                        "retrying in %.2f s",
                        xid,
                        meta.name,
                        peer.name,
                        retries,
                        _why(exc),
                        delay,
                    )
                    self._publish_transfer(
                        "send",
                        xid,
                        meta,
                        peer.name,
                        "retry",
                        xfer.bytes_acked if xfer else 0,
                        retries,
                        _why(exc),
                    )
                    await trio.sleep(delay)
        except TensorError:
            raise  # published where it was raised (_transfer_failed)
        except BaseException as exc:
            # The caller went away (a CLI's Ctrl-C, a shutdown), or something unexpected: say
            # so, so that nobody watching the events stream waits for this transfer forever.
            # (A cancellation may arrive wrapped in an exception group from a nursery inside.)
            self._publish_transfer(
                "send",
                xid,
                meta,
                peer.name,
                "failed",
                xfer.bytes_acked if xfer else 0,
                retries,
                "cancelled" if _only_cancelled(exc) else _why(exc),
            )
            raise
        seconds = time.perf_counter() - started
        stats = xfer.stats if xfer is not None and not legacy else None
        result = TransferResult(
            xid,
            meta.name,
            peer.name,
            meta.nbytes,
            seconds,
            retries,
            bytes_sent=stats.bytes_sent if stats else meta.nbytes,
            bytes_resent=stats.bytes_resent if stats else 0,
            chunks_compressed=(
                xfer.compressor.compressed_chunks if xfer is not None and xfer.compressor else 0
            ),
            nacks=stats.nacks if stats else 0,
            legacy=legacy,
            transport=transport,
        )
        log.info(
            "tensor transfer %s: sent %r to %s: %d bytes in %.3f s (%.1f MB/s), %d retries%s",
            xid,
            meta.name,
            peer.name,
            meta.nbytes,
            seconds,
            result.rate / 1e6,
            retries,
            " (legacy mode)" if legacy else "",
        )
        self._publish_transfer("send", xid, meta, peer.name, "done", meta.nbytes, retries)
        return result

    def _transfer_failed(
        self, xid: str, meta: TensorMeta, peer: Peer, retries: int, exc: Exception
    ) -> None:
        log.warning("tensor transfer %s: %r with %s failed: %s", xid, meta.name, peer.name, exc)
        self._publish_transfer("send", xid, meta, peer.name, "failed", 0, retries, str(exc))

    # -- pulling -----------------------------------------------------------------------------

    async def pull_tensor(
        self, peer: str | PeerAddress, name: str, *, store_as: str | None = None
    ) -> np.ndarray[Any, Any]:
        """Fetch tensor ``name`` from ``peer``. Raises :class:`TensorNotFound` if it has none.

        A node with a store keeps the tensor (as ``store_as``, default ``name``) and returns it
        memory-mapped; a node without one returns it in memory and keeps it only if
        ``store_as`` is given.
        """
        self._check_running()
        for n in (name, store_as):
            if n is not None:
                checked_name(n)
        addr = self._resolve(peer)
        p = await self._peer(addr)
        array = await self._run_job(lambda: self._pull_job(p, name, store_as))
        if self.store is None and store_as is not None:
            self._tensors[store_as] = array
        return array

    async def send_stored(
        self, peer: str | PeerAddress, name: str, *, as_name: str | None = None
    ) -> TransferResult:
        """Send a tensor this node holds to ``peer`` (as ``as_name``, default ``name``)."""
        meta, array = self._stored(name)
        return await self.send_tensor(
            peer,
            as_name or name,
            array,
            requires_grad=meta.requires_grad,
            dtype=meta.dtype,
        )

    async def ping(self, peer: str | PeerAddress) -> float:
        """Round-trip time to ``peer`` in seconds, over a pooled connection (dialled if none).

        Raises :class:`PeerUnreachable` if the peer cannot be reached.
        """
        self._check_running()
        p = await self._peer(self._resolve(peer))

        async def job() -> float:
            self._xid_counter += 1
            seq = self._xid_counter
            async with p.pool.connection() as conn:
                started = time.perf_counter()
                await conn.stream.send(Ping(seq))
                with trio.fail_after(self.settings.transfer.io_timeout):
                    reply = await conn.stream.receive()
                if not isinstance(reply, Pong) or reply.seq != seq:
                    raise ProtocolError(f"expected pong {seq}, got {reply!r}")
                return time.perf_counter() - started

        return await self._run_job(job)

    async def _pull_job(self, peer: Peer, name: str, store_as: str | None) -> np.ndarray[Any, Any]:
        proto = self.settings.tensor_protocol
        t = self.settings.transfer
        retries = 0
        missing = False
        kept = _PulledPartial()  # what an interrupted attempt received, for the next one
        stalled = 0  # consecutive attempts that received nothing (the retry budget, as sends)
        had = 0
        try:
            while True:
                if missing:
                    raise TensorNotFound(f"peer {peer.name} has no tensor {name!r}")
                try:
                    async with peer.pool.connection() as conn:
                        if "pull" not in conn.agreement.features:
                            raise TransferFailed(
                                f"peer {peer.name} does not support pull", code="unsupported"
                            )
                        resume = kept.xfer.id if kept.xfer is not None else None
                        had = kept.xfer.bytes_have if kept.xfer is not None else 0
                        await conn.stream.send(Request(name, resume))
                        with trio.fail_after(t.io_timeout):
                            first = await conn.stream.receive()
                        if isinstance(first, Error):
                            if first.code == "not_found":
                                missing = True  # raised above: the connection goes back to the pool
                                continue
                            if first.code == "bad_name":  # the same name would fail again
                                raise BadTensor(f"peer {peer.name}: {first.message}")
                            raise ProtocolError(
                                f"peer {peer.name}: {first.message}", code=first.code
                            )
                        if isinstance(first, Begin | Legacy):
                            if first.meta.name != name:
                                raise ProtocolError(f"asked for {name!r}, got {first.meta.name!r}")
                            return await self._receive_pulled(conn, first, peer, store_as, kept)
                        raise ProtocolError(f"unexpected {type(first).__name__} in reply to a pull")
                except (TensorNotFound, TransferFailed, BadTensor):
                    raise
                except RETRIABLE as exc:
                    if isinstance(exc, ProtocolError) and exc.code == "too_large":
                        # Chunking beyond the bounds (the owner's, or its refusal of ours):
                        # the same tensor would fail the same way again.
                        raise TransferFailed(
                            f"pulling {name!r} from {peer.name}: {exc}", code="too_large"
                        ) from None
                    retries += 1
                    progressed = kept.xfer is not None and kept.xfer.bytes_have > had
                    stalled = 0 if progressed else stalled + 1
                    if stalled > proto.max_retries or not proto.max_retries:
                        raise TransferFailed(
                            f"pulling {name!r} from {peer.name} failed after "
                            f"{retries} attempts: {_why(exc)}"
                        ) from None
                    log.info(
                        "tensor transfer: pull %r from %s: attempt %d failed (%s)%s",
                        name,
                        peer.name,
                        retries,
                        _why(exc),
                        f"; resuming at {kept.xfer.bytes_have} bytes" if kept.xfer else "",
                    )
                    await retry_backoff(proto.retry_base_delay).sleep(stalled)
        finally:
            with trio.CancelScope(shield=True):
                await kept.discard()

    async def _receive_pulled(
        self,
        conn: Connection,
        first: Begin | Legacy,
        peer: Peer,
        store_as: str | None,
        kept: _PulledPartial,
    ) -> np.ndarray[Any, Any]:
        """Receive a pulled tensor into a sink; with a store it is committed before returning.
        What an interrupted attempt received stays in ``kept`` for the next attempt to resume."""
        t = self.settings.transfer
        xid = first.id if isinstance(first, Begin) else self._next_id()
        arrays: list[np.ndarray[Any, Any]] = []
        if isinstance(first, Begin) and kept.xfer is not None and kept.xfer.matches(first):
            xfer, sink = kept.xfer, kept.sink
            assert sink is not None
            replies = xfer.rebegin(first, lz4=conn.agreement.lz4)
        else:
            await kept.discard()  # the peer started over (or never was asked to resume)
            key = f"pull/{peer.name}/{secrets.token_hex(8)}"
            if isinstance(first, Begin):
                xfer, sink = self._new_receive(conn, first, key, store_as)
                replies = [xfer.accept()] if first.resume else []
                kept.xfer, kept.sink = xfer, sink
            else:
                sink = self._sink(first.meta, key, None, store_as)
                replies = []
        if replies:
            await conn.stream.send(*replies)
        meta = first.meta

        def progress(done: int) -> None:
            if self.events.active:
                self._publish_transfer("receive", xid, meta, peer.name, "progress", done)

        async def complete() -> None:
            arrays.append(await sink.commit(peer.name))

        self._publish_transfer(
            "receive", xid, meta, peer.name, "started", kept.xfer.bytes_have if kept.xfer else 0
        )
        try:
            if isinstance(first, Begin):
                await receive_chunked(
                    conn, xfer, io_timeout=t.io_timeout, progress=progress, on_complete=complete
                )
            elif not await receive_legacy(
                conn, first, sink.buffer, io_timeout=t.io_timeout, on_complete=complete
            ):
                raise ProtocolError("legacy tensor failed its checksum")
        finally:
            if arrays:
                kept.xfer = kept.sink = None  # committed: nothing left to discard
            else:
                have = kept.xfer.bytes_have if kept.xfer else 0
                self._publish_transfer("receive", xid, meta, peer.name, "interrupted", have)
                if not isinstance(first, Begin):
                    with trio.CancelScope(shield=True):
                        await sink.discard()
        self._publish_transfer("receive", xid, meta, peer.name, "done", meta.nbytes)
        return arrays[0]

    # -- serving -----------------------------------------------------------------------------

    async def _serve(
        self,
        listeners: list[trio.SocketListener],
        handlers: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Connections are handled in the node's nursery, not under the accept loop, so that
        # drain() can stop accepting while the transfers in flight carry on.
        t = self.settings.transfer
        with self._accepting:
            async with trio.open_nursery() as accept:
                if self.settings.transport == "quic":
                    # QUIC on the UDP port of the same number, as well as TCP: a peer without
                    # QUIC still reaches this node.
                    await accept.start(
                        partial(
                            serve_quic,
                            HostPort(self.settings.listen.host, self._port),
                            self._hello,
                            self._decoder,
                            self._serve_connection,
                            handshake_timeout=t.handshake_timeout,
                            handler_nursery=handlers,
                            key=self.security.key,
                            tls=self.settings.security.tls,
                            max_connections=t.max_connections,
                            max_unauthenticated=t.max_unauthenticated,
                            tuning=self._quic_tuning,
                            stats=self.quic_stats,
                        )
                    )
                accept.start_soon(
                    partial(
                        serve,
                        listeners,
                        self._hello,
                        self._decoder,
                        self._serve_connection,
                        handshake_timeout=t.handshake_timeout,
                        handler_nursery=handlers,
                        security=self.security,
                        max_connections=t.max_connections,
                        max_unauthenticated=t.max_unauthenticated,
                    )
                )
                task_status.started()

    async def _serve_connection(self, conn: Connection) -> None:
        """One inbound connection: transfers, pulls and pings, one after another."""
        idle = max(self.settings.pool.max_idle_seconds, 30.0) + 30.0
        limit = self.settings.transfer.max_peer_connections
        if self._inbound[conn.peer_id] >= limit:
            why = (
                f"peer {conn.peer_id} already has {limit} connections to this node "
                "(transfer.max_peer_connections)"
            )
            log.warning("peer connection refused: %s", why)
            await conn.send_error("busy", why)
            return
        self._inbound[conn.peer_id] += 1
        try:
            await self._serve_messages(conn, idle)
        finally:
            self._inbound[conn.peer_id] -= 1
            if not self._inbound[conn.peer_id]:
                del self._inbound[conn.peer_id]

    async def _serve_messages(self, conn: Connection, idle: float) -> None:
        """The connection's error boundary: whatever a peer's messages make us do, the worst
        outcome is that this connection ends with a logged, typed error (and an ``error`` frame
        where one can still be sent). An exception nobody planned for is a bug: logged with its
        traceback, counted, and it closes this connection only - never the node."""
        msg: object = None
        try:
            while True:
                msg = None
                with trio.move_on_after(idle):
                    msg = await conn.stream.receive()
                if msg is None:
                    return
                if isinstance(msg, Begin):
                    await self._receive(conn, msg)
                elif isinstance(msg, Legacy):
                    await self._receive_legacy(conn, msg)
                elif isinstance(msg, Request):
                    await self._serve_pull(conn, msg)
                elif isinstance(msg, Ping):
                    await conn.stream.send(Pong(msg.seq))
                elif isinstance(msg, Error) and msg.code == "auth":
                    log.warning("peer %s refused this node: %s", conn.peer_id, msg.message)
                    return
                elif isinstance(msg, Error):
                    log.info(
                        "peer %s reported %s: %s",
                        conn.peer_id,
                        msg.code or "an error",
                        msg.message or "(no reason given)",
                    )
                    return
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} outside a transfer")
        except ProtocolError as exc:
            log.warning("peer %s: protocol error, closing the connection: %s", conn.peer_id, exc)
            await conn.send_error(exc.code, str(exc))
        except TransferFailed as exc:
            log.warning("peer %s: %s", conn.peer_id, exc)
        except (
            ConnectionClosed,
            OSError,
            trio.BrokenResourceError,
            TimeoutError,
            trio.TooSlowError,
        ) as exc:
            log.info("peer %s: connection lost: %s", conn.peer_id, _why(exc))
        except TensorError as exc:
            # Typed but not expected here (a store refusing a name, say): the peer hears why.
            what = _kind(msg)
            log.warning("peer %s: %s refused, closing the connection: %s", conn.peer_id, what, exc)
            await conn.send_error(getattr(exc, "code", "refused"), str(exc)[:512])
        except Exception as exc:
            report_unexpected(log, "peer", f"peer {conn.peer_id}, {_kind(msg)}", exc)
            await conn.send_error("internal", f"internal error while handling {_kind(msg)}")

    def _sink(
        self, meta: TensorMeta, key: str, chunk_size: int | None, store_as: str | None = None
    ) -> Sink:
        """Where a receive writes: a partial file in the store, or a new array in memory."""
        if self.store is not None:
            return StoreSink(self.store, meta, key, chunk_size, store_as=store_as)
        return MemorySink(meta)

    def _new_receive(
        self, conn: Connection, begin: Begin, key: str, store_as: str | None = None
    ) -> tuple[ReceiveTransfer, Sink]:
        sink = self._sink(begin.meta, key, begin.chunk_size, store_as)
        try:
            xfer = ReceiveTransfer(
                begin,
                sink.buffer,
                sender=conn.peer_id,
                crc=conn.agreement.crc,
                lz4=conn.agreement.lz4,
                max_chunk=MAX_CHUNK_SIZE,
            )
        except BaseException:
            # Nothing arrived: free the space at once (discard of a fresh partial never waits).
            if isinstance(sink, StoreSink):
                sink.partial.discard()
            raise
        sink.restore(xfer)
        return xfer, sink

    def _remember_completed(
        self, key: tuple[str, str], begin: Begin, xfer: ReceiveTransfer
    ) -> None:
        ttl = self.settings.transfer.partial_ttl_seconds
        mine = self._completed.setdefault(key[0], {})
        mine[key[1]] = _Completed(
            begin.meta, begin.chunk_size, xfer.nchunks, xfer.end_crc, trio.current_time() + ttl
        )
        # Bounded like the partials: the oldest records of this peer go first.
        while len(mine) > self.settings.transfer.max_peer_transfers:
            del mine[next(iter(mine))]

    async def _confirm_again(self, conn: Connection, begin: Begin, done: _Completed) -> None:
        """The sender resumes a transfer we already committed: every chunk is here; answer its
        ``End`` with ``Stored`` again."""
        log.info(
            "tensor transfer %s: %r from %s was already stored; confirming again",
            begin.id,
            begin.meta.name,
            conn.peer_id,
        )
        await conn.stream.send(Accept(begin.id, ((0, done.nchunks),) if done.nchunks else ()))
        with trio.fail_after(self.settings.transfer.io_timeout):
            while True:
                msg = await conn.stream.receive()
                if isinstance(msg, Chunk) and msg.id == begin.id:
                    await conn.stream.discard_payload()  # not asked for; harmless
                    continue
                if not isinstance(msg, End) or msg.id != begin.id:
                    raise ProtocolError(f"expected end of {begin.id}, got {type(msg).__name__}")
                if msg.crc is not None and done.crc is not None and msg.crc != done.crc:
                    await conn.send_error("checksum", "the tensor differs from the one stored")
                    raise ProtocolError(f"transfer {begin.id}: end crc differs from the stored")
                await conn.stream.send(Stored(begin.id))
                return

    async def _drop_superseded(self, peer: str, name: str, key: tuple[str, str]) -> None:
        """A new transfer of tensor ``name`` from ``peer`` (a restarted sender uses new ids):
        its older partials of that tensor will never be resumed; free their space now."""
        for old in [
            k
            for k, p in self._partials.items()
            if k[0] == peer and k != key and p.xfer.meta.name == name
        ]:
            partial = self._partials.pop(old)
            log.info(
                "tensor transfer %s: dropping the partial of %r from %s: it began again",
                old[1],
                name,
                peer,
            )
            await partial.sink.discard()

    async def _new_receive_freeing(
        self, conn: Connection, begin: Begin
    ) -> tuple[ReceiveTransfer, Sink]:
        """:meth:`_new_receive`; when the store is too full, first free what the same sender
        left on disk of the same tensor before this process started (the partials of this
        process were freed by :meth:`_drop_superseded`), then try once more. The directory is
        read only then, not on every receive."""
        key = f"{conn.peer_id}/{begin.id}"
        try:
            return self._new_receive(conn, begin, key)
        except TransferFailed as exc:
            if exc.code != "quota" or self.store is None:
                raise
            freed = await trio.to_thread.run_sync(
                self.store.discard_partials, f"{conn.peer_id}/", begin.meta.name, key
            )
            if not freed:
                raise
        return self._new_receive(conn, begin, key)

    def _check_peer_budget(self, peer: str, nbytes: int) -> None:
        """Refuse a new receive beyond what one peer may hold of this node: transfers in
        flight, and tensor bytes of those and of the partials kept for it (``busy``: the
        sender backs off and retries; other peers are not affected)."""
        t = self.settings.transfer
        active = [a for (p, _), a in self._active.items() if p == peer]
        if len(active) >= t.max_peer_transfers:
            raise TransferFailed(
                f"peer {peer} already has {len(active)} transfers in flight to this node "
                f"(transfer.max_peer_transfers = {t.max_peer_transfers})",
                code="busy",
            )
        pending = sum(a.nbytes for a in active) + sum(
            part.xfer.meta.nbytes for (p, _), part in self._partials.items() if p == peer
        )
        if pending + nbytes > t.max_peer_pending_bytes:
            raise TransferFailed(
                f"peer {peer} would hold {pending + nbytes} bytes of transfers in flight and "
                f"partials on this node (transfer.max_peer_pending_bytes = "
                f"{t.max_peer_pending_bytes})",
                code="busy",
            )

    def _evict_partials(self, peer: str) -> None:
        """Keep at most ``max_peer_transfers`` partials per peer: the oldest go first."""
        mine = [k for k in self._partials if k[0] == peer]
        for key in mine[: max(0, len(mine) - self.settings.transfer.max_peer_transfers)]:
            partial = self._partials.pop(key)
            log.info("tensor transfer %s: dropping the partial from %s (too many)", key[1], peer)
            if isinstance(partial.sink, StoreSink):
                partial.sink.partial.close()  # on disk until the sweep, like an expired one

    def _expire_partials(self) -> None:
        now = trio.current_time()
        for peer, mine in list(self._completed.items()):
            for xid in [x for x, c in mine.items() if c.expires < now]:
                del mine[xid]
            if not mine:
                del self._completed[peer]
        for key in [k for k, p in self._partials.items() if p.expires < now]:
            partial = self._partials.pop(key)
            if isinstance(partial.sink, StoreSink):
                # Kept on disk (the sweep removes it later if nobody resumes it).
                partial.sink.partial.close()

    async def _receive(self, conn: Connection, begin: Begin) -> None:
        # (Expiry of partials and completed records runs on the sweep's timer, not here.)
        key = (conn.peer_id, begin.id)
        done = self._completed.get(conn.peer_id, {}).get(begin.id)
        if done is not None and begin.resume and done.matches(begin):
            await self._confirm_again(conn, begin, done)
            return
        stale = self._active.get(key)
        if stale is not None:
            # The sender gave up on an older connection we still think is alive (a cut that
            # only it noticed): stop that receive so its progress is kept as the partial.
            stale.scope.cancel()
            await stale.released.wait()
        meta = begin.meta
        partial = self._partials.pop(key, None)
        if partial is not None and partial.xfer.matches(begin):
            xfer, sink = partial.xfer, partial.sink
            replies = xfer.rebegin(begin, lz4=conn.agreement.lz4)
            log.info(
                "tensor transfer %s: resuming %r from %s at %d of %d bytes",
                begin.id,
                meta.name,
                conn.peer_id,
                xfer.bytes_have,
                meta.nbytes,
            )
        else:
            if partial is not None:
                await partial.sink.discard()
            await self._drop_superseded(conn.peer_id, meta.name, key)
            try:
                self._check_peer_budget(conn.peer_id, meta.nbytes)
                xfer, sink = await self._new_receive_freeing(conn, begin)
            except TransferFailed as exc:
                log.warning("tensor transfer %s: refused %r: %s", begin.id, meta.name, exc)
                await conn.send_error(exc.code, str(exc), begin.id)
                raise
            replies = [xfer.accept()] if begin.resume else []
        if replies:
            await conn.stream.send(*replies)
        started = time.perf_counter()
        self._publish_transfer("receive", begin.id, meta, conn.peer_id, "started", xfer.bytes_have)

        def progress(done: int) -> None:
            if self.events.active:
                self._publish_transfer("receive", begin.id, meta, conn.peer_id, "progress", done)

        committed: list[bool] = []

        async def complete() -> None:
            array = await sink.commit(conn.peer_id)
            committed.append(True)
            self._arrive(meta.name, array, conn.peer_id)

        active = _Active(trio.CancelScope(), trio.Event(), meta.nbytes)
        checkpoints = trio.CancelScope()
        self._active[key] = active
        self._busy += 1
        try:
            with active.scope:
                if sink.persistent and self._nursery is not None:
                    self._nursery.start_soon(
                        self._checkpoints, sink, xfer, conn.peer_id, checkpoints
                    )
                try:
                    await receive_chunked(
                        conn,
                        xfer,
                        io_timeout=self.settings.transfer.io_timeout,
                        progress=progress,
                        on_complete=complete,
                    )
                except TransferFailed as exc:
                    if exc.code == "quota":  # the disk filled up while committing
                        await conn.send_error(exc.code, str(exc), begin.id)
                    raise
        finally:
            checkpoints.cancel()
            with trio.CancelScope(shield=True):
                if xfer.state is ReceiveState.RECEIVING and xfer.have_count:
                    # Persist what arrived (a drain, a cut): the sender's retry, from this
                    # process or after a restart, resumes from the first missing chunk.
                    try:
                        await sink.checkpoint(xfer)
                    except (OSError, ValueError) as exc:
                        log.warning("tensor transfer %s: cannot save progress: %s", begin.id, exc)
                    ttl = self.settings.transfer.partial_ttl_seconds
                    self._partials[key] = _Partial(xfer, sink, trio.current_time() + ttl)
                    self._evict_partials(conn.peer_id)
                elif not committed:
                    await sink.discard()
            if not committed:
                self._publish_transfer(
                    "receive", begin.id, meta, conn.peer_id, "interrupted", xfer.bytes_have
                )
            del self._active[key]
            active.released.set()
            self._idle_if_done()
        if active.scope.cancelled_caught:
            raise ConnectionClosed("superseded by the sender's resumed transfer")
        self._remember_completed(key, begin, xfer)
        seconds = time.perf_counter() - started
        self._publish_transfer("receive", begin.id, meta, conn.peer_id, "done", meta.nbytes)
        log.info(
            "tensor transfer %s: received %r from %s: %d bytes in %.3f s (%.1f MB/s)",
            begin.id,
            meta.name,
            conn.peer_id,
            meta.nbytes,
            seconds,
            meta.nbytes / max(seconds, 1e-9) / 1e6,
        )

    async def _checkpoints(
        self, sink: Sink, xfer: ReceiveTransfer, sender: str, scope: trio.CancelScope
    ) -> None:
        """Save a receive's progress every ``CHECKPOINT_INTERVAL`` while it runs (a task of the
        node's nursery, so that its failure cannot mix with the receive's own errors)."""
        with scope:
            while True:
                await trio.sleep(CHECKPOINT_INTERVAL)
                before = xfer.bytes_have
                try:
                    saved = await sink.checkpoint(xfer)
                except (OSError, ValueError) as exc:
                    # A full disk: the receive goes on; a restart would resume from earlier.
                    log.warning("tensor transfer %s: cannot save progress: %s", xfer.id, exc)
                    continue
                except Exception as exc:  # a bug: no more checkpoints for it; the node goes on
                    report_unexpected(log, "peer", f"checkpoints of transfer {xfer.id}", exc)
                    return
                if saved and not scope.cancel_called:  # never after the receive's last event
                    self._publish_transfer(
                        "receive", xfer.id, xfer.meta, sender, "checkpoint", before
                    )

    def _publish_transfer(
        self,
        direction: str,
        xid: str,
        meta: TensorMeta,
        peer: str,
        state: str,
        done: int,
        retries: int = 0,
        detail: str = "",
    ) -> None:
        """A :class:`TransferEvent` for the events stream (built only if someone listens)."""
        if self.events.active:
            self.events.publish(
                TransferEvent(
                    id=xid,
                    name=meta.name,
                    peer=peer,
                    direction=direction,
                    state=state,
                    bytes_done=done,
                    bytes_total=meta.nbytes,
                    retries=retries,
                    detail=detail,
                )
            )

    async def _receive_legacy(self, conn: Connection, msg: Legacy) -> None:
        sink = self._sink(msg.meta, f"{conn.peer_id}/legacy-{secrets.token_hex(8)}", None)
        committed: list[bool] = []

        async def complete() -> None:
            array = await sink.commit(conn.peer_id)
            committed.append(True)
            self._arrive(msg.meta.name, array, conn.peer_id)

        try:
            ok = await receive_legacy(
                conn,
                msg,
                sink.buffer,
                io_timeout=self.settings.transfer.io_timeout,
                on_complete=complete,
            )
        finally:
            if not committed:
                with trio.CancelScope(shield=True):
                    await sink.discard()
        if ok:
            log.info(
                "tensor transfer: received %r from %s in legacy mode: %d bytes",
                msg.meta.name,
                conn.peer_id,
                msg.meta.nbytes,
            )

    def _arrive(self, name: str, array: np.ndarray[Any, Any], sender: str) -> None:
        """A verified tensor, stored before the peer hears ``Stored``: announce it."""
        if self.store is None:
            self._tensors[name] = array
        self._arrivals.append(Arrival(name, array, sender))
        if len(self._arrivals) > self.max_arrivals:
            dropped = self._arrivals.popleft()
            log.warning(
                "arrival queue full: %r is stored but not queued for receive_tensor()", dropped.name
            )
        self._arrived.set()
        self._arrived = trio.Event()
        if self.events.active:
            self.events.publish(ArrivalEvent(name, sender, array.nbytes))

    async def _serve_pull(self, conn: Connection, req: Request) -> None:
        try:
            meta, array = self._stored(req.name)
        except (TensorNotFound, ProtocolError):
            await conn.stream.send(
                Error("not_found", f"no tensor named {req.name[:256]!r} on node {self.node_id}")
            )
            return
        except BadTensor as exc:  # the decoder checked the name; the store may still refuse it
            await conn.stream.send(Error("bad_name", str(exc)[:512]))
            return
        data = flat_bytes(array)
        t = self.settings.transfer
        agr = conn.agreement
        if not agr.chunked:
            await send_legacy(conn, meta, data, io_timeout=t.io_timeout)
            return
        # A puller retrying an interrupted pull names its transfer: send under that id with a
        # resuming Begin, and its Accept says which chunks it already has.
        resume = req.resume is not None and agr.resume
        xid = req.resume if resume and req.resume is not None else self._next_id()
        try:
            xfer = self._new_send(xid, meta, data, agr)
        except TransferFailed as exc:  # the puller's max chunk is too small for this tensor
            await conn.stream.send(Error(exc.code, str(exc)[:512]))
            return
        await send_chunked(conn, xfer, resume=resume, io_timeout=t.io_timeout)

    def _stored(self, name: str) -> tuple[TensorMeta, np.ndarray[Any, Any]]:
        """A held tensor with its wire metadata (a stored bf16 keeps its wire dtype)."""
        if self.store is not None:
            info = self.store.meta(name)
            return info.meta, self.store.load(name)
        array = self.get_tensor(name)
        return _meta_of(name, array), array

    def _chunk_size(self, meta: TensorMeta, agr: Agreement) -> int:
        """The configured chunk size, as the peer's Hello allows, within the protocol's bounds."""
        try:
            return chunk_size_for(
                meta.nbytes, self.settings.tensor_protocol.chunk_size, agr.peer_max_chunk
            )
        except ValueError as exc:
            raise TransferFailed(f"cannot send {meta.name!r}: {exc}", code="too_large") from None

    def _new_send(
        self, xid: str, meta: TensorMeta, data: memoryview, agr: Agreement
    ) -> SendTransfer:
        """A sender state machine for what this connection agreed (chunk size, crc, lz4)."""
        proto = self.settings.tensor_protocol
        chunk = self._chunk_size(meta, agr)
        comp = AdaptiveCompressor(
            enabled=agr.lz4 and proto.enable_compression, threshold=proto.compression_threshold
        )
        return SendTransfer(
            xid,
            meta,
            data,
            chunk_size=chunk,
            window=max(2, self.settings.transfer.window_bytes // chunk),
            crc=agr.crc,
            compressor=comp,
        )


def _contiguous(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The array itself if C-contiguous (no copy), else a contiguous copy. Keeps 0-d arrays 0-d."""
    array = np.asarray(array)
    return array if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(array.shape)


def _meta_of(
    name: str, array: np.ndarray[Any, Any], requires_grad: bool = False, dtype: str | None = None
) -> TensorMeta:
    try:
        return TensorMeta.of(name, array, requires_grad, dtype)
    except ProtocolError as exc:
        raise BadTensor(str(exc)) from None
    except TypeError as exc:
        raise BadTensor(f"tensor {name!r}: {exc}") from None


def _kind(msg: object) -> str:
    """A message as a log line names it: its type and the tensor it is about."""
    if msg is None:
        return "no message"
    meta = getattr(msg, "meta", None)
    name = meta.name if isinstance(meta, TensorMeta) else getattr(msg, "name", None)
    kind = type(msg).__name__.lower()
    return f"{kind} {name[:80]!r}" if isinstance(name, str) else kind


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


__all__ = ["Arrival", "Hello", "TensorNode", "TransferResult", "retry_backoff"]
