"""QUIC engines side by side, without sockets: what the state machine alone costs per byte.

Usage (from the repository root)::

    .venv/bin/python bench/quic_engines.py                 # 256 MiB, 3 reps, every engine
    SIZE=64M REPS=5 .venv/bin/python bench/quic_engines.py qh3 tensord

Two sans-I/O connections live in one process; the datagrams one of them returns from
``datagrams_to_send`` are handed to the other's ``receive_datagram`` (a batch at a time, as the
session's receive loop does) in memory. The client sends ``SIZE`` bytes on one bidirectional
stream, keeping at most ``SEND_BUFFER`` (4 MiB, tensord's ``QuicTuning.send_buffer``) queued in
the engine; the server reads everything. No loss, no pacing delay: when neither side has
anything to send, the clock (virtual: real time plus the skips) jumps to the earliest timer.
So the figures are the engine's CPU cost per byte, both ends on one core - the upper bound of
what a transport built on that engine can move, before syscalls and Trio.

Engines (``ENGINES``; arguments pick by name):

* ``aioquic`` - aioquic's ``QuicConnection`` as it comes (1.7, pure Python but for AEAD);
* ``tensord`` - ``tensord.net.quic._aioquic.FlowControlledConnection``, the engine as tensord
  configures it (reader-driven credit, immediate ACKs after a batch, the coarse pacer);
* ``qh3`` and ``qh3-batch`` - qh3 2.x (aioquic's API, state machine and crypto in Rust),
  fed one ``receive_datagram`` per datagram, or the whole batch in one
  ``receive_many_datagrams``.

Not here: aiopquic (picoquic). Every release on the package index requires Python >= 3.12 and
tensord's venv runs 3.11 (``pip download aiopquic`` finds no installable version); and it is
not a sans-I/O engine - ``QuicConnection.connect`` starts a ``TransportContext`` whose picoquic
worker thread binds and owns the UDP socket, so two of them cannot be wired together in memory.
(docs/QUIC.md, "Engines", has what its source says about driving it from Trio.)

Each rep reports MB/s (wall) and CPU-seconds per GB (``time.process_time``, this process: both
ends); the table shows medians. The machine is shared, so read CPU-s/GB first.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MiB = 1 << 20
SEND_BUFFER = 4 * MiB
CHUNK = 256 * 1024
STREAM_WINDOW = 8 * MiB
CONNECTION_WINDOW = 32 * MiB
DATAGRAM = 1452
ADDR_C = ("127.0.0.1", 40001)
ADDR_S = ("127.0.0.1", 40002)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def write_cert(tmp: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate and key as PEM files (both engines load files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Engine:
    """How to make a pair of connections of one engine and read its send backlog."""

    name: str
    make: Callable[[Path, Path], tuple[Any, Callable[[bytes], Any]]]
    backlog: Callable[[Any, int], int]
    batch: bool = False
    on_data: Callable[[Any, int, int, int], None] | None = None


def _aioquic_make(cls_name: str) -> Callable[[Path, Path], tuple[Any, Callable[[bytes], Any]]]:
    def make(cert: Path, key: Path) -> tuple[Any, Callable[[bytes], Any]]:
        import ssl

        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import QuicConnection
        from aioquic.quic.packet import pull_quic_header

        from tensord.net.quic._aioquic import FlowControlledConnection
        from tensord.net.quic.tuning import CID_LENGTH

        def config(is_client: bool) -> QuicConfiguration:
            cfg = QuicConfiguration(
                is_client=is_client,
                alpn_protocols=["bench"],
                congestion_control_algorithm="reno",
                max_data=CONNECTION_WINDOW,
                max_stream_data=STREAM_WINDOW,
                max_datagram_size=DATAGRAM,
                connection_id_length=CID_LENGTH,
            )
            if is_client:
                cfg.verify_mode = ssl.CERT_NONE
            else:
                cfg.load_cert_chain(cert, key)
            return cfg

        def conn(cfg: QuicConfiguration, **kw: Any) -> Any:
            if cls_name == "tensord":
                return FlowControlledConnection(
                    configuration=cfg,
                    connection_window=CONNECTION_WINDOW,
                    request_client_certificate=False,
                    **kw,
                )
            return QuicConnection(configuration=cfg, **kw)

        client = conn(config(True))

        def server(first: bytes) -> Any:
            from aioquic._buffer import Buffer

            header = pull_quic_header(Buffer(data=first), host_cid_length=CID_LENGTH)
            return conn(config(False), original_destination_connection_id=header.destination_cid)

        return client, server

    return make


def _aioquic_backlog(conn: Any, sid: int) -> int:
    qs = conn._streams.get(sid)
    return 0 if qs is None else qs.sender._buffer_stop - qs.sender._buffer_start


def _tensord_on_data(conn: Any, sid: int, n: int, total: int) -> None:
    conn.app_buffered += n  # the session counts arrivals, then the reader consumes them
    conn.consumed(sid, n, total, STREAM_WINDOW, STREAM_WINDOW // 4)


def _qh3_make(cert: Path, key: Path) -> tuple[Any, Callable[[bytes], Any]]:
    import ssl

    from qh3._hazmat import pull_quic_header
    from qh3.quic.configuration import QuicConfiguration
    from qh3.quic.connection import QuicConnection

    def config(is_client: bool) -> Any:
        cfg = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=["bench"],
            max_data=CONNECTION_WINDOW,
            max_stream_data=STREAM_WINDOW,
            max_datagram_size=DATAGRAM,
            connection_id_length=8,
        )
        if is_client:
            cfg.verify_mode = ssl.CERT_NONE
        else:
            cfg.load_cert_chain(str(cert), str(key))
        return cfg

    client = QuicConnection(configuration=config(True))

    def server(first: bytes) -> Any:
        header = pull_quic_header(first, 0, 8)
        return QuicConnection(
            configuration=config(False), original_destination_connection_id=header[3]
        )

    return client, server


def _qh3_backlog(conn: Any, sid: int) -> int:
    return int(conn.get_send_buffer_size(sid))


ENGINES = {
    "aioquic": Engine("aioquic", _aioquic_make("aioquic"), _aioquic_backlog),
    "tensord": Engine(
        "tensord", _aioquic_make("tensord"), _aioquic_backlog, on_data=_tensord_on_data
    ),
    "qh3": Engine("qh3", _qh3_make, _qh3_backlog),
    "qh3-batch": Engine("qh3-batch", _qh3_make, _qh3_backlog, batch=True),
}


def run_once(engine: Engine, size: int, cert: Path, key: Path) -> tuple[float, float]:
    """One transfer of ``size`` bytes; (wall seconds, CPU seconds) of the data phase."""
    from aioquic.quic import events as aq_events

    skew = 0.0

    def clock() -> float:
        return time.monotonic() + skew

    client, make_server = engine.make(cert, key)
    client.connect(ADDR_S, now=clock())
    first = client.datagrams_to_send(now=clock())
    server = make_server(first[0][0])
    pending_to_server = [d for d, _ in first]
    pending_to_client: list[bytes] = []
    block = os.urandom(CHUNK)
    sid = client.get_next_available_stream_id()
    sent = received = 0
    handshaken = False
    wall0 = cpu0 = 0.0
    qh3_done = {"HandshakeCompleted"}

    def deliver(conn: Any, datagrams: list[bytes], addr: tuple[str, int]) -> None:
        if not datagrams:
            return
        if engine.batch:
            conn.receive_many_datagrams(datagrams, addr, clock())
        else:
            now = clock()
            for d in datagrams:
                conn.receive_datagram(d, addr, now)

    while received < size:
        deliver(server, pending_to_server, ADDR_C)
        pending_to_server = []
        while (ev := server.next_event()) is not None:
            data = getattr(ev, "data", None)
            if data is not None and getattr(ev, "stream_id", None) == sid:
                received += len(data)
                if engine.on_data is not None:
                    engine.on_data(server, sid, len(data), received)
        pending_to_client = [d for d, _ in server.datagrams_to_send(now=clock())]
        deliver(client, pending_to_client, ADDR_S)
        while (ev := client.next_event()) is not None:
            if isinstance(ev, aq_events.HandshakeCompleted) or type(ev).__name__ in qh3_done:
                handshaken = True
                wall0, cpu0 = time.perf_counter(), time.process_time()
        pushed = False
        if handshaken:
            while sent < size and engine.backlog(client, sid) < SEND_BUFFER:
                n = min(CHUNK, size - sent)
                sent += n
                client.send_stream_data(sid, block[:n] if n < CHUNK else block, sent == size)
                pushed = True
        pending_to_server = [d for d, _ in client.datagrams_to_send(now=clock())]
        if not pending_to_server and not pending_to_client and not pushed:
            timers = [t for t in (client.get_timer(), server.get_timer()) if t is not None]
            if not timers:
                raise RuntimeError(f"{engine.name}: stalled at {received} of {size} bytes")
            due = min(timers)
            if due > clock():
                skew += due - clock()
            now = clock()
            for conn in (client, server):
                timer = conn.get_timer()
                if timer is not None and timer <= now:
                    conn.handle_timer(now)
    return time.perf_counter() - wall0, time.process_time() - cpu0


def main(argv: list[str]) -> int:
    size = _size(os.environ.get("SIZE", "256M"))
    reps = int(os.environ.get("REPS", "3"))
    names = argv or list(ENGINES)
    rows: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = write_cert(Path(tmp))
        for rep in range(reps):
            for name in names:  # interleaved, so a burst of other load hits every engine
                engine = ENGINES[name]
                wall, cpu = run_once(engine, size, cert, key)
                rates, cpus = rows.setdefault(name, ([], []))
                rates.append(size / wall / 1e6)
                cpus.append(cpu / (size / 1e9))
                print(
                    f"rep {rep + 1} {name:10s} {rates[-1]:8.1f} MB/s {cpus[-1]:6.2f} CPU-s/GB",
                    flush=True,
                )
    versions = []
    for mod in ("aioquic", "qh3"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            versions.append(f"{mod} missing")
    print(
        f"\n{size // MiB} MiB, one stream, {DATAGRAM}-byte datagrams, in memory; "
        f"medians of {reps} ({', '.join(versions)})"
    )
    print(f"{'engine':10s} {'MB/s':>8s} {'CPU-s/GB':>9s}")
    for name, (rates, cpus) in rows.items():
        print(f"{name:10s} {statistics.median(rates):8.1f} {statistics.median(cpus):9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
