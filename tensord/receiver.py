"""The node's inbound side: the peer listener, and the state of the receives it serves.

Every connection a peer opens is served here, one message after another: a ``Begin`` starts (or
resumes) a receive, ``Legacy`` a receive from an old peer, ``Request`` a pull this node answers
by sending, ``Ping`` a ``Pong``; the ``pieces`` messages (``Query``, ``Announce``,
``PieceRequest``) are answered from the node's blob holdings (:mod:`tensord.cluster.
piece_server`), ``PullModel`` by the daemon's hook (:mod:`tensord.cluster.remote_pull`).
Each connection is an error boundary (:meth:`Receiver._serve_messages`): whatever a peer makes
it do, the worst outcome is that its connection ends.

A receive may outlive its connection. What arrived of an interrupted one is kept as a partial
(checkpointed to the store while it runs) that the sender's retry resumes; a committed one is
remembered for ``transfer.partial_ttl_seconds`` so that a sender who missed our ``Stored``
hears it again. Both are bounded per peer (``max_peer_transfers``, ``max_peer_pending_bytes``)
and expire on the sweep's timer, so a hostile or vanished peer cannot make the node hold its
bytes forever. This module owns that state; the node only starts :meth:`Receiver.serve` and
:meth:`Receiver.sweep` in its nursery and hears each verified tensor through ``arrive``.
(Over ~800 lines on purpose: the partial, active and completed receives are one state with one
set of invariants - superseding, resuming, confirming again, expiring - and the code that
changes it stays together; what serves other messages lives in ``cluster/``.)
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
import trio

from .boundary import report_unexpected
from .buffers import ReceiveBuffers
from .cluster.holdings import Holdings
from .cluster.piece_server import serve_announce, serve_piece, serve_query
from .cluster.remote_pull import PullHook, serve_pull_model
from .config import HostPort, Settings
from .errors import BadTensor, ProtocolError, TensorError, TensorNotFound, TransferFailed
from .events import EventBus
from .net.connection import Connection, receive_chunked, receive_legacy, send_chunked, send_legacy
from .net.quic import ListenerStats, QuicTuning, serve_quic
from .net.security import PeerSecurity
from .net.stream import ConnectionClosed
from .net.tcp import serve
from .results import InFlight, TransferIds, publish_transfer, why
from .sending import new_send
from .sink import Claim, MemorySink, Sink, StoreSink, flat_bytes, new_receive, open_sink
from .store import TensorStore
from .wire.frames import FrameDecoder
from .wire.messages import (
    Accept,
    Announce,
    Begin,
    ChainOutcome,
    Chunk,
    End,
    Error,
    Hello,
    Legacy,
    PieceRequest,
    Ping,
    Pong,
    PullModel,
    Query,
    Request,
    Stored,
)
from .wire.meta import TensorMeta
from .wire.transfer import ReceiveState, ReceiveTransfer

log = logging.getLogger("tensord.transfer")

#: How often a receive into the store saves its progress (what a ``kill -9`` can cost, at most).
CHECKPOINT_INTERVAL = 1.0
#: How often partial receives abandoned on disk are looked for and removed.
SWEEP_INTERVAL = 60.0

#: The node's tensor of a name, with its wire metadata (what a pull is answered with).
HeldTensor = Callable[[str], tuple[TensorMeta, np.ndarray[Any, Any]]]
#: Called with each verified tensor (name, array, sender) once it is stored.
ArriveHook = Callable[[str, np.ndarray[Any, Any], str], None]
#: The caller's array a new receive of ``meta`` lands in (``receive_tensor(into=...)``), if any.
ClaimHook = Callable[[TensorMeta], "tuple[np.ndarray[Any, Any], Claim] | None"]


class Forwarder(Protocol):
    """A chain receive's forwarding to the rest of its chain (:class:`tensord.cluster.chain.
    Relay`): told of arriving chunks, run as a task, and asked for the ``Stored`` to answer."""

    def arrived(self) -> None: ...

    async def hold_data(self) -> None: ...

    def use_data(self, data: memoryview) -> None: ...

    def cancel(self) -> None: ...

    async def run(self) -> None: ...

    async def stored(self, upstream: Connection, io_timeout: float) -> Stored: ...


#: Makes the forwarder of a chain receive (``Begin.chain`` names peers after this node).
ForwardHook = Callable[[Begin, ReceiveTransfer], Forwarder]


@dataclass
class _Partial:
    xfer: ReceiveTransfer
    sink: Sink
    expires: float


@dataclass(slots=True)  # (not frozen: one is made per receive, and frozen inits cost more)
class _Completed:
    """A receive that was committed, remembered for ``partial_ttl_seconds``: if the sender never
    got our ``Stored`` (a cut at the last moment) its resumed ``Begin`` is confirmed again, with
    no second commit, no second arrival and no chunk sent twice."""

    meta: TensorMeta
    chunk_size: int
    nchunks: int
    crc: int | None
    expires: float
    chain: bool = False
    outcomes: tuple[ChainOutcome, ...] = ()

    def matches(self, begin: Begin) -> bool:
        return begin.meta == self.meta and begin.chunk_size == self.chunk_size


@dataclass
class _Active:
    """A receive running now: ``scope`` stops it (a superseding transfer, a cancelled
    ``receive_tensor(into=...)``); :meth:`released` waits until it let go of its state."""

    scope: trio.CancelScope
    nbytes: int = 0
    chain: bool = False
    _released: trio.Event | None = None  # made only if someone waits (rarely)
    _done: bool = False

    async def released(self) -> None:
        if self._done:
            await trio.lowlevel.checkpoint()
            return
        if self._released is None:
            self._released = trio.Event()
        await self._released.wait()

    def release(self) -> None:
        self._done = True
        if self._released is not None:
            self._released.set()


def _kind(msg: object) -> str:
    """A message as a log line names it: its type and the tensor it is about."""
    if msg is None:
        return "no message"
    meta = getattr(msg, "meta", None)
    name = meta.name if isinstance(meta, TensorMeta) else getattr(msg, "name", None)
    kind = type(msg).__name__.lower()
    return f"{kind} {name[:80]!r}" if isinstance(name, str) else kind


class Receiver:
    """Serves one node's inbound connections and owns its partial and completed receives.

    ``stored`` looks up a tensor this node holds (pulls); ``arrive`` hears each verified one.
    ``in_flight`` is the node's count of running transfers (``drain()`` waits on it).
    ``settings`` is replaced when the node is reconfigured.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: TensorStore | None,
        hello: Hello,
        decoder: Callable[[], FrameDecoder],
        security: PeerSecurity,
        quic_tuning: QuicTuning,
        quic_stats: ListenerStats,
        events: EventBus,
        ids: TransferIds,
        in_flight: InFlight,
        stored: HeldTensor,
        arrive: ArriveHook,
        holdings: Holdings | None = None,
        forward: ForwardHook | None = None,
        sweep_interval: float = SWEEP_INTERVAL,
        buffers: ReceiveBuffers | None = None,
        claim: ClaimHook | None = None,
    ) -> None:
        self.settings = settings
        #: Freed receive memory to reuse, and the waiting ``receive_tensor(into=...)`` calls
        #: (a node without a store).
        self._buffers = buffers
        self._claim = claim
        self._store = store
        self._hello = hello
        self._decoder = decoder
        self._security = security
        self._quic_tuning = quic_tuning
        self._quic_stats = quic_stats
        self._events = events
        self._ids = ids
        self._in_flight = in_flight
        self._stored = stored
        self._arrive = arrive
        self._forward = forward
        #: Starts a model pull a peer asks for (``remote_pull``): set by the daemon, which owns
        #: the download manager; ``None`` (a library node) refuses such requests.
        self.on_pull_request: PullHook | None = None
        #: The blobs this node serves to peers' piece requests (``pieces`` feature).
        self.holdings = holdings if holdings is not None else Holdings(None)
        self._sweep_interval = sweep_interval
        self._partials: dict[tuple[str, str], _Partial] = {}
        self._inbound: Counter[str] = Counter()  # inbound connections per peer
        #: Committed receives per peer, oldest first (``_Completed``), keyed by transfer id.
        self._completed: dict[str, dict[str, _Completed]] = {}
        self._active: dict[tuple[str, str], _Active] = {}
        self._accepting = trio.CancelScope()
        self._handlers: trio.Nursery | None = None

    def _publish(self, *args: Any, **kwargs: Any) -> None:
        publish_transfer(self._events, *args, **kwargs)

    @property
    def partials(self) -> int:
        """Interrupted receives kept for their senders to resume."""
        return len(self._partials)

    def stop_accepting(self) -> None:
        """No more inbound connections (a drain); those being served carry on."""
        self._accepting.cancel()

    async def close(self) -> None:
        """The node stopped: close the receives that stopped midway (their progress was saved
        when they stopped)."""
        partials, self._partials = self._partials, {}
        for partial_ in partials.values():
            await partial_.sink.close()

    async def sweep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Report what a previous run left to resume, then drop abandoned partial receives
        (untouched for ``transfer.partial_ttl_seconds``) on a timer - an idle node too frees
        the space they hold - and, with a store, their files."""
        store = self._store
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
                self.expire()  # closes expired ones, so the store's sweep removes them
                if store is not None:
                    await trio.to_thread.run_sync(store.expire_partials, ttl)
            except Exception as exc:  # a bug: logged and counted; the next sweep tries again
                report_unexpected(log, "peer", "the sweep of partial receives", exc)
            await trio.sleep(min(self._sweep_interval, max(ttl / 2, 0.05)))

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        port: int,
        handlers: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Connections are handled in the node's nursery, not under the accept loop, so that
        # drain() can stop accepting while the transfers in flight carry on.
        t = self.settings.transfer
        self._handlers = handlers
        with self._accepting:
            async with trio.open_nursery() as accept:
                if self.settings.transport == "quic":
                    # QUIC on the UDP port of the same number, as well as TCP: a peer without
                    # QUIC still reaches this node.
                    await accept.start(
                        partial(
                            serve_quic,
                            HostPort(self.settings.listen.host, port),
                            self._hello,
                            self._decoder,
                            self.serve_connection,
                            handshake_timeout=t.handshake_timeout,
                            handler_nursery=handlers,
                            key=self._security.key,
                            tls=self.settings.security.tls,
                            max_connections=t.max_connections,
                            max_unauthenticated=t.max_unauthenticated,
                            tuning=self._quic_tuning,
                            stats=self._quic_stats,
                        )
                    )
                accept.start_soon(
                    partial(
                        serve,
                        listeners,
                        self._hello,
                        self._decoder,
                        self.serve_connection,
                        handshake_timeout=t.handshake_timeout,
                        handler_nursery=handlers,
                        security=self._security,
                        max_connections=t.max_connections,
                        max_unauthenticated=t.max_unauthenticated,
                    )
                )
                task_status.started()

    async def serve_connection(self, conn: Connection) -> None:
        """One inbound handshaken connection (from the listeners, or a test's fake network):
        transfers, pulls and pings, one after another."""
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
        # One scope for the connection's idle timeout, armed only while a message is awaited
        # (two deadline moves per message are cheaper than a new scope per message).
        waiting = trio.CancelScope()
        try:
            with waiting:
                while True:
                    msg = None
                    waiting.deadline = trio.current_time() + idle
                    msg = await conn.stream.receive()
                    waiting.deadline = math.inf
                    if isinstance(msg, Begin):
                        await self._receive(conn, msg)
                    elif isinstance(msg, Legacy):
                        await self._receive_legacy(conn, msg)
                    elif isinstance(msg, Request):
                        await self._serve_pull(conn, msg)
                    elif isinstance(msg, Ping):
                        await conn.stream.send(Pong(msg.seq))
                    elif isinstance(msg, PieceRequest):
                        chunk = self.settings.tensor_protocol.chunk_size
                        await serve_piece(conn, msg, self.holdings, chunk_size=chunk)
                    elif isinstance(msg, Query):
                        await serve_query(conn, msg, self.holdings)
                    elif isinstance(msg, Announce):
                        await serve_announce(conn, msg, self.holdings)
                    elif isinstance(msg, PullModel):
                        await serve_pull_model(conn, msg, self.on_pull_request)
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
            log.info("peer %s: connection lost: %s", conn.peer_id, why(exc))
        except TensorError as exc:
            # Typed but not expected here (a store refusing a name, say): the peer hears why.
            what = _kind(msg)
            log.warning("peer %s: %s refused, closing the connection: %s", conn.peer_id, what, exc)
            await conn.send_error(getattr(exc, "code", "refused"), str(exc)[:512])
        except Exception as exc:
            report_unexpected(log, "peer", f"peer {conn.peer_id}, {_kind(msg)}", exc)
            await conn.send_error("internal", f"internal error while handling {_kind(msg)}")

    def _remember_completed(
        self,
        key: tuple[str, str],
        begin: Begin,
        xfer: ReceiveTransfer,
        outcomes: tuple[ChainOutcome, ...] = (),
    ) -> None:
        ttl = self.settings.transfer.partial_ttl_seconds
        mine = self._completed.setdefault(key[0], {})
        mine[key[1]] = _Completed(
            begin.meta,
            begin.chunk_size,
            xfer.nchunks,
            xfer.end_crc,
            trio.current_time() + ttl,
            begin.chain is not None,
            outcomes,
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
                await conn.stream.send(Stored(begin.id, done.outcomes))
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
        """:func:`~tensord.sink.new_receive`; when the store is too full, first free what the
        same sender left on disk of the same tensor before this process started (the partials
        of this process were freed by :meth:`_drop_superseded`), then try once more. The
        directory is read only then, not on every receive."""
        key = f"{conn.peer_id}/{begin.id}"
        if self._store is None:
            claimed = self._claim(begin.meta) if self._claim is not None else None
            into, claim = claimed if claimed is not None else (None, None)
            return new_receive(
                None, conn, begin, key, into=into, buffers=self._buffers, claim=claim
            )
        try:
            return new_receive(self._store, conn, begin, key)
        except TransferFailed as exc:
            if exc.code != "quota" or self._store is None:
                raise
            freed = await trio.to_thread.run_sync(
                self._store.discard_partials, f"{conn.peer_id}/", begin.meta.name, key
            )
            if not freed:
                raise
        return new_receive(self._store, conn, begin, key)

    def _check_peer_budget(self, peer: str, nbytes: int) -> None:
        """Refuse a new receive beyond what one peer may hold of this node: transfers in
        flight, and tensor bytes of those and of the partials kept for it (``busy``: the
        sender backs off and retries; other peers are not affected)."""
        t = self.settings.transfer
        count = pending = 0
        for (p, _), a in self._active.items():
            if p == peer:
                count += 1
                pending += a.nbytes
        if count >= t.max_peer_transfers:
            raise TransferFailed(
                f"peer {peer} already has {count} transfers in flight to this node "
                f"(transfer.max_peer_transfers = {t.max_peer_transfers})",
                code="busy",
            )
        if self._partials:
            pending += sum(
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

    def expire(self) -> None:
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

    def _check_chain(self, conn: Connection, begin: Begin) -> None:
        """A chain ``Begin`` needs the feature agreed, and must not lead back to this node."""
        if "chain" not in conn.agreement.features:
            raise ProtocolError("a chain transfer on a connection without the chain feature")
        me = f"tensord://{self.settings.node_id}@"
        if any(p.startswith(me) for p in begin.chain or ()):
            raise ProtocolError("the chain names this node: it would loop", code="bad_chain")

    async def _take_over_chain(self, peer: str, begin: Begin) -> None:
        """A chain link resumed by a new predecessor (the old one died, or stalled): what the
        old one's link left here - a receive still running, a partial, a committed record - is
        this link's now, so it resumes from what this node holds. Only chain transfers, and
        only with the same id, tensor and chunking."""
        for (p, xid), active in list(self._active.items()):
            if xid == begin.id and p != peer and active.chain:
                active.scope.cancel()
                await active.released()
        key = (peer, begin.id)
        for old, part in list(self._partials.items()):
            mine = old[1] == begin.id and old[0] != peer and part.xfer.begin.chain is not None
            if mine and key not in self._partials and part.xfer.matches(begin):
                log.info(
                    "tensor transfer %s: %s takes over the chain link from %s at %d bytes",
                    begin.id,
                    peer,
                    old[0],
                    part.xfer.bytes_have,
                )
                self._partials[key] = self._partials.pop(old)
        found = [
            done
            for p, mine in self._completed.items()
            if p != peer
            and (done := mine.get(begin.id)) is not None
            and done.chain
            and done.matches(begin)
        ]
        if found:
            self._completed.setdefault(peer, {})[begin.id] = found[0]

    async def _receive(self, conn: Connection, begin: Begin) -> None:
        # (Expiry of partials and completed records runs on the sweep's timer, not here.)
        peer = conn.peer_id
        key = (peer, begin.id)
        if begin.chain is not None:
            self._check_chain(conn, begin)
            if begin.resume:
                await self._take_over_chain(peer, begin)
        done = self._completed.get(peer, {}).get(begin.id)
        if done is not None and begin.resume and done.matches(begin):
            await self._confirm_again(conn, begin, done)
            return
        stale = self._active.get(key)
        if stale is not None:
            # The sender gave up on an older connection we still think is alive (a cut that
            # only it noticed): stop that receive so its progress is kept as the partial.
            stale.scope.cancel()
            await stale.released()
        meta = begin.meta
        partial = self._partials.pop(key, None)
        if partial is not None and partial.xfer.matches(begin):
            xfer, sink = partial.xfer, partial.sink
            replies = xfer.rebegin(begin, lz4=conn.agreement.lz4)
            log.info(
                "tensor transfer %s: resuming %r from %s at %d of %d bytes",
                begin.id,
                meta.name,
                peer,
                xfer.bytes_have,
                meta.nbytes,
            )
        else:
            if partial is not None:
                await partial.sink.discard()
            if self._partials:
                await self._drop_superseded(peer, meta.name, key)
            try:
                self._check_peer_budget(peer, meta.nbytes)
                xfer, sink = await self._new_receive_freeing(conn, begin)
            except TransferFailed as exc:
                log.warning("tensor transfer %s: refused %r: %s", begin.id, meta.name, exc)
                await conn.send_error(exc.code, str(exc), begin.id)
                raise
            replies = [xfer.accept()] if begin.resume else []
        if replies:
            try:
                await conn.stream.send(*replies)
            except BaseException:
                if isinstance(sink, MemorySink) and sink.claim is not None:
                    sink.claim.release()  # the caller's array waits for the retry
                raise
        started = time.perf_counter()
        if self._events.active:  # (the call and its arguments only if someone listens)
            self._publish("receive", begin.id, meta, peer, "started", xfer.bytes_have)

        relay: Forwarder | None = None
        if begin.chain and self._forward is not None and self._handlers is not None:
            relay = self._forward(begin, xfer)  # forwards each chunk as it lands

        def progress(done: int) -> None:
            sink.landed(done)
            if relay is not None:
                relay.arrived()
            if self._events.active:
                self._publish("receive", begin.id, meta, peer, "progress", done)

        committed: list[bool] = []
        #: Committed, and the ``Stored`` to answer is known: from here a resumed ``Begin`` is
        #: confirmed again, even if sending this ``Stored`` fails.
        answerable: list[bool] = []
        outcomes: list[ChainOutcome] = []

        async def complete() -> Stored | None:
            if relay is not None:
                await relay.hold_data()  # the receive buffer may be unmapped by the commit
            array = await sink.commit(peer)
            committed.append(True)
            self._arrive(meta.name, array, peer)
            if relay is None:
                answerable.append(True)
                return None
            relay.use_data(flat_bytes(array))
            # Answer once the rest of the chain has, with its outcomes.
            stored = await relay.stored(conn, self.settings.transfer.io_timeout)
            outcomes.extend(stored.outcomes)
            answerable.append(True)
            return stored

        active = _Active(trio.CancelScope(), meta.nbytes, begin.chain is not None)
        into = isinstance(sink, MemorySink) and sink.claim is not None
        if isinstance(sink, MemorySink) and sink.claim is not None:
            sink.claim.bind(active.scope)  # a cancelled receive_tensor(into=) stops it
        worked: trio.Event | None = None
        work = sink.worker() if self._handlers is not None else None
        if work is not None and self._handlers is not None:
            # New memory faulted in ahead of the socket, a store file written back behind it.
            worked = trio.Event()
            self._handlers.start_soon(_sink_worker, work, worked)
        checkpoints: trio.CancelScope | None = None
        self._active[key] = active
        self._in_flight.enter()
        try:
            if sink.persistent and self._handlers is not None:
                checkpoints = trio.CancelScope()
                self._handlers.start_soon(self._checkpoints, sink, xfer, peer, checkpoints)
            if relay is not None and self._handlers is not None:
                self._handlers.start_soon(relay.run)
                relay.arrived()  # what a resumed receive already holds
            try:
                # In active.scope (one scope for the receive and its inactivity deadline). An
                # in-memory commit without a relay returns at once: no pause of the deadline.
                await receive_chunked(
                    conn,
                    xfer,
                    io_timeout=self.settings.transfer.io_timeout,
                    # A one-chunk tensor's progress is its "done" (as on the sending side);
                    # a store's sink hears of every chunk (its write-behind).
                    progress=(
                        progress
                        if relay is not None or xfer.nchunks > 1 or sink.persistent
                        else None
                    ),
                    on_complete=complete,
                    scope=active.scope,
                    complete_waits=relay is not None or not isinstance(sink, MemorySink),
                )
            except TransferFailed as exc:
                if exc.code == "quota":  # the disk filled up while committing
                    await conn.send_error(exc.code, str(exc), begin.id)
                raise
        finally:
            if checkpoints is not None:
                checkpoints.cancel()
            sink.stopped()  # its worker thread, if any, ends
            if relay is not None and not committed:
                relay.cancel()  # the sender resumes this receive, with a new relay
            keep = xfer.state is ReceiveState.RECEIVING and xfer.have_count and not into
            if keep or not committed:  # (a committed receive has nothing to save or free)
                with trio.CancelScope(shield=True):
                    if keep:
                        # Persist what arrived (a drain, a cut): the sender's retry, from this
                        # process or after a restart, resumes from the first missing chunk.
                        try:
                            await sink.checkpoint(xfer)
                        except (OSError, ValueError) as exc:
                            log.warning(
                                "tensor transfer %s: cannot save progress: %s", begin.id, exc
                            )
                        ttl = self.settings.transfer.partial_ttl_seconds
                        self._partials[key] = _Partial(xfer, sink, trio.current_time() + ttl)
                        self._evict_partials(peer)
                    else:
                        await sink.discard()
            if not committed:
                self._publish("receive", begin.id, meta, peer, "interrupted", xfer.bytes_have)
            if answerable:
                # Remembered however this ends: a connection that breaks while ``Stored`` is on
                # its way leaves a sender that resumes, and must hear "stored", not start over.
                self._remember_completed(key, begin, xfer, tuple(outcomes))
            if worked is not None:
                # The thread ends within one step once told to stop; after that nothing but
                # the arrival itself holds its buffer (a freed one is reused at once).
                await worked.wait()
            del self._active[key]
            active.release()
            self._in_flight.leave()
        if active.scope.cancelled_caught:
            raise ConnectionClosed("superseded by the sender's resumed transfer")
        if self._events.active:  # (the call and its arguments only if someone listens)
            self._publish("receive", begin.id, meta, peer, "done", meta.nbytes)
        if log.isEnabledFor(logging.INFO):  # (its arguments are not computed per tensor else)
            seconds = time.perf_counter() - started
            log.info(
                "tensor transfer %s: received %r from %s: %d bytes in %.3f s (%.1f MB/s)",
                begin.id,
                meta.name,
                peer,
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
                    self._publish("receive", xfer.id, xfer.meta, sender, "checkpoint", before)

    async def _receive_legacy(self, conn: Connection, msg: Legacy) -> None:
        key = f"{conn.peer_id}/legacy-{secrets.token_hex(8)}"
        sink = open_sink(self._store, msg.meta, key, None)
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

    async def _serve_pull(self, conn: Connection, req: Request) -> None:
        try:
            meta, array = self._stored(req.name)
        except (TensorNotFound, ProtocolError):
            me = self.settings.node_id
            await conn.stream.send(
                Error("not_found", f"no tensor named {req.name[:256]!r} on node {me}")
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
        xid = req.resume if resume and req.resume is not None else self._ids.next()
        try:
            xfer = new_send(self.settings, xid, meta, data, agr)
        except TransferFailed as exc:  # the puller's max chunk is too small for this tensor
            await conn.stream.send(Error(exc.code, str(exc)[:512]))
            return
        await send_chunked(conn, xfer, resume=resume, io_timeout=t.io_timeout)


async def _sink_worker(work: Callable[[], None], done: trio.Event) -> None:
    """Run a sink's ``work`` in a worker thread; ``done`` is set as the task lets go of it (and
    so of the sink and its buffer). A task of the handlers' nursery: a bug in the work is logged
    and counted, never raised into that nursery (the receive goes on without it)."""
    try:
        await trio.to_thread.run_sync(work)
    except Exception as exc:
        report_unexpected(log, "peer", "a receive's worker thread", exc)
    finally:
        done.set()


__all__ = ["CHECKPOINT_INTERVAL", "SWEEP_INTERVAL", "Receiver"]
