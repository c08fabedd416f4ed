"""One connection to a peer, and the loops that drive the wire state machines over it.

These are the "ten-line loops" of the h11 pattern: read a message, feed the sans-I/O state
machine, write what it says to write. Time lives here too: a transfer attempt fails when neither
direction has made progress for ``io_timeout`` seconds (a deadline pushed forward by every frame
sent or received), rather than having a fixed total duration.
"""

from __future__ import annotations

import logging
import math
import select
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from ..errors import AuthenticationFailed, ProtocolError, TransferFailed
from ..wire.auth import ClusterKey, check_auth, check_reply, listener_reply, with_challenge
from ..wire.compress import lz4_bound
from ..wire.crc import crc32c
from ..wire.frames import encode
from ..wire.handshake import Agreement, accept_reply, answer_hello
from ..wire.messages import (
    Accept,
    Auth,
    Chunk,
    End,
    Error,
    Hello,
    Legacy,
    Message,
    Stored,
)
from ..wire.meta import TensorMeta
from ..wire.transfer import Placement, ReceiveTransfer, SendState, SendTransfer
from .stream import ConnectionClosed, FramedStream

log = logging.getLogger("tensord.net")

#: Errors of the peer's that end a transfer for good (retrying cannot help).
FINAL_ERROR_CODES = frozenset(
    {
        "too_large",
        "bad_name",
        "bad_dtype",
        "bad_meta",
        "not_found",
        "quota",
        "refused",
        "exists",
        "auth",
    }
)

Progress = Callable[[int], None]


@dataclass(eq=False)
class Connection:
    """A handshaken connection: framing plus what the two sides agreed."""

    stream: FramedStream
    agreement: Agreement
    outbound: bool
    created: float = field(default_factory=trio.current_time)
    last_used: float = field(default_factory=trio.current_time)
    closed: bool = False
    _scratch: bytearray | None = None

    @property
    def peer_id(self) -> str:
        return self.agreement.peer_id

    def scratch(self, n: int) -> memoryview:
        """A reusable buffer of at least ``n`` bytes (compressed chunk payloads)."""
        if self._scratch is None or len(self._scratch) < n:
            self._scratch = bytearray(n)
        return memoryview(self._scratch)[:n]

    def looks_alive(self) -> bool:
        """An idle connection must have nothing to read: EOF or stray bytes mean it is dead."""
        if self.closed:
            return False
        fd = self.stream.transport.fileno()
        if fd < 0:  # no socket to poll (a QUIC stream, a TLS or memory stream): ask the transport
            alive = getattr(self.stream.transport, "looks_alive", None)
            return (alive is None or bool(alive())) and not self.stream.decoder.buffered
        try:
            readable, _, _ = select.select([fd], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable and not self.stream.decoder.buffered

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.stream.aclose()

    async def send_error(self, code: str, message: str, xid: str | None = None) -> None:
        """Best-effort: tell the peer why we are about to close."""
        with (
            trio.move_on_after(1),
            suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self.stream.send(Error(code, message, xid))


async def client_handshake(
    stream: FramedStream, hello: Hello, key: ClusterKey | None = None
) -> Connection:
    """Dialer side. With ``key``, the hello carries a challenge, the listener's proof is checked
    and our ``Auth`` is sent (it travels with the first request; nothing waits for it)."""
    if key is not None:
        hello = with_challenge(hello)
    await stream.send(hello)
    reply = await stream.receive()
    if isinstance(reply, Error):
        raise ProtocolError(f"peer refused the handshake: {reply.message}", code=reply.code)
    if not isinstance(reply, Hello):
        raise ProtocolError(f"expected hello, got {type(reply).__name__}")
    agreement = accept_reply(hello, reply)
    try:
        auth = check_reply(key, hello, reply)
    except ProtocolError as exc:
        await _refuse(stream, exc)
        raise
    if auth is not None:
        await stream.send(auth)
    return Connection(stream, agreement, outbound=True)


async def server_handshake(
    stream: FramedStream, hello: Hello, key: ClusterKey | None = None
) -> Connection:
    """Listener side. With ``key``, nothing but a valid ``Auth`` is read after our reply."""
    try:
        first = await stream.receive()
    except ProtocolError as exc:  # a malformed hello (a max chunk below 4 KiB, say): say why
        await _refuse(stream, exc)
        raise
    if not isinstance(first, Hello):
        raise ProtocolError(f"expected hello, got {type(first).__name__}")
    try:
        reply, agreement = answer_hello(hello, first)
        reply, expected = listener_reply(key, first, reply)
    except ProtocolError as exc:
        await _refuse(stream, exc)
        raise
    await stream.send(reply)
    if expected is not None:
        auth = await stream.receive()
        if isinstance(auth, Error):
            raise ProtocolError(
                f"peer {first.node!r} refused the handshake: {auth.message}", code=auth.code
            )
        try:
            if not isinstance(auth, Auth):
                raise ProtocolError(
                    f"peer {first.node!r} sent {type(auth).__name__} before authenticating",
                    code="auth",
                )
            check_auth(expected, auth, first.node)
        except ProtocolError as exc:
            await _refuse(stream, exc)
            raise
    return Connection(stream, agreement, outbound=False)


async def _refuse(stream: FramedStream, exc: ProtocolError) -> None:
    """Best effort: tell the peer why the handshake ends, so both sides log the cause."""
    with (
        trio.move_on_after(1),
        suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed),
    ):
        await stream.send(Error(exc.code, str(exc)))


class Deadline:
    """An inactivity timeout: ``touch()`` on progress; the scope is cancelled when idle too long.

    Moving a cancel scope's deadline re-sorts trio's deadline heap, so ``touch`` moves it only
    after ``slack`` (a twentieth of the timeout) has passed since the last move: the timeout fires
    between 1.05 and 1.1 times ``timeout`` after the last progress, for one heap update per
    twentieth of the timeout instead of one per frame.
    """

    def __init__(self, scope: trio.CancelScope, timeout: float, *, armed: bool = False) -> None:
        self.scope = scope
        self.timeout = timeout
        self.slack = timeout / 20
        if not armed:
            scope.deadline = trio.current_time() + timeout + 2 * self.slack

    @classmethod
    def open(cls, timeout: float) -> Deadline:
        """A new scope with the deadline set at construction (cheaper than moving it after)."""
        scope = trio.CancelScope(deadline=trio.current_time() + timeout * 1.1)
        return cls(scope, timeout, armed=True)

    def touch(self) -> None:
        now = trio.current_time()
        if now + self.timeout + self.slack > self.scope.deadline:
            self.scope.deadline = now + self.timeout + 2 * self.slack

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No inactivity timeout inside (work with bounds of its own); a full one after."""
        self.scope.deadline = math.inf
        try:
            yield
        finally:
            self.scope.deadline = trio.current_time() + self.timeout + 2 * self.slack


async def send_chunked(
    conn: Connection,
    xfer: SendTransfer,
    *,
    resume: bool,
    io_timeout: float,
    progress: Progress | None = None,
) -> None:
    """Drive one attempt of a chunked send until the peer says ``Stored``.

    A fresh attempt streams ``Begin`` and the first chunks without waiting for a reply; a tensor
    that fits one chunk goes out as one write (``Begin`` + chunk + ``End``) and costs one round
    trip. A resumed attempt waits for ``Accept`` to learn what to skip.
    Raises ``TransferFailed`` on the peer's refusal, ``TimeoutError`` on inactivity, and
    ``ConnectionClosed``/``OSError``/``ProtocolError`` when the connection breaks.
    """
    stream = conn.stream
    begin = xfer.begin(resume=resume)
    deadline = Deadline.open(io_timeout)
    with deadline.scope as scope:
        if resume:
            await stream.send(begin)
            reply = await stream.receive()
            if isinstance(reply, Error):
                _raise_peer_error(reply, xfer.meta.name)
            if not isinstance(reply, Accept):
                raise ProtocolError(f"expected accept, got {type(reply).__name__}")
            xfer.on_message(reply)
            deadline.touch()
            pending_begin = b""
        elif xfer.nchunks == 1:
            # A tensor that fits one chunk: Begin, the chunk and End in one write, then only the
            # reply is awaited (the loop below reads it; a Nack resends the chunk alone). No
            # progress report: the transfer's "done" follows the one reply.
            out = xfer.next_chunk()
            assert out is not None
            await stream.send_with_payload(
                out.header, out.payload, encode(begin), encode(xfer.end()), reply_next=True
            )
            pending_begin = b""
            progress = None
        else:
            pending_begin = encode(begin)

        if xfer.crc and xfer.nchunks >= PRECOMPUTE_MIN_CHUNKS:
            await _with_crc_worker(
                xfer, _send_loop(stream, xfer, deadline, pending_begin, progress)
            )
        else:
            await _send_loop(stream, xfer, deadline, pending_begin, progress)
    if scope.cancelled_caught:
        raise TimeoutError(f"no progress for {io_timeout:g} s")
    if xfer.state is SendState.FAILED:
        assert xfer.error is not None
        _raise_peer_error(xfer.error, xfer.meta.name)


#: Transfers of at least this many chunks checksum ahead in a worker thread.
PRECOMPUTE_MIN_CHUNKS = 8


async def _with_crc_worker(xfer: SendTransfer, loop: Coroutine[Any, Any, None]) -> None:
    """Run ``loop`` while a worker thread computes the chunks' crc32c ahead of it."""
    stop = [False]
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(trio.to_thread.run_sync, xfer.precompute_crcs, stop, abandon_on_cancel=True)
        )
        try:
            await loop
        except BaseException as exc:  # re-raised below, unwrapped by the nursery
            failure = exc
        finally:
            stop[0] = True
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _send_loop(
    stream: FramedStream,
    xfer: SendTransfer,
    deadline: Deadline,
    pending_begin: bytes,
    progress: Progress | None,
) -> None:
    # One task both sends and reads: it sends while the window is open and reads a reply
    # when it is full (or everything is sent). Replies are a few bytes per window, so
    # leaving them in the socket while sending cannot block the receiver.
    while xfer.state in (SendState.SENDING, SendState.ENDED):
        out = xfer.next_chunk()
        if out is not None:
            # The last chunk carries End in the same write: one syscall, one round trip.
            after = encode(xfer.end()) if xfer.wants_end else b""
            await stream.send_with_payload(out.header, out.payload, pending_begin, after)
            pending_begin = b""
            deadline.touch()
        elif xfer.wants_end:  # an empty tensor, or the last chunk was resent
            await stream.send_with_payload(xfer.end(), b"", pending_begin)
            pending_begin = b""
            deadline.touch()
        else:
            msg = await stream.receive()
            if stream.decoder.payload_pending:
                raise ProtocolError(f"unexpected payload on {type(msg).__name__}")
            xfer.on_message(msg)
            deadline.touch()
            if progress is not None:
                progress(xfer.bytes_acked)


def _raise_peer_error(err: Error, name: str) -> None:
    if err.code == "auth":
        raise AuthenticationFailed(f"peer refused us: {err.message}")
    if err.code in FINAL_ERROR_CODES:
        raise TransferFailed(f"peer refused tensor {name!r}: {err.message}", code=err.code)
    raise ProtocolError(f"peer reported an error for {name!r}: {err.message}", code=err.code)


async def receive_chunked(
    conn: Connection,
    xfer: ReceiveTransfer,
    *,
    io_timeout: float,
    progress: Progress | None = None,
    on_complete: Callable[[], Awaitable[Stored | None]] | None = None,
    scope: trio.CancelScope | None = None,
    complete_waits: bool = True,
) -> None:
    """Drive a chunked receive until the tensor is complete (``Stored`` sent) or fails.

    Uncompressed payloads are received straight into the destination array. ``on_complete``
    runs once the tensor is verified and *before* ``Stored`` is sent, so that when the sender
    hears ``Stored`` the tensor is already visible (and, with a store, durable) on this node;
    a ``Stored`` it returns is sent instead (a chain relay's, with its successors' outcomes).
    With ``complete_waits`` false the caller promises that ``on_complete`` returns at once
    (an in-memory commit), so the inactivity timeout is not paused around it.

    ``scope``: the caller's cancel scope to run in (the receiver's per-receive scope, which a
    superseding transfer cancels): the inactivity deadline is set on it, saving a scope per
    message. A cancel of it before the deadline ends the receive quietly (the caller asks
    ``scope.cancelled_caught``); only the deadline's expiry is a ``TimeoutError``.
    """
    stream = conn.stream
    with trio.CancelScope() if scope is None else scope as scope:
        deadline = Deadline(scope, io_timeout)
        while not xfer.complete:
            msg = await stream.receive()
            deadline.touch()
            if isinstance(msg, Chunk):
                placement, target = xfer.place(msg)
                payload: memoryview | None = None
                if placement is Placement.DIRECT:
                    assert target is not None
                    await stream.receive_payload_into(target)
                    # Hold no view of the destination past its use: a memory-mapped one is
                    # unmapped when the tensor is committed.
                    target = None
                elif placement is Placement.SCRATCH:
                    payload = conn.scratch(msg.wire_len)
                    await stream.receive_payload_into(payload)
                else:
                    await stream.discard_payload()
                replies = xfer.on_chunk(msg, payload)
                if progress is not None:
                    progress(xfer.bytes_have)
            elif isinstance(msg, End):
                replies = xfer.on_end(msg)
            elif isinstance(msg, Error):
                why = msg.message or "(no reason given)"
                raise TransferFailed(
                    f"sender aborted tensor {xfer.meta.name!r}: {why}", code=msg.code
                )
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} during a transfer")
            if xfer.complete and on_complete is not None:
                done, on_complete = on_complete, None
                # The commit (fsync of a large tensor) and a relay's wait for the rest of its
                # chain have bounds of their own; the sender's silence meanwhile is expected.
                if complete_waits:
                    with deadline.paused():
                        stored = await done()
                else:
                    stored = await done()
                if stored is not None:
                    replies = [stored if isinstance(r, Stored) else r for r in replies]
            if replies:
                # Once complete, the connection's next step is reading the peer's next request.
                await stream.send(*replies, reply_next=xfer.complete)
                for r in replies:
                    if isinstance(r, Error):
                        raise TransferFailed(r.message, code=r.code)
    if scope.cancelled_caught and scope.deadline <= trio.current_time():
        raise TimeoutError(f"no progress for {io_timeout:g} s")


async def send_legacy(
    conn: Connection, meta: TensorMeta, data: memoryview, *, io_timeout: float
) -> None:
    """Legacy mode: the whole tensor in one frame, then wait for ``Stored``."""
    crc = crc32c(data) if conn.agreement.crc else None
    with trio.fail_after(io_timeout + meta.nbytes / 50e6):
        await conn.stream.send_with_payload(Legacy(meta, crc, meta.nbytes), data)
        reply = await conn.stream.receive()
    if isinstance(reply, Error):
        _raise_peer_error(reply, meta.name)
    if not isinstance(reply, Stored):
        raise ProtocolError(f"expected stored, got {type(reply).__name__}")


async def receive_legacy(
    conn: Connection,
    msg: Legacy,
    dest: memoryview,
    *,
    io_timeout: float,
    on_complete: Callable[[], Awaitable[None]] | None = None,
) -> bool:
    """Receive a legacy frame's payload into ``dest``; reply and return whether it was intact."""
    with trio.fail_after(io_timeout + msg.meta.nbytes / 50e6):
        await conn.stream.receive_payload_into(dest)
    if conn.agreement.crc and msg.crc is not None and crc32c(dest) != msg.crc:
        await conn.stream.send(Error("checksum", f"tensor {msg.meta.name!r}: crc32c mismatch"))
        return False
    if on_complete is not None:
        await on_complete()
    await conn.stream.send(Stored("0" * 16))
    return True


def compressed_scratch_len(chunk_size: int) -> int:
    return lz4_bound(chunk_size)


__all__ = [
    "FINAL_ERROR_CODES",
    "Connection",
    "ConnectionClosed",
    "Deadline",
    "Message",
    "client_handshake",
    "receive_chunked",
    "receive_legacy",
    "send_chunked",
    "send_legacy",
    "server_handshake",
]
