"""The Trio side of QUIC's UDP: sockets shared by the tasks that send on them."""

from __future__ import annotations

import contextlib
import socket

import trio
from aioquic.quic.connection import NetworkAddress

from ...config import HostPort
from .tuning import DEFAULT_TUNING, QuicTuning


class UdpSocket:
    """A non-blocking UDP socket shared by the tasks that send on it.

    Several drivers send on a listener's socket; only one task at a time may wait for it to
    become writable, hence the lock (taken only when the kernel says EAGAIN).
    """

    def __init__(self, sock: socket.socket, *, connected: bool) -> None:
        self.sock = sock
        self.connected = connected
        self._write_lock = trio.Lock()

    def send_many(self, datagrams: list[tuple[bytes, NetworkAddress]]) -> int:
        """Send in order until the kernel says EAGAIN; how many were sent. Other errors
        (ECONNREFUSED from an ICMP port unreachable) raise ``OSError``."""
        sock = self.sock
        connected = self.connected
        sent = 0
        try:
            for data, addr in datagrams:
                if connected:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
                sent += 1
        except BlockingIOError:
            pass
        return sent

    async def wait_writable(self) -> None:
        async with self._write_lock:
            await trio.lowlevel.wait_writable(self.sock)

    def send_nowait(self, data: bytes, addr: NetworkAddress) -> None:
        """Best effort, for the CONNECTION_CLOSE sent while a driver is being cancelled."""
        try:
            if self.connected:
                self.sock.send(data)
            else:
                self.sock.sendto(data, addr)
        except OSError:
            pass

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


def tune_socket(sock: socket.socket, tuning: QuicTuning) -> None:
    """Non-blocking, with the kernel buffers the tuning asks for."""
    sock.setblocking(False)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, tuning.socket_buffer)


async def open_quic_socket(addr: HostPort, tuning: QuicTuning = DEFAULT_TUNING) -> socket.socket:
    """Bind the listener's UDP socket (port 0 picks a free port; ``::`` also takes IPv4)."""
    host = None if addr.host in ("0.0.0.0", "::", "") else addr.host
    if addr.host == "::":
        family = socket.AF_INET6
    elif host is None:
        family = socket.AF_INET
    else:
        infos = await trio.socket.getaddrinfo(
            host, addr.port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
        )
        family = infos[0][0]
        host = str(infos[0][4][0])
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and host is None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        tune_socket(sock, tuning)
        sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), addr.port))
    except OSError:
        sock.close()
        raise
    return sock
