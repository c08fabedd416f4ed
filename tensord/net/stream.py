"""Frames over a byte transport, with the bulk path kept zero-copy.

Sending: a chunk's header bytes and a memoryview of the array go to the kernel in one
``sendmsg`` (scatter/gather) - the payload is never copied or joined in Python.

Receiving: headers are read with a small read-ahead (``READ_AHEAD`` bytes) into the sans-I/O
:class:`~tensord.wire.frames.FrameDecoder`. When a header announces a payload, the I/O layer
copies the few read-ahead bytes that belong to it and ``recv_into``-s the rest directly into the
destination (a slice of the receiving array). The read-ahead bounds that copy to a few KiB per
chunk while letting one syscall pick up many small frames (acks) at once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Protocol

import trio

from ..wire.frames import FrameDecoder, encode
from ..wire.messages import Message

READ_AHEAD = 8192

BufferLike = bytes | bytearray | memoryview


class ConnectionClosed(Exception):
    """The peer closed the connection (possibly in the middle of a frame)."""


class ByteTransport(Protocol):
    """What a framed stream needs from a transport (TCP socket, TLS stream, QUIC stream)."""

    async def recv_into(self, buf: memoryview, nbytes: int) -> int: ...

    async def send_buffers(self, buffers: Sequence[BufferLike]) -> None: ...

    async def aclose(self) -> None: ...

    def fileno(self) -> int: ...


class SocketTransport:
    """A connected TCP socket: ``recv_into`` and gathered ``sendmsg`` straight to the kernel.

    trio's socket methods put a scheduler pass around every syscall, and the kernel takes a 1 MiB
    chunk in about six partial writes - a few thousand scheduler passes per 256 MiB. Here a
    syscall that makes progress is followed directly by the next; the task waits (and yields)
    only when the kernel says EAGAIN, plus one checkpoint per send for fairness. The socket is a
    ``dup`` of the trio stream's, so trio's own object stays untouched until it is closed.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self.sock.setblocking(False)
        self._sending = False

    async def recv_into(self, buf: memoryview, nbytes: int) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                return self.sock.recv_into(buf, nbytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)

    async def recv_reply_into(self, buf: memoryview, nbytes: int) -> int:
        """:meth:`recv_into` for the reply to what was just sent: it waits for the socket
        first (a cancel and schedule point, and an immediate return when the reply is already
        there) rather than trying a read the peer has almost never answered yet."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                return self.sock.recv_into(buf, nbytes)
            except BlockingIOError:
                continue

    async def send_buffers(self, buffers: Sequence[BufferLike], *, schedule: bool = True) -> None:
        """Write ``buffers`` whole. A cancel point; also a schedule point unless ``schedule`` is
        false (:meth:`FramedStream.send` with ``reply_next``: the read that follows is one)."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this connection")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._sending = True
        try:
            # The common case, a frame or a small chunk: the kernel takes it all at once.
            try:
                sent = self.sock.sendmsg(buffers)
            except BlockingIOError:
                sent = 0
            total = 0
            for b in buffers:
                total += b.nbytes if type(b) is memoryview else len(b)
            if sent < total:
                await self._send_rest(buffers, sent)
        finally:
            self._sending = False
        if schedule:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send_rest(self, buffers: Sequence[BufferLike], sent: int) -> None:
        """What a first ``sendmsg`` left of ``buffers`` (it took ``sent`` bytes)."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        while True:
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if not views:
                return
            if sent:
                views[0] = views[0][sent:]
            try:
                sent = self.sock.sendmsg(views)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                sent = 0

    async def aclose(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        await self.stream.aclose()

    def fileno(self) -> int:
        return self.sock.fileno()


class StreamTransport:
    """Any trio ``Stream`` (e.g. ``trio.SSLStream``, memory streams in tests): one copy in."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._pending: bytes | bytearray = b""

    async def recv_into(self, buf: memoryview, nbytes: int) -> int:
        data = self._pending or await self.stream.receive_some(nbytes)
        n = min(len(data), nbytes)
        buf[:n] = data[:n]
        self._pending = data[n:]
        return n

    async def send_buffers(self, buffers: Sequence[BufferLike]) -> None:
        for b in buffers:
            if len(b):
                await self.stream.send_all(b)

    async def aclose(self) -> None:
        await self.stream.aclose()

    def fileno(self) -> int:
        return -1


class FramedStream:
    """Messages and payloads over a :class:`ByteTransport`."""

    def __init__(self, transport: ByteTransport, decoder: FrameDecoder) -> None:
        self.transport = transport
        self.decoder = decoder
        self._scratch = bytearray(READ_AHEAD)
        self._discard: bytearray | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._socket = transport if isinstance(transport, SocketTransport) else None
        #: A write with ``reply_next`` skipped its schedule point: the next :meth:`receive`
        #: makes it (by waiting for the socket before its first read).
        self._owed = False

    async def send(self, *msgs: Message, reply_next: bool = False) -> None:
        """``msgs`` in one write. ``reply_next``: the caller's next step on this stream is
        :meth:`receive` (a request and its reply, a reply and the next request): the write
        then makes no scheduler pass of its own, the read makes the one the pair needs (it
        waits for the reply, or yields once if the reply was already there): one pass per
        round trip instead of two."""
        data = b"".join(encode(m) for m in msgs)
        self.bytes_out += len(data)
        await self._write((data,), reply_next)

    async def send_with_payload(
        self,
        msg: Message,
        payload: BufferLike,
        before: bytes = b"",
        after: bytes = b"",
        *,
        reply_next: bool = False,
    ) -> None:
        """``msg``'s header and payload in one write, between already-encoded frames
        (``reply_next`` as for :meth:`send`)."""
        head = before + encode(msg)
        self.bytes_out += len(head) + len(payload) + len(after)
        await self._write((head, payload, after), reply_next)

    async def _write(self, buffers: Sequence[BufferLike], reply_next: bool) -> None:
        sock = self._socket
        if reply_next and sock is not None:
            await sock.send_buffers(buffers, schedule=False)
            self._owed = True
        else:
            await self.transport.send_buffers(buffers)

    async def receive(self) -> Message:
        """The next message. If it carries a payload, the caller must consume it next."""
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                if self._owed:  # the reply was read with an earlier one: yield once anyway
                    self._owed = False
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return msg
            mv = memoryview(self._scratch)
            sock = self._socket
            if self._owed and sock is not None:
                self._owed = False
                n = await sock.recv_reply_into(mv, READ_AHEAD)
            else:
                n = await self.transport.recv_into(mv, READ_AHEAD)
            if not n:
                raise ConnectionClosed(
                    "peer closed the connection" + (" mid-frame" if self.decoder.buffered else "")
                )
            self.bytes_in += n
            self.decoder.feed(mv[:n])

    async def receive_payload_into(self, dest: memoryview) -> None:
        """Receive the whole pending payload (exactly ``len(dest)`` bytes) into ``dest``."""
        if len(dest) != self.decoder.payload_pending:
            raise RuntimeError("destination size differs from the pending payload")
        await self._payload_part(dest)

    async def discard_payload(self) -> None:
        """Read and drop the pending payload (duplicates, refused transfers)."""
        if self._discard is None:
            self._discard = bytearray(1 << 20)
        view = memoryview(self._discard)
        while self.decoder.payload_pending:
            await self._payload_part(view[: min(self.decoder.payload_pending, len(view))])

    async def _payload_part(self, dest: memoryview) -> None:
        """The next ``len(dest)`` payload bytes: read-ahead first, then ``recv_into`` directly."""
        got = self.decoder.take_payload_into(dest)
        total = len(dest)
        while got < total:
            n = await self.transport.recv_into(dest[got:], total - got)
            if not n:
                raise ConnectionClosed("peer closed the connection mid-payload")
            got += n
            self.bytes_in += n
            self.decoder.payload_received(n)

    async def aclose(self) -> None:
        await self.transport.aclose()
