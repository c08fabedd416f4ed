"""The QUIC transport over real UDP sockets on 127.0.0.1: handshake, streams, flow control,
loss, idle timeout, and the refusals of mutual TLS and the cluster secret."""

from __future__ import annotations

import contextlib
import socket
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from aioquic._buffer import Buffer
from aioquic.quic.events import StreamDataReceived
from aioquic.quic.packet import pull_quic_header

from tensord.config import HostPort, TlsSettings
from tensord.errors import AuthenticationFailed, PeerUnreachable, ProtocolError
from tensord.net.connection import Connection
from tensord.net.quic import (
    DEFAULT_TUNING,
    MAX_ACK_DELAY_MS,
    QuicSession,
    QuicStreamTransport,
    QuicTuning,
    default_dialer,
    dial_quic,
    open_quic_socket,
    serve_quic,
)
from tensord.net.quic._aioquic import FlowControlledConnection
from tensord.net.quic.reset import ResetTokens
from tensord.net.quic.tls import client_config, server_config
from tensord.net.quic.udp import UdpSocket
from tensord.net.stream import ConnectionClosed
from tensord.wire.auth import ClusterKey
from tensord.wire.frames import FrameDecoder
from tensord.wire.handshake import ALL_FEATURES, make_hello

from .support import pki as shared_pki
from .support.quic_echo import (
    KEY,
    dial,
    echo,
    hello,
    payload,
    ping,
    quic_dialer,
    quic_server,
    send_payload,
)

pki = shared_pki.pki  # the fixture: the suite's one test PKI (tests/support/pki.py)
MiB = 1 << 20


def transport(conn: Connection) -> QuicStreamTransport:
    t = conn.stream.transport
    assert isinstance(t, QuicStreamTransport)
    return t


def tls_for(pki: Path, node: str, certs: str = "certs", ca: str = "") -> TlsSettings:
    """``certs``: this cluster's; ``other``: a node of another cluster (its own CA)."""
    ca_file = pki / ca if ca else pki / ("ca" if certs == "certs" else "other-ca") / "ca.crt"
    return TlsSettings(ca_file, pki / certs / f"{node}.crt", pki / certs / f"{node}.key")


# --------------------------------------------------------------------------------------------


async def test_hello_then_frames_and_a_payload() -> None:
    seen: list[Connection] = []

    async def handler(conn: Connection) -> None:
        seen.append(conn)
        await echo(conn)

    with trio.fail_after(10):
        async with quic_server(handler) as port, quic_dialer() as dialer:
            conn = await dial(dialer, port)
            assert conn.outbound and conn.peer_id == "server"
            assert conn.agreement.chunked and conn.agreement.crc
            assert conn.stream.transport.fileno() == -1
            assert await ping(conn, 1) and await ping(conn, 2)
            assert await send_payload(conn, 11, 3 * MiB + 17)
            assert seen[0].peer_id == "client" and not seen[0].outbound
            assert transport(conn).looks_alive()
            await conn.aclose()


async def test_dial_quic_reuses_the_runs_default_dialer_and_a_prebound_socket() -> None:
    sock = await open_quic_socket(HostPort("127.0.0.1", 0))
    port = sock.getsockname()[1]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            reported = await nursery.start(
                partial(serve_quic, sock, hello("server"), FrameDecoder, echo, handshake_timeout=5)
            )
            assert reported == port
            addr = HostPort("127.0.0.1", port)
            conns = [
                await dial_quic(addr, hello("client"), FrameDecoder, connect_timeout=5)
                for _ in range(3)
            ]
            for i, conn in enumerate(conns):
                assert await ping(conn, i)
            dialer = await default_dialer()
            assert dialer.stats.connections == 1 and dialer.stats.streams == 3
            assert len({transport(c).session for c in conns}) == 1
            nursery.cancel_scope.cancel()


async def test_max_connections_counts_quic_connections_not_streams() -> None:
    """``max_connections`` bounds QUIC connections (as TCP connections on the TCP side): one
    connection carries many streams, and a second connection is refused, with the reason."""
    with trio.fail_after(10):
        async with (
            trio.open_nursery() as nursery,
            quic_dialer() as dialer,
            quic_dialer() as other,
        ):
            port = await nursery.start(
                partial(
                    serve_quic,
                    HostPort("127.0.0.1", 0),
                    hello("server"),
                    FrameDecoder,
                    echo,
                    handshake_timeout=5,
                    max_connections=1,
                )
            )
            conns = [await dial(dialer, port) for _ in range(3)]
            for i, conn in enumerate(conns):
                assert await ping(conn, i)
            with pytest.raises(PeerUnreachable, match=r"refused.*transfer\.max_connections"):
                await dial(other, port)
            assert await ping(conns[0])  # the connection itself is fine
            nursery.cancel_scope.cancel()


async def test_cluster_secret_and_mutual_tls_together(pki: Path) -> None:
    with trio.fail_after(10):
        async with (
            quic_server(key=KEY, tls=tls_for(pki, "server")) as port,
            quic_dialer() as dialer,
        ):
            conn = await dial(dialer, port, key=KEY, tls=tls_for(pki, "client"))
            assert conn.peer_id == "server"
            assert transport(conn).session.peer_node_id == "server"
            assert await ping(conn)
            assert await send_payload(conn, 5, MiB)


async def test_many_concurrent_streams_share_one_quic_connection() -> None:
    server_sessions: set[QuicSession] = set()
    stream_ids: set[int] = set()

    async def handler(conn: Connection) -> None:
        server_sessions.add(transport(conn).session)
        stream_ids.add(transport(conn).stream_id)
        await echo(conn)

    results: list[bool] = []
    with trio.fail_after(25):
        async with quic_server(handler) as port, quic_dialer() as dialer:

            async def one(seed: int) -> None:
                conn = await dial(dialer, port)
                results.append(await send_payload(conn, seed, 4 * MiB))
                await conn.aclose()

            async with trio.open_nursery() as nursery:
                for seed in range(16):
                    nursery.start_soon(one, seed)
            assert dialer.stats.connections == 1 and len(dialer.connections()) == 1
            assert dialer.stats.streams == 16
    assert results == [True] * 16
    assert len(server_sessions) == 1 and len(stream_ids) == 16


async def test_concurrent_first_dials_run_one_hello() -> None:
    """Dials racing on a fresh connection wait for the first stream's Hello and reuse it."""
    with trio.fail_after(10):
        async with quic_server() as port, quic_dialer() as dialer:
            conns: list[Connection] = []

            async def one() -> None:
                conns.append(await dial(dialer, port))

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(one)
            assert dialer.stats.connections == 1
            assert len({id(c.agreement) for c in conns}) == 1
            for i, conn in enumerate(conns):
                assert await ping(conn, i)


async def test_slow_reader_bounds_what_both_sides_buffer() -> None:
    tuning = QuicTuning(stream_window=256 * 1024, connection_window=1 * MiB, send_buffer=256 * 1024)
    release = trio.Event()
    server_side: list[QuicStreamTransport] = []

    async def slow(conn: Connection) -> None:
        server_side.append(transport(conn))
        await release.wait()  # a reader that does not read yet
        await echo(conn)

    size = 16 * MiB
    with trio.fail_after(25):
        async with quic_server(slow, tuning=tuning) as port, quic_dialer(tuning) as dialer:
            conn = await dial(dialer, port)
            done = trio.Event()
            exact: list[bool] = []

            async def sender() -> None:
                exact.append(await send_payload(conn, 3, size))
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                # Everything settles once flow control has stopped the sender.
                await trio.testing.wait_all_tasks_blocked(cushion=0.2)
                assert not done.is_set()
                # The sender is held back, not buffering it all.
                assert transport(conn).bytes_queued < size / 2
                assert transport(conn).max_send_buffered <= tuning.send_buffer
                assert server_side[0].receive_buffered <= tuning.stream_window
                release.set()
            assert exact == [True]
            # The bounds held for the whole transfer, on both sides.
            assert transport(conn).max_send_buffered <= tuning.send_buffer
            assert server_side[0].max_receive_buffered <= tuning.stream_window


@pytest.mark.parametrize(("loss", "seed"), [(0.01, 1), (0.05, 2)])
async def test_loss_and_reordering_stay_byte_exact(loss: float, seed: int) -> None:
    from .support.udp_proxy import UdpProxy

    results: list[bool] = []
    with trio.fail_after(25):
        async with quic_server() as port, quic_dialer() as dialer:
            proxy = UdpProxy(("127.0.0.1", port), loss=loss, reorder=0.03, seed=seed)
            async with trio.open_nursery() as nursery:
                proxy_port = await nursery.start(proxy.run)

                async def one(i: int) -> None:
                    conn = await dial(dialer, proxy_port)
                    results.append(await send_payload(conn, 100 + i, 2 * MiB))
                    await conn.aclose()

                async with trio.open_nursery() as inner:
                    for i in range(2):
                        inner.start_soon(one, i)
                nursery.cancel_scope.cancel()
    assert results == [True, True]
    assert proxy.stats.dropped > 0 and proxy.stats.reordered > 0


async def test_idle_connection_closes_and_the_next_dial_reconnects() -> None:
    tuning = QuicTuning(idle_timeout=0.3)
    with trio.fail_after(10):
        async with quic_server(tuning=tuning) as port, quic_dialer(tuning) as dialer:
            conn = await dial(dialer, port)
            assert await ping(conn)
            session = transport(conn).session
            await conn.aclose()  # no stream left: nothing keeps the connection alive
            await session.wait_closed()
            assert isinstance(session.failure, PeerUnreachable)
            assert "idle" in str(session.failure)
            assert dialer.connections() == []

            again = await dial(dialer, port)
            assert transport(again).session is not session
            assert dialer.stats.connections == 2
            assert await ping(again)


async def test_open_stream_keeps_a_quiet_connection_alive() -> None:
    tuning = QuicTuning(idle_timeout=0.3)
    with trio.fail_after(10):
        async with quic_server(tuning=tuning) as port, quic_dialer(tuning) as dialer:
            conn = await dial(dialer, port)
            # Not synchronisation: the scenario is time passing with nothing sent.
            await trio.sleep(1.0)
            assert await ping(conn)
            assert dialer.stats.connections == 1


async def test_connection_loss_breaks_streams_and_redial_is_unreachable() -> None:
    with trio.fail_after(10):
        async with quic_dialer() as dialer:
            async with quic_server() as port:
                conn = await dial(dialer, port)
                assert await ping(conn)
            # The listener is gone: its handler ended the stream (FIN) as it was cancelled,
            # then the listener sent CONNECTION_CLOSE; either ends the read.
            with pytest.raises((trio.BrokenResourceError, ConnectionClosed)):
                await conn.stream.receive()
            assert not transport(conn).looks_alive()
            with pytest.raises(PeerUnreachable, match=r"nothing is listening|refused"):
                await dial(dialer, port)


async def test_unreachable_port_fails_fast_and_typed() -> None:
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # a port nobody listens on: ICMP port unreachable
    with trio.fail_after(3):
        async with quic_dialer() as dialer:
            with pytest.raises(PeerUnreachable, match="nothing is listening"):
                await dial(dialer, port)


async def test_silent_peer_times_out_as_unreachable() -> None:
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))  # bound, never answers
    with trio.fail_after(3), sock:
        async with quic_dialer() as dialer:
            addr = HostPort("127.0.0.1", sock.getsockname()[1])
            with pytest.raises(PeerUnreachable, match=r"no QUIC handshake within 0\.3 s"):
                await dialer.dial(addr, hello("client"), FrameDecoder, connect_timeout=0.3)


async def test_version_mismatch_is_a_protocol_error_with_its_code() -> None:
    with trio.fail_after(3):
        async with quic_server() as port, quic_dialer() as dialer:
            future = make_hello("client", ALL_FEATURES, MiB, versions=(99,))
            with pytest.raises(ProtocolError) as info:
                await dialer.dial(
                    HostPort("127.0.0.1", port), future, FrameDecoder, connect_timeout=3
                )
            assert info.value.code == "version"


async def test_listener_only_accepts_until_cancelled_with_a_handler_nursery() -> None:
    """Like drain(): a cancelled listener lets the streams in flight finish."""
    with trio.fail_after(10):
        async with trio.open_nursery() as handlers, quic_dialer() as dialer:
            scope = trio.CancelScope()
            ready: list[int] = []

            async def listen(task_status: trio.TaskStatus[int]) -> None:
                with scope:
                    await serve_quic(
                        HostPort("127.0.0.1", 0),
                        hello("server"),
                        FrameDecoder,
                        echo,
                        handshake_timeout=5,
                        handler_nursery=handlers,
                        task_status=task_status,
                    )

            ready.append(await handlers.start(listen))
            conn = await dial(dialer, ready[0])
            assert await ping(conn)
            scope.cancel()
            assert await send_payload(conn, 9, MiB)  # the stream in flight carries on
            later = await dial(dialer, ready[0])  # reuses the agreement, no round trip
            with pytest.raises((trio.BrokenResourceError, ConnectionClosed)):
                await ping(later)  # but the listener refuses the new stream
            await conn.aclose()
            # The last stream closed: the listener closes the connection and its socket.
            await transport(conn).session.wait_closed()
            handlers.cancel_scope.cancel()


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_certs", "client_certs", "client_ca", "client_node", "server_node", "match"),
    [
        ("certs", "other", "both.crt", "client", "server", "refused our certificate"),
        ("other", "certs", "", "client", "server", "certificate was refused.*cluster's CA"),
        ("certs", "other", "", "client", "server", "certificate was refused.*cluster's CA"),
        ("certs", "certs", "", "server", "server", "refused us.*certificate is for 'client'"),
        ("certs", "certs", "", "client", "client", "certificate is for 'server'"),
    ],
    ids=[
        "client-cert-other-ca",
        "server-cert-other-ca",
        "other-cluster",
        "client-id-lie",
        "server-id-lie",
    ],
)
async def test_mutual_tls_refusals_are_authentication_failures(
    pki: Path,
    server_certs: str,
    client_certs: str,
    client_ca: str,
    client_node: str,
    server_node: str,
    match: str,
) -> None:
    server_tls = tls_for(pki, "server", server_certs)
    client_tls = tls_for(pki, "client", client_certs, client_ca)
    with trio.fail_after(3):
        async with (
            quic_server(node=server_node, tls=server_tls) as port,
            quic_dialer() as dialer,
        ):
            with pytest.raises(AuthenticationFailed, match=match):
                await dial(dialer, port, node=client_node, tls=client_tls)
            assert dialer.connections() == []


async def test_plaintext_dialer_is_refused_by_a_tls_listener(pki: Path) -> None:
    with trio.fail_after(3):
        async with quic_server(tls=tls_for(pki, "server")) as port, quic_dialer() as dialer:
            with pytest.raises(AuthenticationFailed, match="client certificate"):
                await dial(dialer, port)


async def test_tls_dialer_refuses_a_listener_without_tls(pki: Path) -> None:
    with trio.fail_after(3):
        async with quic_server() as port, quic_dialer() as dialer:
            with pytest.raises(AuthenticationFailed, match="cluster's CA"):
                await dial(dialer, port, tls=tls_for(pki, "client"))


@pytest.mark.parametrize(
    ("server_key", "client_key", "match"),
    [
        (KEY, ClusterKey(b"y" * 32), "cluster-secret check"),
        (KEY, None, "did not authenticate"),
        (None, KEY, "did not prove"),
    ],
    ids=["mismatch", "dialer-without-secret", "listener-without-secret"],
)
async def test_cluster_secret_refusals(
    server_key: ClusterKey | None, client_key: ClusterKey | None, match: str
) -> None:
    with trio.fail_after(3):
        async with quic_server(key=server_key) as port, quic_dialer() as dialer:
            with pytest.raises(AuthenticationFailed, match=match):
                await dial(dialer, port, key=client_key)


def test_the_aioquic_internals_this_transport_relies_on_exist() -> None:
    """tensord/net/quic/_aioquic.py overrides and reads private aioquic API: fail loudly on an
    upgrade."""
    from aioquic import tls
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.recovery import QuicPacketPacer
    from aioquic.quic.stream import QuicStreamSender

    for name in (
        "_write_stream_limits",
        "_write_connection_limits",
        "_initialize",
        "_serialize_transport_parameters",
    ):
        assert callable(getattr(QuicConnection, name))
    from aioquic.quic.recovery import QuicPacketSpace

    space = QuicPacketSpace()  # read and moved by FlowControlledConnection.receive_datagram
    assert space.ack_at is None and space.largest_received_packet == -1
    sender = QuicStreamSender(stream_id=0, writable=True)
    assert sender._buffer_stop - sender._buffer_start == 0
    # The limits a listener sets before the transport parameters are written (pre-auth).
    server = QuicConnection(
        configuration=server_config(None, DEFAULT_TUNING)[0],
        original_destination_connection_id=bytes(8),
    )
    assert server._is_client is False
    for limit in (
        server._local_max_data,
        server._local_max_streams_bidi,
        server._local_max_streams_uni,
    ):
        assert limit.value == limit.sent and limit.used == 0
    context = tls.Context(is_client=False)
    assert context._request_client_certificate is False
    assert context._peer_certificate is None
    assert callable(QuicPacketPacer.update_rate)


def test_tuning_is_validated() -> None:
    with pytest.raises(ValueError, match="max_datagram_size"):
        QuicTuning(max_datagram_size=65000)
    with pytest.raises(ValueError, match="congestion_control"):
        QuicTuning(congestion_control="bbr")
    with pytest.raises(ValueError, match="connection_window"):
        QuicTuning(stream_window=8 * MiB, connection_window=4 * MiB)


# --------------------------------------------------------------------------------------------
# Acknowledgements and loss recovery, sans I/O: two connections wired by hand, on a clock that
# only moves when the test says so (aioquic needs no sockets, so nothing here is timing).


class _Pair:
    """A client and a server ``FlowControlledConnection``, handshake done, wired by hand."""

    def __init__(self, reset_tokens: ResetTokens | None = None) -> None:
        self.now = 1000.0
        self.client = FlowControlledConnection(
            configuration=client_config(None, DEFAULT_TUNING),
            connection_window=DEFAULT_TUNING.connection_window,
            request_client_certificate=False,
        )
        self.client.connect(("127.0.0.1", 2), now=self.now)
        first = self.send(self.client)
        dcid = pull_quic_header(Buffer(data=first[0]), host_cid_length=8).destination_cid
        listener_config, _ = server_config(None, DEFAULT_TUNING)
        self.server = FlowControlledConnection(
            configuration=listener_config,
            original_destination_connection_id=dcid,
            connection_window=DEFAULT_TUNING.connection_window,
            request_client_certificate=False,
            reset_tokens=reset_tokens,
        )
        self.deliver(first, self.server)
        for _ in range(20):  # the handshake, ACK timers included, until all is said
            self.now += 0.0015  # past the 1 ms ACK timer: RTT samples of ~1.5 ms
            for conn in (self.client, self.server):
                conn.handle_timer(self.now)
            to_client, to_server = self.send(self.server), self.send(self.client)
            if not to_client and not to_server:
                break
            self.deliver(to_client, self.client)
            self.deliver(to_server, self.server)
        self.received(self.client)
        self.received(self.server)
        assert self.client._handshake_confirmed and self.server._handshake_complete

    def tick(self) -> float:
        """One hop: far less than any timer, which therefore never comes due."""
        self.now += 0.00005
        return self.now

    def send(self, conn: FlowControlledConnection) -> list[bytes]:
        return [data for data, _ in conn.datagrams_to_send(now=self.tick())]

    def deliver(self, datagrams: list[bytes], to: FlowControlledConnection) -> None:
        now = self.tick()  # one batch, as the receive loops read them
        for data in datagrams:
            to.receive_datagram(data, ("127.0.0.1", 2 if to is self.client else 1), now)

    @staticmethod
    def received(conn: FlowControlledConnection) -> bytes:
        data = b""
        while (event := conn.next_event()) is not None:
            if isinstance(event, StreamDataReceived):
                data += event.data
        return data


def test_both_ends_announce_a_short_max_ack_delay() -> None:
    """aioquic announces 25 ms, which the peer adds to every probe timeout (PTO): a sender
    whose last ACK was lost waited that long for what comes within a couple of ms."""
    pair = _Pair()
    assert MAX_ACK_DELAY_MS < 25
    assert (
        pair.client._loss.max_ack_delay
        == pair.server._loss.max_ack_delay
        == MAX_ACK_DELAY_MS / 1000
    )


def test_a_burst_is_acknowledged_at_once_and_its_loss_repaired_by_that_ack() -> None:
    """A burst with a lost packet: the receiver acknowledges what it read without waiting for
    its ACK timer, and that ACK lets the sender declare the loss (three later packets were
    acknowledged) and resend it - no timer fires at either end, no probe timeout."""
    pair = _Pair()
    client, server = pair.client, pair.server
    sid = client.get_next_available_stream_id()
    data = payload(5, 8 * 1200)
    client.send_stream_data(sid, data, end_stream=True)
    burst = pair.send(client)
    assert len(burst) >= 6
    pair.deliver(burst[:1] + burst[2:], server)  # the second datagram is lost
    acks = pair.send(server)
    assert acks, "the server waited for its ACK timer"
    pair.deliver(acks, client)
    pair.deliver(pair.send(client), server)  # the retransmission, sent on that ACK
    assert pair.received(server) == data


def test_a_lone_packet_still_waits_for_the_ack_timer() -> None:
    """One small packet (a request) is not acknowledged at once: the ACK can ride on the
    answer (or goes when the 1 ms timer fires) - no extra datagram per request."""
    pair = _Pair()
    client, server = pair.client, pair.server
    client.send_stream_data(client.get_next_available_stream_id(), b"ping")
    pair.deliver(pair.send(client), server)
    assert pair.received(server) == b"ping"
    assert pair.send(server) == []
    pair.now += 0.002  # the ACK timer
    assert pair.send(server) != []


def test_the_listeners_reset_tokens_reach_the_dialer_for_every_connection_id() -> None:
    """The tokens a listener's connection hands out (transport parameter, NEW_CONNECTION_ID)
    are the derived ones, so a restarted process can make them; the dialer keeps them where
    its receive loop looks (``_peer_cid``), and can tell when something is in flight."""
    tokens = ResetTokens(b"k" * 32, cid_length=8)
    pair = _Pair(tokens)
    client = pair.client
    assert client._peer_cid.stateless_reset_token == tokens.token(client._peer_cid.cid)
    assert client._peer_cid_available, "the server issued no further connection ids"
    for cid in client._peer_cid_available:
        assert cid.stateless_reset_token == tokens.token(cid.cid)
    assert client._loss.bytes_in_flight == 0  # read by QuicSession.silent_for
    client.send_ping(1)
    pair.send(client)
    assert client._loss.bytes_in_flight > 0


# -- UDP segmentation offloads (udp.py) ------------------------------------------------------


#: Linux's SO_NO_CHECK (asm-generic/socket.h; Python's socket module does not name it).
SO_NO_CHECK = 11


def _udp_socket(offload: bool = True) -> UdpSocket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    sock.bind(("127.0.0.1", 0))
    return UdpSocket(sock, connected=False, offload=offload)


async def _receive_all(udp: UdpSocket, count: int) -> tuple[list[bytes], int]:
    """``count`` datagrams from ``udp``, and how many receive syscalls returned them."""
    buf = bytearray(65536)
    got: list[bytes] = []
    calls = 0
    with trio.fail_after(10):
        while len(got) < count:
            await trio.lowlevel.wait_readable(udp.sock)
            with contextlib.suppress(BlockingIOError):
                while True:
                    datagrams, _ = udp.receive(buf)
                    calls += 1
                    got += datagrams
    return got, calls


def _runs(to: list[UdpSocket]) -> list[tuple[bytes, tuple[str, int]]]:
    """Full-size datagrams to each receiver in turn, 30 apiece, each ending with a short one,
    every payload distinct."""
    out = []
    for i, udp in enumerate(to):
        addr = udp.sock.getsockname()
        out += [(bytes([i, j]) * 726, addr) for j in range(30)] + [(bytes([i]) * 100, addr)]
    return out


async def test_gso_sends_runs_in_few_syscalls_and_gro_hands_back_every_datagram() -> None:
    sender, one, two = _udp_socket(), _udp_socket(), _udp_socket()
    # This kernel (Linux >= 5.0) has both: a failure here means the probe is wrong.
    assert sender.gso and one.gro and two.gro
    datagrams = _runs([one, two, one])
    assert sender.send_many(datagrams) == len(datagrams)
    got_one, calls_one = await _receive_all(one, 62)
    got_two, calls_two = await _receive_all(two, 31)
    mine = [d for d, addr in datagrams if addr == one.sock.getsockname()]
    assert got_one == mine and got_two == [d for d, _ in datagrams[31:62]]
    # One GSO send per run, handed back whole by GRO (loopback keeps the super-datagram).
    assert calls_one <= 4 and calls_two <= 2, (calls_one, calls_two)
    for udp in (sender, one, two):
        udp.close()


async def test_with_the_offloads_switched_off_each_datagram_is_one_syscall() -> None:
    sender, one = _udp_socket(offload=False), _udp_socket(offload=False)
    assert not sender.gso and not one.gro
    datagrams = _runs([one])
    assert sender.send_many(datagrams) == len(datagrams)
    got, calls = await _receive_all(one, len(datagrams))
    assert got == [d for d, _ in datagrams] and calls == len(datagrams)
    sender.close()
    one.close()


async def test_a_payload_without_the_offloads() -> None:
    """The fallback path end to end: both ends one datagram per syscall
    (``quic.udp_offload = false``)."""
    off = QuicTuning(udp_offload=False)
    with trio.fail_after(10):
        async with quic_server(echo, tuning=off) as port, quic_dialer(off) as dialer:
            conn = await dial(dialer, port)
            assert await send_payload(conn, 5, 2 * MiB + 3)
            await conn.aclose()


async def test_a_gso_send_the_kernel_refuses_falls_back_to_one_datagram_per_syscall() -> None:
    """The kernel refuses GSO on a socket without UDP checksums (``SO_NO_CHECK``: EINVAL), as
    it does on a device without checksum offload (EIO): the run goes out datagram by
    datagram, and GSO stays off for that socket."""
    sender, one = _udp_socket(), _udp_socket()
    sender.sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    assert sender.gso
    datagrams = _runs([one, one])
    assert sender.send_many(datagrams) == len(datagrams)
    assert not sender.gso
    got, _ = await _receive_all(one, len(datagrams))
    assert got == [d for d, _ in datagrams]
    sender.close()
    one.close()
