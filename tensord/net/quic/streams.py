"""One bidirectional QUIC stream as a :class:`~tensord.net.stream.ByteTransport`.

The stream's receive buffer (a deque of the packets aioquic delivered, counted in bytes: what
flow control grants credit in) and the Trio parking lots its reader and writer wait in; the
session feeds it events and moves its credit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from ...wire.frames import FrameDecoder
from ..connection import Connection
from ..stream import BufferLike
from .codes import E_NONE

if TYPE_CHECKING:
    from .session import QuicSession

#: Makes the frame decoder of each stream (a stream is one :class:`Connection`).
DecoderFactory = Callable[[], FrameDecoder]
#: Serves one inbound stream, handshaken, as a :class:`Connection`.
Handler = Callable[[Connection], Awaitable[None]]


class QuicStreamTransport:
    """One bidirectional QUIC stream as a :class:`~tensord.net.stream.ByteTransport`.

    ``recv_into`` copies from the packets aioquic delivered into the caller's buffer (aioquic
    decrypts into new ``bytes`` per packet, so one copy is unavoidable); ``send_buffers``
    copies into aioquic's send buffer, bounded as described in docs/QUIC.md ("Flow control
    and back-pressure"). ``fileno`` is -1: there is no descriptor per stream.
    """

    def __init__(self, session: QuicSession, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # into _chunks[0]
        self._buffered = 0
        self._consumed = 0
        self._eof = False
        self._recv_error: str | None = None  # why receiving is broken
        self._send_error: str | None = None
        self._fin_sent = False
        self._closed_by_app = False
        self._sending = False
        self._readers = trio.lowlevel.ParkingLot()
        self._writers = trio.lowlevel.ParkingLot()
        #: Bytes handed to aioquic so far, and high-water marks: for tests and diagnostics.
        self.bytes_queued = 0
        self.max_receive_buffered = 0
        self.max_send_buffered = 0

    @property
    def session(self) -> QuicSession:
        """The QUIC connection this stream belongs to."""
        return self._session

    @property
    def receive_buffered(self) -> int:
        """Bytes received and not yet read by the application."""
        return self._buffered

    @property
    def send_buffered(self) -> int:
        """Bytes handed to aioquic and not yet acknowledged by the peer."""
        return self._session.quic.send_buffered(self.stream_id)

    # -- ByteTransport -----------------------------------------------------------------------

    async def recv_into(self, buf: memoryview, nbytes: int) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._chunks:
            if self._closed_by_app:
                raise trio.ClosedResourceError("the stream was closed")
            if self._recv_error is not None:
                raise trio.BrokenResourceError(self._recv_error)
            if self._eof:
                return 0
            await self._readers.park()
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        want = min(nbytes, len(buf))
        chunks = self._chunks
        n = 0
        while n < want and chunks:
            head = chunks[0]
            off = self._offset
            k = min(len(head) - off, want - n)
            if off == 0 and k == len(head):
                buf[n : n + k] = head
                chunks.popleft()
            else:
                buf[n : n + k] = memoryview(head)[off : off + k]
                if off + k == len(head):
                    chunks.popleft()
                    self._offset = 0
                else:
                    self._offset = off + k
            n += k
        self._buffered -= n
        self._consumed += n
        self._session._consumed(self, n)
        return n

    async def send_buffers(self, buffers: Sequence[BufferLike]) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._sending = True
        session = self._session
        limit = session.tuning.send_buffer
        try:
            for b in buffers:
                view = memoryview(b).cast("B")
                while view:
                    self._check_send()
                    room = limit - self.send_buffered
                    if room <= 0:
                        session._blocked_writers.add(self)
                        await self._writers.park()
                        continue
                    piece = view[:room]
                    # aioquic types ``data`` as bytes; it only does ``bytearray += data``.
                    session.quic.send_stream_data(self.stream_id, piece)  # type: ignore[arg-type]
                    view = view[len(piece) :]
                    self.bytes_queued += len(piece)
                    buffered = self.send_buffered
                    if buffered > self.max_send_buffered:
                        self.max_send_buffered = buffered
                    session.flush()
        finally:
            self._sending = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        """Send FIN, tell the peer to stop sending (if it has not finished), forget the stream.

        Buffered unread data is dropped and its connection-level credit returned.
        """
        self._close()
        await trio.lowlevel.checkpoint()

    def fileno(self) -> int:
        return -1

    def looks_alive(self) -> bool:
        """For an idle pooled connection: usable, and nothing unexpected waiting to be read.

        ``Connection.looks_alive`` cannot ``select`` a QUIC stream (``fileno`` is -1); it
        should ask this instead (see the integration notes).
        """
        return (
            not self._closed_by_app
            and self._recv_error is None
            and self._send_error is None
            and not self._eof
            and not self._chunks
            and self._session.failure is None
        )

    # -- used by the session ----------------------------------------------------------------

    def _feed(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            self._session.quic.app_buffered += len(data)
            if self._buffered > self.max_receive_buffered:
                self.max_receive_buffered = self._buffered
        if end:
            self._eof = True
        self._readers.unpark_all()

    def _fail(self, why: str, *, receive: bool = True, send: bool = True) -> None:
        if receive and self._recv_error is None and not self._eof:
            self._recv_error = why
        if send and self._send_error is None:
            self._send_error = why
        self._readers.unpark_all()
        self._writers.unpark_all()

    def _check_send(self) -> None:
        if self._closed_by_app or self._fin_sent:
            raise trio.ClosedResourceError("the stream was closed")
        if self._send_error is not None:
            raise trio.BrokenResourceError(self._send_error)

    def _close(self) -> None:
        if self._closed_by_app:
            return
        self._closed_by_app = True
        session = self._session
        if session.failure is None:
            quic = session.quic
            try:
                if not self._fin_sent and self._send_error is None:
                    quic.send_stream_data(self.stream_id, b"", end_stream=True)
                if not self._eof and self._recv_error is None:
                    quic.stop_stream(self.stream_id, E_NONE)
            except (ValueError, RuntimeError, AssertionError):
                pass  # aioquic already finished or reset the stream
            session.flush()
        self._fin_sent = True
        session.quic.app_buffered -= self._buffered
        self._chunks.clear()
        self._buffered = 0
        self._readers.unpark_all()
        self._writers.unpark_all()
        session._stream_closed(self)
