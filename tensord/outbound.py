"""The transfers a node starts: sends and pulls, under one retry policy.

A send pushes a tensor to a peer; a pull asks a peer for one and receives it. Either can be cut
midway (a flaky link, a restarted peer), and both recover the same way, which is why there is
one :class:`RetryBudget` for them: an attempt that fails with a retriable error is tried again
on a new connection after a backoff (:func:`retry_backoff`), resuming from what already moved;
the budget (``tensor_protocol.max_retries``) counts consecutive attempts that moved nothing, so
a long transfer that keeps making progress is not failed by the interruptions it survives.

Both run in the caller's task (the node wraps them in a cancel scope of its own); nothing here
spawns a task per transfer, which matters for small-tensor latency.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import trio

from .backoff import Backoff
from .buffers import ReceiveBuffers
from .config import Settings, TensorProtocolSettings
from .errors import (
    BadTensor,
    PeerUnreachable,
    ProtocolError,
    TensorError,
    TensorNotFound,
    TransferFailed,
)
from .events import EventBus
from .net.connection import (
    Connection,
    receive_chunked,
    receive_legacy,
    send_chunked,
    send_legacy,
)
from .net.quic import QuicStreamTransport
from .net.stream import ConnectionClosed
from .peers import Peer
from .results import TransferIds, TransferResult, publish_transfer, why
from .sending import chunk_size, new_send
from .sink import Sink, check_destination, new_receive, open_sink
from .store import TensorStore
from .wire.messages import Begin, Error, Legacy, Request
from .wire.meta import TensorMeta
from .wire.transfer import ReceiveTransfer, SendTransfer

log = logging.getLogger("tensord.transfer")
T = TypeVar("T")

MAX_BACKOFF = 5.0
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


def retry_backoff(base_ms: int) -> Backoff:
    """The transfers' retry policy: ``tensor_protocol.retry_base_delay`` (milliseconds, as
    Ollama spells it) doubling per attempt that moved nothing, capped at 5 s, +-20 %."""
    return Backoff(base=base_ms / 1000, cap=MAX_BACKOFF)


class RetryBudget:
    """Runs one transfer's attempts until one succeeds or the budget is spent.

    ``progress`` says how many bytes the transfer has moved so far: an attempt that moved some
    before it failed starts the count of stalled attempts again. ``what`` names the transfer in
    logs and errors ("sending 'w' to b"). ``on_retry`` hears each failure that will be retried.
    With ``unreachable``, a budget spent before any attempt got a connection ends in
    :class:`PeerUnreachable` (a send's error), else in :class:`TransferFailed`. An attempt
    sets :attr:`connected` once it has one.
    """

    def __init__(
        self,
        proto: TensorProtocolSettings,
        what: str,
        progress: Callable[[], int],
        *,
        xid: str = "",
        peer: str = "",
        unreachable: bool = False,
        on_retry: Callable[[int, BaseException], None] | None = None,
    ) -> None:
        self.max_retries = proto.max_retries
        self._base_ms = proto.retry_base_delay
        self._backoff: Backoff | None = None  # built at the first retry: most transfers have none
        self.what = what
        self.progress = progress
        self.xid = xid
        self.peer = peer
        self.unreachable = unreachable
        self.on_retry = on_retry
        self.retries = 0
        self.stalled = 0  # consecutive attempts that moved nothing
        self.connected = False

    @property
    def backoff(self) -> Backoff:
        if self._backoff is None:
            self._backoff = retry_backoff(self._base_ms)
        return self._backoff

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        while True:
            before = self.progress()
            try:
                return await attempt()
            except RETRIABLE as exc:
                self.retries += 1
                self.stalled = 0 if self.progress() > before else self.stalled + 1
                if self.stalled > self.max_retries or not self.max_retries:
                    raise self._spent(exc) from None
                delay = self.backoff.delay(self.stalled)
                log.info(
                    "tensor transfer %s: %s: attempt %d failed (%s); retrying in %.2f s%s",
                    self.xid or "-",
                    self.what,
                    self.retries,
                    why(exc),
                    delay,
                    f", resuming at {before} bytes" if before else "",
                )
                if self.on_retry is not None:
                    self.on_retry(self.retries, exc)
                await trio.sleep(delay)

    def _spent(self, exc: BaseException) -> TensorError:
        if self.unreachable and not self.connected and isinstance(exc, PeerUnreachable):
            return PeerUnreachable(
                f"cannot reach peer {self.peer} after {self.retries} attempts: {exc}"
            )
        return TransferFailed(f"{self.what} failed after {self.retries} attempts: {why(exc)}")


class _PulledPartial:
    """A pull's receive, kept across its attempts so that a retry resumes it."""

    def __init__(self) -> None:
        self.xfer: ReceiveTransfer | None = None
        self.sink: Sink | None = None

    @property
    def bytes_have(self) -> int:
        return self.xfer.bytes_have if self.xfer is not None else 0

    async def discard(self) -> None:
        if self.sink is not None:
            await self.sink.discard()
        self.xfer = self.sink = None


def _transport_of(conn: Connection) -> str:
    return "quic" if isinstance(conn.stream.transport, QuicStreamTransport) else "tcp"


def _only_cancelled(exc: BaseException) -> bool:
    """``trio.Cancelled``, or an exception group holding nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


class Outbound:
    """Sends and pulls of one node. ``settings`` is replaced when the node is reconfigured."""

    def __init__(
        self,
        settings: Settings,
        *,
        events: EventBus,
        ids: TransferIds,
        store: TensorStore | None,
        buffers: ReceiveBuffers | None = None,
    ) -> None:
        self.settings = settings
        self._events = events
        self._ids = ids
        self._store = store
        self._buffers = buffers

    def _publish(self, *args: Any, **kwargs: Any) -> None:
        publish_transfer(self._events, *args, **kwargs)

    # -- sending -------------------------------------------------------------------------------

    async def send(self, peer: Peer, meta: TensorMeta, data: memoryview) -> TransferResult:
        """Send ``data`` as ``meta`` until the peer confirms it stored it (or the budget ends)."""
        t = self.settings.transfer
        name = peer.name  # a property formatting an address: read once per send
        xid = self._ids.next()
        xfer: SendTransfer | None = None
        legacy = False
        transport = "tcp"
        started = time.perf_counter()

        def acked() -> int:
            return xfer.bytes_acked if xfer is not None else 0

        def retried(retries: int, exc: BaseException) -> None:
            self._publish("send", xid, meta, name, "retry", acked(), retries, why(exc))

        budget = RetryBudget(
            self.settings.tensor_protocol,
            f"sending {meta.name!r} to {name}",
            acked,
            xid=xid,
            peer=name,
            unreachable=True,
            on_retry=retried,
        )

        def progress(done: int) -> None:
            if self._events.active:
                self._publish("send", xid, meta, name, "progress", done, budget.retries)

        async def attempt() -> None:
            nonlocal xfer, legacy, transport
            async with peer.pool.connection() as conn:
                budget.connected = True
                transport = _transport_of(conn)
                agr = conn.agreement
                if not agr.chunked:
                    legacy = True
                    await send_legacy(conn, meta, data, io_timeout=t.io_timeout)
                    return
                chunk = chunk_size(self.settings, meta, agr)
                resume = xfer is not None and agr.resume
                if xfer is None or xfer.crc != agr.crc or xfer.chunk_size != chunk:
                    xfer = new_send(self.settings, xid, meta, data, agr, chunk)
                    resume = False
                await send_chunked(
                    conn, xfer, resume=resume, io_timeout=t.io_timeout, progress=progress
                )

        if self._events.active:  # (the call and its arguments only if someone listens)
            self._publish("send", xid, meta, name, "started", 0)
        try:
            await budget.run(attempt)
        except (TransferFailed, PeerUnreachable) as exc:  # refused, or the budget is spent
            log.warning("tensor transfer %s: %r with %s failed: %s", xid, meta.name, name, exc)
            self._publish("send", xid, meta, name, "failed", 0, budget.retries, str(exc))
            raise
        except TensorError:
            raise
        except BaseException as exc:
            # The caller went away (a CLI's Ctrl-C, a shutdown), or something unexpected: say
            # so, so that nobody watching the events stream waits for this transfer forever.
            # (A cancellation may arrive wrapped in an exception group from a nursery inside.)
            detail = "cancelled" if _only_cancelled(exc) else why(exc)
            self._publish("send", xid, meta, name, "failed", acked(), budget.retries, detail)
            raise
        seconds = time.perf_counter() - started
        stats = xfer.stats if xfer is not None and not legacy else None
        result = TransferResult(
            xid,
            meta.name,
            name,
            meta.nbytes,
            seconds,
            budget.retries,
            bytes_sent=stats.bytes_sent if stats else meta.nbytes,
            bytes_resent=stats.bytes_resent if stats else 0,
            chunks_compressed=(
                xfer.compressor.compressed_chunks if xfer is not None and xfer.compressor else 0
            ),
            nacks=stats.nacks if stats else 0,
            legacy=legacy,
            transport=transport,
        )
        if log.isEnabledFor(logging.INFO):  # (its arguments are not computed per tensor else)
            log.info(
                "tensor transfer %s: sent %r to %s: %d bytes in %.3f s (%.1f MB/s), %d retries%s",
                xid,
                meta.name,
                name,
                meta.nbytes,
                seconds,
                result.rate / 1e6,
                budget.retries,
                " (legacy mode)" if legacy else "",
            )
        if self._events.active:  # (the call and its arguments only if someone listens)
            self._publish("send", xid, meta, name, "done", meta.nbytes, budget.retries)
        return result

    # -- pulling -------------------------------------------------------------------------------

    async def pull(
        self,
        peer: Peer,
        name: str,
        as_name: str | None,
        *,
        out: np.ndarray[Any, Any] | None = None,
    ) -> np.ndarray[Any, Any]:
        """Fetch ``name`` from ``peer`` (kept as ``as_name`` with a store; landing in ``out``
        when given); a retry resumes what earlier attempts received."""
        t = self.settings.transfer
        kept = _PulledPartial()  # what an interrupted attempt received, for the next one
        what = f"pulling {name!r} from {peer.name}"
        budget = RetryBudget(self.settings.tensor_protocol, what, lambda: kept.bytes_have)

        async def attempt() -> np.ndarray[Any, Any]:
            try:
                async with peer.pool.connection() as conn:
                    if "pull" not in conn.agreement.features:
                        raise TransferFailed(
                            f"peer {peer.name} does not support pull", code="unsupported"
                        )
                    resume = kept.xfer.id if kept.xfer is not None else None
                    await conn.stream.send(Request(name, resume))
                    with trio.fail_after(t.io_timeout):
                        first = await conn.stream.receive()
                    if isinstance(first, Begin | Legacy):
                        if first.meta.name != name:
                            raise ProtocolError(f"asked for {name!r}, got {first.meta.name!r}")
                        return await self._receive_pulled(conn, first, peer, as_name, kept, out)
                    if not isinstance(first, Error):
                        raise ProtocolError(f"unexpected {type(first).__name__} in reply to a pull")
                    if first.code == "bad_name":  # the same name would fail again
                        raise BadTensor(f"peer {peer.name}: {first.message}")
                    if first.code != "not_found":
                        raise ProtocolError(f"peer {peer.name}: {first.message}", code=first.code)
            except ProtocolError as exc:
                if exc.code == "too_large":
                    # Chunking beyond the bounds (the owner's, or its refusal of ours): the
                    # same tensor would fail the same way again.
                    raise TransferFailed(
                        f"pulling {name!r} from {peer.name}: {exc}", code="too_large"
                    ) from None
                raise
            # Not found: raised once the connection went back to the pool (it stays usable).
            raise TensorNotFound(f"peer {peer.name} has no tensor {name!r}")

        try:
            return await budget.run(attempt)
        finally:
            with trio.CancelScope(shield=True):
                await kept.discard()

    async def _receive_pulled(
        self,
        conn: Connection,
        first: Begin | Legacy,
        peer: Peer,
        as_name: str | None,
        kept: _PulledPartial,
        out: np.ndarray[Any, Any] | None = None,
    ) -> np.ndarray[Any, Any]:
        """Receive a pulled tensor into a sink; with a store it is committed before returning.
        What an interrupted attempt received stays in ``kept`` for the next attempt to resume."""
        t = self.settings.transfer
        xid = first.id if isinstance(first, Begin) else self._ids.next()
        arrays: list[np.ndarray[Any, Any]] = []
        if out is not None:
            check_destination(first.meta, out)  # before any byte lands in it
        into = out if self._store is None else None
        if isinstance(first, Begin) and kept.xfer is not None and kept.xfer.matches(first):
            xfer, sink = kept.xfer, kept.sink
            assert sink is not None
            replies = xfer.rebegin(first, lz4=conn.agreement.lz4)
        else:
            await kept.discard()  # the peer started over (or never was asked to resume)
            key = f"pull/{peer.name}/{secrets.token_hex(8)}"
            if isinstance(first, Begin):
                xfer, sink = new_receive(
                    self._store, conn, first, key, as_name, into=into, buffers=self._buffers
                )
                replies = [xfer.accept()] if first.resume else []
                kept.xfer, kept.sink = xfer, sink
            else:
                sink = open_sink(
                    self._store, first.meta, key, None, as_name, into=into, buffers=self._buffers
                )
                replies = []
        if replies:
            await conn.stream.send(*replies)
        meta = first.meta

        def progress(done: int) -> None:
            if self._events.active:
                self._publish("receive", xid, meta, peer.name, "progress", done)

        async def complete() -> None:
            arrays.append(await sink.commit(peer.name))

        self._publish("receive", xid, meta, peer.name, "started", kept.bytes_have)
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
                self._publish("receive", xid, meta, peer.name, "interrupted", kept.bytes_have)
                if not isinstance(first, Begin):
                    with trio.CancelScope(shield=True):
                        await sink.discard()
        self._publish("receive", xid, meta, peer.name, "done", meta.nbytes)
        if out is not None and arrays[0] is not out:
            np.copyto(out, arrays[0], casting="no")  # stored first (a node with a store)
            return out
        return arrays[0]


__all__ = ["MAX_BACKOFF", "RETRIABLE", "Outbound", "RetryBudget", "retry_backoff"]
