"""A raw aioquic client for the QUIC listener's hostile-peer tests and the chaos attack rows.

Anyone can complete a QUIC handshake with a listener that has no ``security.tls``; what they get
before a valid Hello is bounded (docs/QUIC.md, "Before authentication"). :class:`RawClient` is
that stranger: aioquic's own client, doing only what the test tells it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tensord.net.quic import ALPN
from tensord.wire.frames import PREFIX


class RawClient:
    """aioquic's own client over a connected UDP socket, driven by one task: the hostile peer.

    It does only what the test tells it (open streams, send bytes); ``settled`` waits until
    everything it sent was acknowledged and flow control lets nothing more out."""

    def __init__(self, port: int) -> None:
        cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], max_datagram_size=1452)
        cfg.verify_mode = ssl.CERT_NONE
        self.quic = QuicConnection(configuration=cfg)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.port = port
        self.established = trio.Event()
        self.terminated = trio.Event()
        self.close_event: qe.ConnectionTerminated | None = None
        self.received: dict[int, bytes] = {}
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        addr = ("127.0.0.1", self.port)
        self.sock.connect(addr)
        self.quic.connect(addr, now=trio.current_time())
        task_status.started()
        with self.sock:
            while not self.terminated.is_set():
                self.flush()
                timer = self.quic.get_timer()
                with trio.move_on_at(timer if timer is not None else trio.current_time() + 3600):
                    await trio.lowlevel.wait_readable(self.sock)
                    while True:
                        try:
                            data = self.sock.recv(65536)
                        except BlockingIOError:
                            break
                        except OSError:
                            continue
                        self.quic.receive_datagram(data, addr, trio.current_time())
                    self._events()
                    continue
                self.quic.handle_timer(trio.current_time())
                self._events()

    def flush(self) -> None:
        for data, _ in self.quic.datagrams_to_send(now=trio.current_time()):
            with contextlib.suppress(OSError):  # EAGAIN: as if lost, aioquic resends
                self.sock.send(data)
        self._events()

    def _events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, qe.HandshakeCompleted):
                self.established.set()
            elif isinstance(event, qe.StreamDataReceived):
                self.received[event.stream_id] = (
                    self.received.get(event.stream_id, b"") + event.data
                )
            elif isinstance(event, qe.ConnectionTerminated):
                self.close_event = event
                self.terminated.set()
                self.established.set()
        self._changed.set()
        self._changed = trio.Event()

    def push(self, streams: int, per_stream: int) -> None:
        """Open ``streams`` bidirectional streams and queue ``per_stream`` bytes on each (aioquic
        sends them as the peer's credit allows). The first stream gets the start of a frame
        that never ends (a header announced as 60000 bytes), so the listener keeps waiting for
        the Hello rather than refusing the connection."""
        junk = os.urandom(per_stream)
        first = self.quic.get_next_available_stream_id()
        self.quic.send_stream_data(first, PREFIX.pack(60000) + junk[:1000])
        for _ in range(streams - 1):
            sid = self.quic.get_next_available_stream_id()
            self.quic.send_stream_data(sid, junk)
        self.flush()

    async def changed(self) -> None:
        """Until the next datagram, timer or event has been handled."""
        await self._changed.wait()

    @property
    def accepted(self) -> int:
        """Stream bytes the listener accepted so far (counted against its MAX_DATA)."""
        return int(self.quic._remote_max_data_used)

    async def settled(self) -> None:
        """Until all we sent is acknowledged and nothing more may go (or the peer closed)."""
        while not self.terminated.is_set():
            if self.quic._loss.bytes_in_flight == 0 and not self.quic.datagrams_to_send(
                now=trio.current_time()
            ):
                return
            await self._changed.wait()


@asynccontextmanager
async def raw_client(port: int) -> AsyncIterator[RawClient]:
    client = RawClient(port)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        yield client
        nursery.cancel_scope.cancel()
