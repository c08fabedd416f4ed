"""Pipelined broadcast: a tensor sent down a chain of peers, each forwarding chunks as they land.

The origin sends to the first peer a ``Begin`` naming the rest of the chain (feature
``chain``); that peer stores and verifies the tensor as any receive, and forwards each chunk to
the next peer as soon as it has it, from its receive buffer (no copy). So the time to reach N
peers is about ``S/B + (N-1)·chunk/B``, not the ``N·S/B`` of N sends from one NIC. A peer answers
``Stored`` only once the rest of the chain answered it, carrying their outcomes: the origin's
result lists every peer's.

Repair: when a link's receiver dies (its connection fails and a redial fails too), its sender
marks it failed and links to the next peer instead with ``Begin(resume=True)``. That peer's
receiver finds what the dead node's link left (the partial of the same transfer id:
:meth:`tensord.receiver.Receiver._take_over_chain`) and answers ``Accept(have)``: nothing it
holds is sent again. A peer without the feature, or one accepting only chunks smaller than the
chain's (its Hello's ``mc``: every hop keeps the origin's chunk size, which repair needs), ends
the chain there: a relay reports it and those after it as ``fallback``, and the origin sends to
it directly, in chunks it accepts (and chains the rest).

:class:`Chain` is the node's side: :meth:`Chain.broadcast` at the origin, :meth:`Chain.relay` for
the receiver (which knows it only as a forwarding hook, so the dependency points down).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import trio

from ..address import PeerAddress, parse_address
from ..boundary import report_unexpected
from ..config import Settings
from ..errors import BadAddress, ProtocolError, TensorError, TransferFailed
from ..events import EventBus
from ..net.connection import FINAL_ERROR_CODES, Connection, ConnectionClosed, Deadline
from ..outbound import RETRIABLE, Outbound, RetryBudget
from ..peers import Peers
from ..results import TransferIds, publish_transfer, why
from ..sending import chunk_size
from ..wire.frames import encode
from ..wire.messages import MAX_CHAIN, Accept, Ack, Begin, ChainOutcome, Error, Stored
from ..wire.meta import TensorMeta
from ..wire.relay import Arriving, RelaySend
from ..wire.transfer import ReceiveTransfer, SendState

log = logging.getLogger("tensord.transfer")


@dataclass(frozen=True)
class PeerOutcome:
    """What a broadcast did for one peer.

    ``status``: ``stored`` (through the chain), ``direct`` (the peer lacks the ``chain``
    feature, or a peer before it does: the origin sent it directly) or ``failed`` (``detail``
    says why). Byte counts are of the link that delivered it: ``bytes_resent`` were sent twice
    on it, ``bytes_skipped`` were already there when it resumed (after a repair).
    """

    peer: str
    status: str
    detail: str = ""
    bytes_sent: int = 0
    bytes_resent: int = 0
    bytes_skipped: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("stored", "direct")

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "status": self.status,
            "ok": self.ok,
            "detail": self.detail,
            "bytes_sent": self.bytes_sent,
            "bytes_resent": self.bytes_resent,
            "bytes_skipped": self.bytes_skipped,
        }


@dataclass(frozen=True)
class BroadcastResult:
    """The outcome of :meth:`TensorNode.broadcast_tensor`: one :class:`PeerOutcome` per peer,
    in the order given."""

    id: str
    name: str
    nbytes: int
    seconds: float
    outcomes: tuple[PeerOutcome, ...]

    @property
    def ok(self) -> bool:
        """Did every peer store the tensor?"""
        return all(o.ok for o in self.outcomes)

    @property
    def failed(self) -> list[str]:
        return [o.peer for o in self.outcomes if not o.ok]

    @property
    def bytes_resent(self) -> int:
        return sum(o.bytes_resent for o in self.outcomes)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "nbytes": self.nbytes,
            "seconds": self.seconds,
            "ok": self.ok,
            "bytes_resent": self.bytes_resent,
            "peers": [o.to_json() for o in self.outcomes],
        }


class _NoChain(Exception):
    """The link's receiver cannot be part of this chain: it did not agree on the ``chain``
    feature, or it accepts smaller chunks than the chain's (``str()`` says which)."""


class _Wakeup:
    """Wakes a link's sender: a chunk arrived, or a reply opened the window."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


class DataGate:
    """Where a link reads its chunks: the receive's buffer, then the committed tensor.

    A store's partial file is unmapped when it is committed, so a relay's links must hold no
    view of it then: :meth:`close` waits until no chunk is being sent from it and stops new
    ones; :meth:`reopen` points the links at the committed tensor (memory-mapped: still no
    copy). The origin's gate never closes.

    A send to a hung peer (its socket buffer full, nothing read) would hold the view until that
    link's ``io_timeout``, and the commit with it: meanwhile the upstream hears nothing, times
    out too, and its resume would find the verified receive discarded (the whole tensor sent
    again). So :meth:`close` waits only ``grace`` seconds, then cuts the sends still holding a
    view (:meth:`hold`): their links fail and redial, resuming from the committed tensor.
    """

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self._busy = 0
        self._closed = False
        self._changed = trio.Event()
        self._holders: set[trio.CancelScope] = set()

    def _change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def acquire(self) -> memoryview:
        while self._closed:
            await self._changed.wait()
        self._busy += 1
        return self.data

    def release(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._change()

    def hold(self) -> trio.CancelScope:
        """The scope to send an acquired view in: :meth:`close` cancels it after its grace.
        Forgotten at :meth:`release`."""
        scope = trio.CancelScope()
        self._holders.add(scope)
        return scope

    def forget(self, scope: trio.CancelScope) -> None:
        self._holders.discard(scope)

    async def close(self, grace: float) -> None:
        self._closed = True
        with trio.move_on_after(grace):
            while self._busy:
                await self._changed.wait()
        if self._busy:
            log.warning(
                "chain relay: a link still sending after %.3g s holds up the commit: cutting it",
                grace,
            )
            for scope in self._holders:
                scope.cancel()
            while self._busy:
                await self._changed.wait()

    def reopen(self, data: memoryview) -> None:
        self.data = data
        self._closed = False
        self._change()


def _peer_error(err: Error, name: str) -> TensorError:
    if err.code in FINAL_ERROR_CODES or err.code == "bad_chain":
        return TransferFailed(f"peer refused tensor {name!r}: {err.message}", code=err.code)
    return ProtocolError(f"peer reported an error for {name!r}: {err.message}", code=err.code)


async def drive_link(
    conn: Connection,
    xfer: RelaySend,
    wakeup: _Wakeup,
    gate: DataGate,
    *,
    io_timeout: float,
    progress: Callable[[int], None] | None = None,
) -> None:
    """One attempt of a chain link: ``Begin(resume)``, ``Accept``, then chunks as they become
    available, until the receiver answers ``Stored`` (with the rest of the chain's outcomes).

    Unlike :func:`~tensord.net.connection.send_chunked` this sender may have nothing to send
    while nothing is unacknowledged (the chunks have not arrived yet), so replies are read by a
    task of their own and either side wakes the sender.
    """
    stream = conn.stream
    with trio.CancelScope() as scope:
        deadline = Deadline(scope, io_timeout)
        await stream.send(xfer.begin(resume=True))  # the receiver says what it holds
        reply = await stream.receive()
        if isinstance(reply, Error):
            raise _peer_error(reply, xfer.meta.name)
        if not isinstance(reply, Accept):
            raise ProtocolError(f"expected accept, got {type(reply).__name__}")
        xfer.on_message(reply)
        deadline.touch()
        reader_failed: list[BaseException] = []

        async def read_replies() -> None:
            try:
                while xfer.state in (SendState.SENDING, SendState.ENDED):
                    msg = await stream.receive()
                    if stream.decoder.payload_pending:
                        raise ProtocolError(f"unexpected payload on {type(msg).__name__}")
                    xfer.on_message(msg)
                    deadline.touch()
                    wakeup.set()
            except Exception as exc:  # the sender raises it
                reader_failed.append(exc)
                wakeup.set()

        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_replies)
            try:
                while xfer.state in (SendState.SENDING, SendState.ENDED):
                    if reader_failed:
                        raise reader_failed[0]
                    xfer.data = await gate.acquire()
                    held = gate.hold()
                    sent = False
                    try:
                        with held:
                            out = xfer.next_chunk()
                            if out is not None:
                                after = encode(xfer.end()) if xfer.wants_end else b""
                                await stream.send_with_payload(out.header, out.payload, b"", after)
                                sent = True
                            elif xfer.wants_end:
                                await stream.send(xfer.end())
                                sent = True
                            out = None  # no view of the buffer outlives the send
                    finally:
                        gate.forget(held)
                        gate.release()
                    if held.cancelled_caught:  # half a frame may be on the wire: redial
                        raise ConnectionClosed(
                            "the link was cut: its send held up this node's commit"
                        )
                    if sent:
                        deadline.touch()
                        if progress is not None:
                            progress(xfer.stats.bytes_sent)
                        continue
                    await wakeup.wait()
                if reader_failed:
                    raise reader_failed[0]
            except BaseException as exc:  # re-raised below, not wrapped by the nursery
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
    if scope.cancelled_caught:
        raise TimeoutError(f"no progress for {io_timeout:g} s")
    if xfer.state is SendState.FAILED:
        assert xfer.error is not None
        raise _peer_error(xfer.error, xfer.meta.name)


class _Links:
    """The links from this node down the rest of one chain, with repair.

    ``arriving`` (a relay): the chunks come from a receive still in progress; ``None`` (the
    origin): every chunk is there. ``chunk`` is the transfer's chunk size: the origin's choice,
    kept on every link so that a repaired link can resume what another one left.
    """

    def __init__(
        self,
        chain: Chain,
        xid: str,
        meta: TensorMeta,
        data: memoryview,
        chunk: int | None,
        *,
        arriving: Arriving | None,
        wakeup: _Wakeup,
    ) -> None:
        self.chain = chain
        self.xid = xid
        self.meta = meta
        self.data = data
        self.gate = DataGate(data)
        self.chunk = chunk
        self.arriving = arriving
        self.wakeup = wakeup

    @property
    def origin(self) -> bool:
        return self.arriving is None

    async def run(self, downstream: Sequence[str]) -> list[ChainOutcome]:
        """Deliver to every peer of ``downstream``; an outcome for each, in order."""
        out: list[ChainOutcome] = []
        rest = list(downstream)
        while rest:
            head, tail = rest[0], tuple(rest[1:])
            try:
                link = await self._link(head, tail)
            except _NoChain as exc:
                if not self.origin:
                    detail = f"{head} {exc}: the origin sends directly"
                    out += [ChainOutcome(p, "fallback", detail[:512]) for p in rest]
                    return out
                out.append(await self._direct(head, str(exc)))
                rest = rest[1:]
                continue
            except (TensorError, *RETRIABLE) as exc:
                # Repair: link to the successor; it resumes from what it holds.
                log.warning(
                    "tensor transfer %s: chain link to %s failed (%s); linking to %s",
                    self.xid,
                    head,
                    why(exc),
                    tail[0] if tail else "nobody (it was the tail)",
                )
                out.append(ChainOutcome(head, "failed", why(exc)[:512]))
                rest = rest[1:]
                continue
            except Exception as exc:
                report_unexpected(log, "peer", f"chain link of {self.xid} to {head}", exc)
                out.append(ChainOutcome(head, "failed", f"internal error: {why(exc)}"[:512]))
                rest = rest[1:]
                continue
            s = link.stats
            skipped = min(s.skipped_by_resume * link.chunk_size, self.meta.nbytes)
            out.append(ChainOutcome(head, "stored", "", s.bytes_sent, s.bytes_resent, skipped))
            reported = {o.peer: o for o in link.outcomes}
            out += [
                reported.get(p, ChainOutcome(p, "failed", f"{head} reported no outcome"))
                for p in tail
            ]
            return out
        return out

    async def _link(self, head: str, tail: tuple[str, ...]) -> RelaySend:
        c = self.chain
        addr = parse_address(head)
        if addr.node_id == c.node_id:
            raise TransferFailed("the chain names this node itself", code="bad_chain")
        peer = await c.peers.get(addr)
        settings = c.settings()
        proto = settings.tensor_protocol
        xfer: RelaySend | None = None

        def acked() -> int:
            return xfer.bytes_acked if xfer is not None else 0

        # One redial (resuming) before the peer counts as dead: a dead node's successor
        # should not wait through a whole retry budget.
        budget = RetryBudget(
            replace(proto, max_retries=min(proto.max_retries, 1)),
            f"forwarding {self.meta.name!r} to {peer.name}",
            acked,
            xid=self.xid,
            peer=peer.name,
            unreachable=True,
        )

        def progress(sent: int) -> None:
            if c.events.active:
                publish_transfer(c.events, "send", self.xid, self.meta, peer.name, "progress", sent)

        async def attempt() -> None:
            nonlocal xfer
            async with peer.pool.connection() as conn:
                budget.connected = True
                agr = conn.agreement
                if "chain" not in agr.features:
                    raise _NoChain("lacks the chain feature")
                if agr.peer_id == c.node_id:
                    raise TransferFailed("the chain leads back to this node", code="bad_chain")
                if self.chunk is None:  # the origin's first link chooses
                    self.chunk = chunk_size(settings, self.meta, agr)
                if self.chunk > agr.peer_max_chunk:
                    # Every hop keeps the transfer's chunk size (a repair resumes across
                    # links), so a peer accepting only smaller chunks cannot be linked: the
                    # origin sends to it directly, in chunks it accepts (docs/PROTOCOL.md).
                    raise _NoChain(
                        f"accepts chunks of at most {agr.peer_max_chunk} bytes, the chain's "
                        f"are {self.chunk}"
                    )
                if xfer is None:
                    xfer = RelaySend(
                        self.xid,
                        self.meta,
                        self.data,
                        chunk_size=self.chunk,
                        window=max(2, settings.transfer.window_bytes // self.chunk),
                        crc=agr.crc,
                        chain=tail,
                    )
                    if self.arriving is None:
                        xfer.make_all_available()
                    else:
                        self.arriving.attach(xfer)
                await drive_link(
                    conn,
                    xfer,
                    self.wakeup,
                    self.gate,
                    io_timeout=settings.transfer.io_timeout,
                    progress=progress,
                )

        publish_transfer(c.events, "send", self.xid, self.meta, peer.name, "started", 0)
        try:
            await budget.run(attempt)
        except BaseException:
            publish_transfer(c.events, "send", self.xid, self.meta, peer.name, "failed", acked())
            raise
        publish_transfer(c.events, "send", self.xid, self.meta, peer.name, "done", self.meta.nbytes)
        assert xfer is not None
        return xfer

    async def _direct(self, head: str, reason: str) -> ChainOutcome:
        """The origin's fallback for a peer that cannot be linked (``reason``): an ordinary
        send, whose chunk size that peer's agreement chooses."""
        c = self.chain
        try:
            peer = await c.peers.get(parse_address(head))
            result = await c.outbound.send(peer, self.meta, self.data)
        except (TensorError, *RETRIABLE) as exc:
            return ChainOutcome(head, "failed", why(exc)[:512])
        detail = f"{reason}: sent directly by the origin"
        return ChainOutcome(head, "direct", detail, result.bytes_sent, result.bytes_resent)


class Relay:
    """A receive's forwarding to the rest of its chain (the receiver's ``Forwarder``)."""

    def __init__(self, chain: Chain, begin: Begin, recv: ReceiveTransfer) -> None:
        assert begin.chain
        self.begin = begin
        self.downstream = begin.chain
        self.arriving = Arriving(recv)
        self.wakeup = _Wakeup()
        self.done = trio.Event()
        self.outcomes: tuple[ChainOutcome, ...] = ()
        self._chain = chain
        self._scope = trio.CancelScope()
        self._links = _Links(
            chain,
            begin.id,
            begin.meta,
            recv.dest,
            begin.chunk_size,
            arriving=self.arriving,
            wakeup=self.wakeup,
        )

    def arrived(self) -> None:
        """The receive got chunks: wake the link if some are new."""
        if self.arriving.poll():
            self.wakeup.set()

    async def hold_data(self) -> None:
        """The receive is about to be committed: stop reading its buffer (see
        :class:`DataGate`: a send still holding it after a quarter of ``io_timeout`` is cut,
        well before the upstream's and the receive's own deadlines)."""
        await self._links.gate.close(self._chain.settings().transfer.io_timeout / 4)

    def use_data(self, data: memoryview) -> None:
        """The committed tensor's bytes: read chunks from there from now on."""
        self._links.gate.reopen(data)

    def cancel(self) -> None:
        """The receive stopped before it completed (its sender will resume it, with a new
        relay): stop forwarding."""
        self._scope.cancel()

    async def run(self) -> None:
        """Forward until the rest of the chain answered (a task of the node's nursery)."""
        outcomes: list[ChainOutcome] = []
        try:
            with self._scope:
                outcomes = await self._links.run(self.downstream)
        except Exception as exc:  # a bug: the chain after us is reported failed
            report_unexpected(log, "peer", f"chain relay of {self.begin.id}", exc)
        finally:
            done = {o.peer for o in outcomes}
            outcomes += [
                ChainOutcome(p, "failed", "the relay stopped")
                for p in self.downstream
                if p not in done
            ]
            self.outcomes = tuple(outcomes)
            self.done.set()

    async def stored(self, upstream: Connection, io_timeout: float) -> Stored:
        """The ``Stored`` to answer upstream, once the rest of the chain answered.

        Waited for outside the receive's inactivity deadline (the downstream may be repairing),
        with an ``Ack`` upstream every quarter of it so the sender's deadline does not fire
        either. It ends when the relay does: its links have deadlines of their own, and the
        node's shutdown cancels it.
        """
        nchunks = self.arriving.recv.nchunks
        with trio.CancelScope(shield=True):
            while not self.done.is_set():
                with trio.move_on_after(io_timeout / 4):
                    await self.done.wait()
                if not self.done.is_set():
                    await upstream.stream.send(Ack(self.begin.id, nchunks))
        return Stored(self.begin.id, self.outcomes)


class Chain:
    """A node's chain broadcasts: the origin's :meth:`broadcast` and the receiver's
    :meth:`relay` hook. ``settings`` is called for the current settings (they are reloaded)."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        *,
        node_id: str,
        peers: Peers,
        outbound: Outbound,
        events: EventBus,
        ids: TransferIds,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.peers = peers
        self.outbound = outbound
        self.events = events
        self.ids = ids

    def relay(self, begin: Begin, recv: ReceiveTransfer) -> Relay:
        return Relay(self, begin, recv)

    async def broadcast(
        self, peers: Sequence[tuple[str, PeerAddress]], meta: TensorMeta, data: memoryview
    ) -> BroadcastResult:
        """Send ``data`` down a chain of ``peers`` ((name, address) pairs, in chain order)."""
        tickets = _tickets(peers, self.node_id)
        names = {t: name for name, t in zip((n for n, _ in peers), tickets, strict=True)}
        xid = self.ids.next()
        started = time.perf_counter()
        links = _Links(self, xid, meta, data, None, arriving=None, wakeup=_Wakeup())
        outcomes = {o.peer: o for o in await links.run(tickets)}
        # Peers a relay could not reach for want of the feature: the origin serves them.
        while fallback := [t for t in tickets if outcomes[t].status == "fallback"]:
            why_direct = outcomes[fallback[0]].detail
            for o in await links.run(fallback):
                if o.status == "stored":  # chained again, from the origin
                    o = replace(o, status="direct", detail=why_direct)
                outcomes[o.peer] = o
        result = BroadcastResult(
            xid,
            meta.name,
            meta.nbytes,
            time.perf_counter() - started,
            tuple(_outcome(names[t], outcomes[t]) for t in tickets),
        )
        log.info(
            "tensor transfer %s: broadcast %r to %d peers in %.3f s: %s",
            xid,
            meta.name,
            len(tickets),
            result.seconds,
            ", ".join(f"{o.peer} {o.status}" for o in result.outcomes),
        )
        return result


def _outcome(name: str, o: ChainOutcome) -> PeerOutcome:
    return PeerOutcome(name, o.status, o.detail, o.sent, o.resent, o.skipped)


def _tickets(peers: Sequence[tuple[str, PeerAddress]], me: str) -> list[str]:
    """The chain's entries: one ticket per distinct peer, never this node; at most
    ``MAX_CHAIN``."""
    if not peers:
        raise BadAddress("a broadcast needs at least one peer")
    if len(peers) > MAX_CHAIN:
        raise BadAddress(f"a broadcast reaches at most {MAX_CHAIN} peers, not {len(peers)}")
    out: list[str] = []
    seen: set[tuple[str, int]] = set()
    for name, addr in peers:
        if addr.node_id == me:
            raise BadAddress(f"{name!r} is this node: a broadcast goes to other peers")
        key = (addr.host, addr.port)
        if key in seen:
            raise BadAddress(f"peer {name!r} is named twice")
        seen.add(key)
        out.append(addr.ticket())
    return out


__all__ = ["BroadcastResult", "Chain", "PeerOutcome", "Relay", "drive_link"]
