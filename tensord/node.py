"""``TensorNode``: send, pull and receive tensors over the chunk protocol.

This is the library's face: a node's construction, lifecycle and local tensors live here; the
transfer work lives in the modules it delegates to - :mod:`tensord.outbound` (sends and pulls,
one retry policy), :mod:`tensord.receiver` (the peer listener, and the partial and completed
receives it owns) and :mod:`tensord.peers` (dialing and connection pools).

A node owns one nursery. Under it run the peer listener (one task per inbound connection) and
one nursery per peer it talks to, holding that peer's background task (the connection pool's
idle reaper). A send or pull runs in the caller's task - no task is spawned per transfer, which
matters for small-tensor latency - inside a cancel scope the node owns: shutting the node down
cancels every transfer (nothing leaks, nothing hangs) and the caller gets ``NodeClosed``; a caller
that is cancelled cancels just its own transfer.
"""

from __future__ import annotations

import logging
import socket
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import trio

from .address import PeerAddress
from .buffers import ReceiveBuffers
from .cluster.chain import BroadcastResult, Chain
from .cluster.holdings import Holdings
from .cluster.remote_pull import PullHook
from .config import MAX_CHUNK_SIZE, Settings
from .destinations import Destinations
from .errors import BadTensor, NodeClosed, PeerUnreachable, ProtocolError, TensorNotFound
from .events import ArrivalEvent, EventBus
from .lifecycle import Event, Lifecycle, State
from .net.connection import Connection
from .net.quic import ListenerStats, QuicDialer, QuicTuning
from .net.security import PeerSecurity
from .net.stream import ConnectionClosed
from .net.tcp import open_listeners
from .outbound import Outbound, retry_backoff
from .peers import Dialer, Peers
from .receiver import CHECKPOINT_INTERVAL, SWEEP_INTERVAL, Receiver
from .results import Arrival, InFlight, TransferIds, TransferResult
from .sending import contiguous, meta_of
from .sink import check_destination, flat_bytes
from .store import TensorInfo, TensorStore, checked_name
from .wire.frames import FrameDecoder
from .wire.handshake import VERSIONS, local_features, make_hello
from .wire.messages import Hello, Ping, Pong
from .wire.meta import TensorMeta

log = logging.getLogger("tensord.transfer")
T = TypeVar("T")


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
        dialer: Dialer | None = None,
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
        #: The blobs this node serves to peers, and what peers announced (:mod:`.cluster`).
        self.holdings = Holdings.for_store(self.store, self.settings.downloads.piece_size)
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
            udp_offload=q.udp_offload,
        )
        self._quic: QuicDialer | None = QuicDialer(self._quic_tuning) if uses_quic else None
        #: What the QUIC listener admitted, refused and shed (when this node listens on QUIC).
        self.quic_stats = ListenerStats()
        self._tensors: dict[str, np.ndarray[Any, Any]] = {}
        self._arrivals: deque[Arrival] = deque()
        self._arrived = trio.Event()
        #: Freed receive memory reused by later arrivals (a node without a store).
        self.receive_buffers = ReceiveBuffers()
        self._destinations = Destinations(self._wake_receivers)
        self._jobs: set[trio.CancelScope] = set()
        self._in_flight = InFlight()
        self._ids = TransferIds()
        self._nursery: trio.Nursery | None = None
        self._peers = Peers(
            self.settings,
            hello=self._hello,
            decoder=self._decoder,
            security=self.security,
            events=self.events,
            quic=self._quic,
            nursery=self._running_nursery,
            dialer=dialer,
        )
        self._outbound = Outbound(
            self.settings,
            events=self.events,
            ids=self._ids,
            store=self.store,
            buffers=self.receive_buffers,
        )
        #: Chain broadcasts: this node's as their origin, and the forwarding of those it relays.
        self._chain = Chain(
            lambda: self.settings,
            node_id=self.node_id,
            peers=self._peers,
            outbound=self._outbound,
            events=self.events,
            ids=self._ids,
        )
        self._receiver = Receiver(
            self.settings,
            store=self.store,
            hello=self._hello,
            decoder=self._decoder,
            security=self.security,
            quic_tuning=self._quic_tuning,
            quic_stats=self.quic_stats,
            events=self.events,
            ids=self._ids,
            in_flight=self._in_flight,
            stored=self._stored,
            arrive=self._arrive,
            holdings=self.holdings,
            forward=self._chain.relay,
            buffers=self.receive_buffers,
            claim=self._destinations.claim if self.store is None else None,
            sweep_interval=SWEEP_INTERVAL,  # read now: bench/chaos.py sets it for one run
        )
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
                    await nursery.start(self._receiver.sweep)
                    if self._quic is not None:
                        await nursery.start(self._quic.run)
                    await nursery.start(self._receiver.serve, listeners, self._port, nursery)
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
                await self._receiver.close()

    async def _run_job(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a transfer in the caller's task, under a scope that shutdown() cancels."""
        self._check_running()
        scope = trio.CancelScope()
        self._jobs.add(scope)
        self._in_flight.enter()
        try:
            with scope:
                return await fn()
        finally:
            self._jobs.discard(scope)
            self._in_flight.leave()
        raise NodeClosed(f"node {self.node_id} shut down during the transfer")

    @property
    def transfers_in_flight(self) -> int:
        """Sends, pulls and receives running now."""
        return self._in_flight.count

    async def drain(self, grace: float) -> bool:
        """Stop accepting connections, wait up to ``grace`` s for the transfers in flight to
        finish, then shut down. Returns whether everything finished in time."""
        self._receiver.stop_accepting()
        with trio.move_on_after(grace):
            await self._in_flight.wait_quiet()
        drained = not self._in_flight.count
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
    def on_pull_request(self) -> PullHook | None:
        """What starts a model pull a peer asks for (``tensord pull-model --on``): the daemon
        installs its download manager's here; ``None`` (a library node) refuses them."""
        return self._receiver.on_pull_request

    @on_pull_request.setter
    def on_pull_request(self, hook: PullHook | None) -> None:
        self._receiver.on_pull_request = hook

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
        meta = meta_of(name, array, requires_grad, dtype)
        if self.store is not None:
            self.store.put(name, array, requires_grad=requires_grad, dtype=meta.dtype)
        else:
            self._tensors[name] = contiguous(array)

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
        return TensorInfo.of(meta_of(name, self.get_tensor(name)), "", 0.0)

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

    async def receive_tensor(self, *, into: np.ndarray[Any, Any] | None = None) -> Arrival:
        """The next tensor that arrived from a peer (waits for one).

        ``into``: a C-contiguous writable array of the tensor's shape and dtype to receive it
        into, so no new memory is touched (the arrival's ``array`` is ``into``). On a node
        without a store, a tensor whose ``Begin`` arrives while this call waits lands straight
        in it; one that arrived earlier, or a node with a store, is copied into it. A tensor
        that does not fit raises :class:`~tensord.errors.DestinationMismatch` before any byte
        is written into ``into`` and stays queued for the next call.
        """
        if into is None:
            while not self._arrivals:
                self._check_running()
                await self._arrived.wait()
            return self._arrivals.popleft()
        if self._arrivals or self.store is not None:
            return self._copy_arrival(await self.receive_tensor(), into)
        self._check_running()
        dest = self._destinations.add(into)
        try:
            while not dest.done:
                self._check_running()
                await self._arrived.wait()
        finally:
            self._destinations.remove(dest)
            if not dest.done:
                with trio.CancelScope(shield=True):
                    await dest.idle.wait()  # the receive writing into it has stopped
        if dest.error is not None:
            raise dest.error
        assert dest.result is not None
        return dest.result

    def _copy_arrival(self, arrival: Arrival, into: np.ndarray[Any, Any]) -> Arrival:
        try:
            check_destination(meta_of(arrival.name, arrival.array), into)
        except BaseException:
            self._arrivals.appendleft(arrival)  # still there for the next call
            raise
        np.copyto(into, arrival.array, casting="no")
        if self.store is None and self._tensors.get(arrival.name) is arrival.array:
            self._tensors[arrival.name] = into
        return arrival._replace(array=into)

    def _wake_receivers(self) -> None:
        self._arrived.set()
        self._arrived = trio.Event()

    # -- pool --------------------------------------------------------------------------------

    def pool_size(self, peer: str | None = None) -> int:
        """Open outbound connections, to one peer or to all."""
        return self._peers.pool_size(peer)

    def pool_stats(self) -> dict[str, dict[str, int]]:
        """Per peer: open, idle and in-use connections, dials, reuses, evictions, idle closes."""
        return self._peers.pool_stats()

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
        self.settings = replace(settings, node_id=self.node_id, listen=self.settings.listen)
        self._peers.reconfigure(self.settings)  # closes connections to peers that left
        self._outbound.settings = self._receiver.settings = self.settings
        return warnings

    def _running_nursery(self) -> trio.Nursery:
        """The node's nursery, for a new peer's tasks; :class:`NodeClosed` when not running."""
        self._check_running()
        assert self._nursery is not None
        return self._nursery

    def _decoder(self) -> FrameDecoder:
        t = self.settings.transfer
        return FrameDecoder(
            max_header=t.max_header_bytes,
            max_payload=MAX_CHUNK_SIZE,
            max_tensor_bytes=t.max_tensor_bytes,
        )

    def _arrive(self, name: str, array: np.ndarray[Any, Any], sender: str) -> None:
        """A verified tensor, stored before the peer hears ``Stored``: announce it."""
        queued = self._destinations.arrived(Arrival(name, array, sender))
        if self.store is None:
            self._tensors[name] = array if queued is None else queued.array
        if queued is not None:
            self._arrivals.append(queued)
        if len(self._arrivals) > self.max_arrivals:
            dropped = self._arrivals.popleft()
            log.warning(
                "arrival queue full: %r is stored but not queued for receive_tensor()", dropped.name
            )
        self._arrived.set()
        self._arrived = trio.Event()
        if self.events.active:
            self.events.publish(ArrivalEvent(name, sender, array.nbytes))

    def _stored(self, name: str) -> tuple[TensorMeta, np.ndarray[Any, Any]]:
        """A held tensor with its wire metadata (a stored bf16 keeps its wire dtype)."""
        if self.store is not None:
            info = self.store.meta(name)
            return info.meta, self.store.load(name)
        array = self.get_tensor(name)
        return meta_of(name, array), array

    # -- transfers ---------------------------------------------------------------------------

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
        addr = self._peers.resolve(peer)
        meta, data = self._outgoing(name, array, requires_grad, dtype)
        p = await self._peers.get(addr)
        return await self._run_job(lambda: self._outbound.send(p, meta, data))

    def _outgoing(
        self, name: str, array: np.ndarray[Any, Any], requires_grad: bool, dtype: str | None
    ) -> tuple[TensorMeta, memoryview]:
        """A tensor to send: its wire metadata and bytes (no copy if C-contiguous), checked
        against ``transfer.max_tensor_bytes``."""
        array = contiguous(array)
        meta = meta_of(name, array, requires_grad, dtype)
        if meta.nbytes > self.settings.transfer.max_tensor_bytes:
            limit = self.settings.transfer.max_tensor_bytes
            raise BadTensor(
                f"tensor {name!r} is {meta.nbytes} bytes, over the limit of {limit} "
                "(transfer.max_tensor_bytes)"
            )
        return meta, flat_bytes(array)

    async def broadcast_tensor(
        self,
        peers: Sequence[str | PeerAddress],
        name: str,
        array: np.ndarray[Any, Any],
        *,
        requires_grad: bool = False,
        dtype: str | None = None,
    ) -> BroadcastResult:
        """Send ``array`` as ``name`` to every peer of ``peers`` down a chain, in that order:
        the first forwards each chunk to the second as it arrives, and so on, so that N peers
        take about the time of one send (plus a chunk per hop), not N sends.

        Returns once every peer answered (or failed): :class:`BroadcastResult` lists each
        peer's outcome. A peer that dies midway is reported failed and the chain is repaired
        around it (its successor resumes from what it holds); a peer without the ``chain``
        feature is sent to directly. Raises :class:`BadAddress` for an unknown, repeated or
        self-naming peer, or more than 64.
        """
        self._check_running()
        named = [(str(p), self._peers.resolve(p)) for p in peers]
        meta, data = self._outgoing(name, array, requires_grad, dtype)
        return await self._run_job(lambda: self._chain.broadcast(named, meta, data))

    async def send_stored_to_all(
        self, peers: Sequence[str | PeerAddress], name: str, *, as_name: str | None = None
    ) -> BroadcastResult:
        """Broadcast a tensor this node holds (as ``as_name``, default ``name``)."""
        meta, array = self._stored(name)
        return await self.broadcast_tensor(
            peers, as_name or name, array, requires_grad=meta.requires_grad, dtype=meta.dtype
        )

    async def pull_tensor(
        self,
        peer: str | PeerAddress,
        name: str,
        *,
        as_name: str | None = None,
        store_as: str | None = None,
        out: np.ndarray[Any, Any] | None = None,
    ) -> np.ndarray[Any, Any]:
        """Fetch tensor ``name`` from ``peer``. Raises :class:`TensorNotFound` if it has none.

        A node with a store keeps the tensor (as ``as_name``, default ``name``) and returns it
        memory-mapped; a node without one returns it in memory and keeps it only if
        ``as_name`` is given. (``store_as`` is its deprecated spelling, for one release.)

        ``out``: a C-contiguous writable array of the tensor's shape and dtype to receive it
        into (returned); without a store the bytes land in it straight from the socket, with
        one they are stored and then copied. A tensor that does not fit raises
        :class:`~tensord.errors.DestinationMismatch` before any byte is written into ``out``.
        """
        if store_as is not None:
            warnings.warn(
                "pull_tensor(store_as=...) is deprecated; use as_name=...",
                DeprecationWarning,
                stacklevel=2,
            )
            if as_name is None:
                as_name = store_as
        self._check_running()
        for n in (name, as_name):
            if n is not None:
                checked_name(n)
        addr = self._peers.resolve(peer)
        p = await self._peers.get(addr)
        array = await self._run_job(lambda: self._outbound.pull(p, name, as_name, out=out))
        if self.store is None and as_name is not None:
            self._tensors[as_name] = array
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

    async def with_peer_connection(
        self, peer: str | PeerAddress, fn: Callable[[Connection], Awaitable[T]]
    ) -> T:
        """Run ``fn`` on a pooled connection to ``peer`` (dialled if none), as a job of this
        node (shutdown cancels it): how the :mod:`tensord.cluster` protocols speak to peers. The
        connection goes back to the pool if ``fn`` returns, and is closed if it raises."""
        self._check_running()
        p = await self._peers.get(self._peers.resolve(peer))

        async def job() -> T:
            async with p.pool.connection() as conn:
                return await fn(conn)

        return await self._run_job(job)

    async def wait_connected(self, peer_id: str) -> None:
        """Return at the next successful connection to node ``peer_id`` (by any send, pull or
        ping)."""
        await self._peers.wait_connected(peer_id)

    async def ping(self, peer: str | PeerAddress) -> float:
        """Round-trip time to ``peer`` in seconds, over a pooled connection (dialled if none).

        Raises :class:`PeerUnreachable` if the peer cannot be reached.
        """
        self._check_running()
        p = await self._peers.get(self._peers.resolve(peer))

        timeout = self.settings.transfer.io_timeout

        async def once() -> float:
            seq = self._ids.next_seq()
            async with p.pool.connection() as conn:
                started = time.perf_counter()
                await conn.stream.send(Ping(seq))
                with trio.fail_after(timeout):
                    reply = await conn.stream.receive()
                if not isinstance(reply, Pong) or reply.seq != seq:
                    raise ProtocolError(f"expected pong {seq}, got {reply!r}")
                return time.perf_counter() - started

        async def job() -> float:
            # A pooled connection the peer has since closed (it restarted, or dropped the
            # connection after an error) fails at once: try once more, on a fresh one.
            for last in (False, True):
                try:
                    return await once()
                except (OSError, ConnectionClosed, trio.BrokenResourceError) as exc:
                    if last:
                        raise PeerUnreachable(f"peer {p.name}: connection lost ({exc})") from None
                except trio.TooSlowError:
                    raise PeerUnreachable(
                        f"peer {p.name} did not answer a ping within {timeout:g} s "
                        "(transfer.io_timeout)"
                    ) from None
            raise AssertionError("unreachable")  # pragma: no cover

        return await self._run_job(job)


__all__ = [
    "CHECKPOINT_INTERVAL",
    "SWEEP_INTERVAL",
    "Arrival",
    "BroadcastResult",
    "Hello",
    "TensorNode",
    "TransferResult",
    "retry_backoff",
]
