"""The Trio side of QUIC's UDP: sockets shared by the tasks that send on them, with Linux's
UDP segmentation offloads where the kernel has them.

GSO (``UDP_SEGMENT``, Linux 4.18): a run of same-sized datagrams to one address leaves in one
``sendmsg`` (the kernel, or the NIC, cuts it into datagrams); GRO (``UDP_GRO``, Linux 5.0): one
``recvmsg`` returns several datagrams of one flow glued together, with their size in a control
message. Either is switched off for a socket whose kernel refuses it (``ENOPROTOOPT`` and
kin), and GSO also when a send with it fails with ``EIO`` (a device without checksum offload):
then one syscall per datagram, as before. ``quic.udp_offload = false`` (``QuicTuning.udp_offload``)
switches both off (measurements: docs/QUIC.md, "Performance").
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct

import trio
from aioquic.quic.connection import NetworkAddress

from ...config import HostPort
from .tuning import DEFAULT_TUNING, QuicTuning

SOL_UDP = getattr(socket, "SOL_UDP", 17)
#: Linux's ``include/uapi/linux/udp.h`` (Python's socket module names neither).
UDP_SEGMENT = 103
UDP_GRO = 104
#: The kernel's ``UDP_MAX_SEGMENTS`` (64 before Linux 6.9, 128 since).
GSO_MAX_SEGMENTS = 64
#: Bytes per GSO send: the whole must fit one IP packet (65,507 bytes of UDP payload over IPv4).
GSO_MAX_BYTES = 65000
#: ``recvmsg`` room for the ``UDP_GRO`` control message (an int: the datagrams' size).
_GRO_ANCILLARY = socket.CMSG_SPACE(4)
#: errnos saying "this kernel or this device cannot": fall back to one datagram per syscall.
_NO_OFFLOAD = (errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL, errno.EIO)


def _try_setsockopt(sock: socket.socket, option: int, value: int) -> bool:
    try:
        sock.setsockopt(SOL_UDP, option, value)
    except OSError:
        return False
    return True


class UdpSocket:
    """A non-blocking UDP socket shared by the tasks that send on it.

    Several drivers send on a listener's socket; only one task at a time may wait for it to
    become writable, hence the lock (taken only when the kernel says EAGAIN). ``gso`` / ``gro``:
    the offloads are on (probed when the socket is wrapped; GSO turns itself off on a send the
    device refuses; ``offload=False``: both off).
    """

    def __init__(self, sock: socket.socket, *, connected: bool, offload: bool = True) -> None:
        self.sock = sock
        self.connected = connected
        self._write_lock = trio.Lock()
        # Setting a socket's default segment size to 0 (none) is how a kernel is asked
        # whether it knows UDP_SEGMENT at all; the size itself goes with each sendmsg.
        self.gso = offload and _try_setsockopt(sock, UDP_SEGMENT, 0)
        self.gro = offload and _try_setsockopt(sock, UDP_GRO, 1)

    def send_many(self, datagrams: list[tuple[bytes, NetworkAddress]]) -> int:
        """Send in order until the kernel says EAGAIN; how many were sent. Other errors
        (ECONNREFUSED from an ICMP port unreachable) raise ``OSError``."""
        if not self.gso:
            return self._send_each(datagrams, 0)
        sock = self.sock
        connected = self.connected
        total = len(datagrams)
        sent = 0
        try:
            while sent < total:
                data, addr = datagrams[sent]
                size = len(data)
                end = sent + 1
                limit = min(total, sent + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // max(size, 1)))
                # A run: equal sizes to one address; a shorter datagram may end it.
                while end < limit:
                    more, to = datagrams[end]
                    if len(more) > size or (not connected and to != addr):
                        break
                    end += 1
                    if len(more) < size:
                        break
                if end - sent == 1:
                    if connected:
                        sock.send(data)
                    else:
                        sock.sendto(data, addr)
                else:
                    buffers = [d for d, _ in datagrams[sent:end]]
                    segment = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
                    try:
                        if connected:
                            sock.sendmsg(buffers, segment)
                        else:
                            sock.sendmsg(buffers, segment, 0, addr)
                    except OSError as exc:
                        if isinstance(exc, BlockingIOError) or exc.errno not in _NO_OFFLOAD:
                            raise
                        self.gso = False
                        return self._send_each(datagrams, sent)
                sent = end
        except BlockingIOError:
            pass
        return sent

    def _send_each(self, datagrams: list[tuple[bytes, NetworkAddress]], start: int) -> int:
        """One syscall per datagram from ``start``; how many (from 0) are sent by the end."""
        sock = self.sock
        connected = self.connected
        sent = start
        try:
            for data, addr in datagrams[start:] if start else datagrams:
                if connected:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
                sent += 1
        except BlockingIOError:
            pass
        return sent

    def receive(self, buf: bytearray) -> tuple[list[bytes], NetworkAddress]:
        """One receive syscall: the datagrams it returned (several with GRO, all from one
        sender) and their sender. Raises ``BlockingIOError`` when there is nothing, and
        ``OSError`` for an ICMP error of an earlier send."""
        view = memoryview(buf)
        if not self.gro:
            n, addr = self.sock.recvfrom_into(buf)
            return [bytes(view[:n])], addr
        n, ancillary, _flags, addr = self.sock.recvmsg_into([buf], _GRO_ANCILLARY)
        size = n
        for level, kind, data in ancillary:
            if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                size = struct.unpack("=i", data[:4])[0]
        if 0 < size < n:
            return [bytes(view[i : min(i + size, n)]) for i in range(0, n, size)], addr
        return [bytes(view[:n])], addr

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
