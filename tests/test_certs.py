"""Mutual TLS between nodes (``tensord.certs``, ``tensord certs``): real files and modes, real
handshakes between two ``trio.SSLStream`` ends over loopback TCP, and the refusals an operator
will meet - each failing fast, with a sentence from ``describe_tls_error`` that says why."""

from __future__ import annotations

import json
import ssl
import stat
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from tensord.certs import (
    client_context,
    describe_tls_error,
    init_ca,
    issue,
    node_id_of,
    peer_node_id,
    server_context,
)
from tensord.config import TlsSettings, load_settings
from tensord.errors import ConfigError

from .support.cli import in_process
from .support.cluster import write_cluster_file

# --------------------------------------------------------------------------------------------
# Helpers


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def node_tls(ca_dir: Path, node_id: str, out_dir: Path, **kwargs: object) -> TlsSettings:
    cert, key = issue(ca_dir, node_id, out_dir, **kwargs)  # type: ignore[arg-type]
    return TlsSettings(ca=ca_dir / "ca.crt", cert=cert, key=key)


@dataclass
class Cluster:
    """A cluster CA with nodes n1 and n2, and a second, unrelated CA with node n3."""

    root: Path
    ca: Path
    other_ca: Path
    n1: TlsSettings
    n2: TlsSettings
    n3: TlsSettings  # a node of the other cluster: its CA, its certificate


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    ca, other = tmp_path / "ca", tmp_path / "other-ca"
    init_ca(ca)
    init_ca(other, common_name="another cluster")
    return Cluster(
        root=tmp_path,
        ca=ca,
        other_ca=other,
        n1=node_tls(ca, "n1", tmp_path / "n1"),
        n2=node_tls(ca, "n2", tmp_path / "n2"),
        n3=node_tls(other, "n3", tmp_path / "n3"),
    )


def expired(cluster: Cluster, node_id: str) -> TlsSettings:
    now = datetime.now(UTC)
    return node_tls(
        cluster.ca,
        node_id,
        cluster.root / f"{node_id}-expired",
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )


def bare_client_context(ca: Path, chain: TlsSettings | None = None) -> ssl.SSLContext:
    """A peer that is not configured by tensord: trusts ``ca``, presents ``chain`` (or none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=ca)
    if chain is not None:
        ctx.load_cert_chain(chain.cert, chain.key)
    return ctx


@dataclass
class End:
    """What one end of a connection saw."""

    peer: str | None = None
    received: bytes = b""
    error: BaseException | None = None
    handshake_done: bool = False


async def connect(
    server_ctx: ssl.SSLContext | None,
    client_ctx: ssl.SSLContext | None,
    *,
    client_plaintext: bytes | None = None,
    server_plaintext: bytes | None = None,
) -> tuple[End, End]:
    """Run a TLS server and a TLS client (or a plaintext one on either side) over real loopback
    TCP; after the handshake the client sends b"ping" and the server answers b"pong". Every
    failure must be quick: 5 s is a hang, not a slow refusal."""
    server, client = End(), End()
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]

    async def serve() -> None:
        tcp = await listener.accept()
        if server_ctx is None:  # a plaintext listener: answers with its own bytes, then closes
            async with tcp:
                server.received = bytes(await tcp.receive_some(4096))
                await tcp.send_all(server_plaintext or b"")
            return
        tls = trio.SSLStream(tcp, server_ctx, server_side=True)
        async with tls:
            try:
                await tls.do_handshake()
                server.handshake_done = True
                server.peer = peer_node_id(tls)
                server.received = await tls.receive_some(100)
                await tls.send_all(b"pong")
            except trio.BrokenResourceError as exc:
                server.error = exc

    async def dial() -> None:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        if client_ctx is None:  # a plaintext client talking to a TLS listener
            async with tcp:
                await tcp.send_all(client_plaintext or b"")
                client.received = bytes(await tcp.receive_some(4096))
            return
        tls = trio.SSLStream(tcp, client_ctx, server_hostname=None)
        async with tls:
            try:
                await tls.do_handshake()
                client.handshake_done = True
                client.peer = peer_node_id(tls)
                await tls.send_all(b"ping")
                client.received = await tls.receive_some(100)
            except trio.BrokenResourceError as exc:
                client.error = exc

    with trio.fail_after(5):
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(dial)
    return server, client


def refused(end: End) -> str:
    """The end failed with trio's error from an ``ssl`` error; returns the sentence for it."""
    assert isinstance(end.error, trio.BrokenResourceError), end
    assert isinstance(end.error.__cause__, ssl.SSLError), end.error.__cause__
    assert not end.received
    return describe_tls_error(end.error)


CLOSED_ON_US = "closed the connection without ending TLS"
NOT_OUR_CA = "not issued by this cluster's CA"


# --------------------------------------------------------------------------------------------
# init-ca and issue: the files


def test_init_ca_writes_the_ca_with_private_modes(tmp_path: Path) -> None:
    directory = tmp_path / "not" / "yet"
    cert_path, key_path = init_ca(directory, common_name="test CA", days=10)

    assert (cert_path, key_path) == (directory / "ca.crt", directory / "ca.key")
    assert mode(directory) == 0o700
    assert mode(cert_path) == 0o644
    assert mode(key_path) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "ca.key"]  # no temp files

    cert = load_cert(cert_path)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert cert.public_key() == key.public_key()
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=test CA"
    cert.verify_directly_issued_by(cert)  # self-signed
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=10) <= lifetime <= timedelta(days=10, minutes=6)


@pytest.mark.parametrize("existing", ["ca.crt", "ca.key"])
def test_init_ca_refuses_to_overwrite_a_ca(tmp_path: Path, existing: str) -> None:
    init_ca(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for name in before:
        if name != existing:
            (tmp_path / name).unlink()  # even half a CA is not overwritten

    with pytest.raises(ConfigError, match="a cluster CA already exists here: refusing"):
        init_ca(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_bytes() == before[existing]


def test_issue_writes_a_node_certificate_signed_by_the_ca(tmp_path: Path) -> None:
    ca_cert_path, _ = init_ca(tmp_path / "ca")
    out = tmp_path / "out"
    cert_path, key_path = issue(tmp_path / "ca", "gpu-1", out, days=30)

    assert (cert_path, key_path) == (out / "gpu-1.crt", out / "gpu-1.key")
    assert mode(cert_path) == 0o644
    assert mode(key_path) == 0o600
    assert mode(out) == 0o700  # created by issue: it holds a key
    assert sorted(p.name for p in out.iterdir()) == ["gpu-1.crt", "gpu-1.key"]

    ca, cert = load_cert(ca_cert_path), load_cert(cert_path)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=gpu-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["tensord://node/gpu-1"]
    assert san.get_values_for_type(x509.DNSName) == ["gpu-1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=30) <= lifetime <= timedelta(days=30, minutes=6)


def test_issue_again_renews_the_node_files(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    cert_path, key_path = issue(tmp_path / "ca", "n1", tmp_path)
    old_cert, old_key = cert_path.read_bytes(), key_path.read_bytes()
    assert issue(tmp_path / "ca", "n1", tmp_path) == (cert_path, key_path)
    assert cert_path.read_bytes() != old_cert
    assert key_path.read_bytes() != old_key
    assert mode(key_path) == 0o600


@pytest.mark.parametrize(
    "node_id", ["", "-n1", ".n1", "n 1", "n/1", "../n1", "n1\n", "nöde", "x" * 64, "n1:7070"]
)
def test_issue_refuses_a_bad_node_id(tmp_path: Path, node_id: str) -> None:
    init_ca(tmp_path / "ca")
    with pytest.raises(ConfigError, match=r"node id: .* is not valid: expected a node id of 1-63"):
        issue(tmp_path / "ca", node_id, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_issue_without_a_ca_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        issue(tmp_path / "no-ca", "n1", tmp_path / "out")
    assert str(err.value) == (
        f"{tmp_path / 'no-ca' / 'ca.crt'}: the cluster CA certificate does not exist (create the "
        f"cluster CA with `tensord certs init-ca --dir {tmp_path / 'no-ca'}`)"
    )
    assert not (tmp_path / "out").exists()

    init_ca(tmp_path / "half")
    (tmp_path / "half" / "ca.key").unlink()
    with pytest.raises(ConfigError, match=r"ca\.key: the cluster CA key does not exist"):
        issue(tmp_path / "half", "n1", tmp_path / "out")

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ca.crt").write_text("not a certificate\n")
    (tmp_path / "bad" / "ca.key").write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"ca\.crt: the cluster CA certificate is not valid"):
        issue(tmp_path / "bad", "n1", tmp_path / "out")


def test_issue_refuses_a_ca_key_that_is_not_the_ca_s(tmp_path: Path) -> None:
    init_ca(tmp_path / "a")
    init_ca(tmp_path / "b")
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    with pytest.raises(ConfigError, match=r"ca\.key: this key does not match the CA certificate"):
        issue(tmp_path / "a", "n1", tmp_path / "out")


def test_issue_never_overwrites_the_ca(tmp_path: Path) -> None:
    init_ca(tmp_path)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match="would overwrite the cluster CA"):
        issue(tmp_path, "ca", tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == before


@pytest.mark.parametrize("host", ["not a host", "-bad.example", "a..b", "http://x", ""])
def test_issue_refuses_a_bad_host(tmp_path: Path, host: str) -> None:
    init_ca(tmp_path / "ca")
    with pytest.raises(ConfigError, match="expected a hostname or an IP address"):
        issue(tmp_path / "ca", "n1", tmp_path / "out", hosts=[host])


def test_issue_refuses_an_empty_validity_or_bad_days(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    now = datetime.now(UTC)
    with pytest.raises(ConfigError, match="certificate validity is empty"):
        issue(tmp_path / "ca", "n1", tmp_path, not_before=now, not_after=now - timedelta(1))
    with pytest.raises(ConfigError, match="days 0 is not valid"):
        issue(tmp_path / "ca", "n1", tmp_path, days=0)
    with pytest.raises(ConfigError, match="days -1 is not valid"):
        init_ca(tmp_path / "ca2", days=-1)


def test_node_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    ca_path, _ = init_ca(tmp_path, days=5)
    cert_path, _ = issue(tmp_path, "n1", tmp_path, days=825)
    assert load_cert(cert_path).not_valid_after_utc == load_cert(ca_path).not_valid_after_utc


# --------------------------------------------------------------------------------------------
# node_id_of


def test_node_id_of_a_certificate_with_hosts(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    hosts = ["10.0.0.5", "gpu-1.cluster.example", "fd00::5", "10.0.0.5"]
    cert_path, _ = issue(tmp_path / "ca", "node_1", tmp_path, hosts=hosts)
    cert = load_cert(cert_path)

    assert node_id_of(cert.public_bytes(serialization.Encoding.DER)) == "node_1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["tensord://node/node_1"]
    # "node_1" is no hostname, so it is not a DNSName; a host given twice appears once.
    assert san.get_values_for_type(x509.DNSName) == ["gpu-1.cluster.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "fd00::5"]


def _self_signed(cn: str | None, uris: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if uris:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("cn", "uris", "expected"),
    [
        ("n7", [], "n7"),  # no tensord URI: the CN
        ("whatever CN", ["tensord://node/n8"], "n8"),  # the URI wins over the CN
        ("n9", ["https://example.com/", "tensord://node/n8"], "n8"),
        ("n9", ["https://example.com/"], "n9"),
        ("not an id", [], None),
        (None, [], None),
        ("n9", ["tensord://node/bad id"], None),  # a bad URI id does not fall back to the CN
        ("n9", ["tensord://node/a", "tensord://node/b"], None),  # two identities: none
    ],
)
def test_node_id_of_prefers_the_uri_and_falls_back_to_the_cn(
    cn: str | None, uris: list[str], expected: str | None
) -> None:
    assert node_id_of(_self_signed(cn, uris)) == expected


def test_node_id_of_garbage_is_none() -> None:
    assert node_id_of(b"") is None
    assert node_id_of(b"\x30\x03\x02\x01\x00") is None


@pytest.fixture(scope="module")
def shared_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("shared-ca")
    init_ca(directory)
    return directory


@settings(max_examples=25, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", fullmatch=True))
def test_every_valid_node_id_round_trips(shared_ca: Path, node_id: str) -> None:
    with tempfile.TemporaryDirectory() as out:
        cert_path, _ = issue(shared_ca, node_id, Path(out))
        der = load_cert(cert_path).public_bytes(serialization.Encoding.DER)
        assert node_id_of(der) == node_id


# --------------------------------------------------------------------------------------------
# Contexts


def test_contexts_are_mutual_tls13_with_only_the_cluster_ca(cluster: Cluster) -> None:
    for ctx in (server_context(cluster.n1), client_context(cluster.n1)):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode is ssl.CERT_REQUIRED
        assert ctx.check_hostname is False
        (trusted,) = ctx.get_ca_certs()  # no system CAs
        assert trusted["subject"] == ((("commonName", "tensord cluster CA"),),)


def test_context_errors_name_the_file_and_the_fault(cluster: Cluster, tmp_path: Path) -> None:
    n1, n2 = cluster.n1, cluster.n2
    cases: list[tuple[TlsSettings, str]] = [
        (
            TlsSettings(ca=n1.ca, cert=n1.cert, key=n2.key),
            f"{n2.key}: this key does not match the certificate {n1.cert}",
        ),
        (
            TlsSettings(ca=tmp_path / "missing.crt", cert=n1.cert, key=n1.key),
            f"{tmp_path / 'missing.crt'}: the cluster CA certificate (tls.ca) does not exist",
        ),
        (
            TlsSettings(ca=n1.ca, cert=tmp_path / "gone.crt", key=n1.key),
            f"{tmp_path / 'gone.crt'}: the node certificate (tls.cert) does not exist",
        ),
        (
            TlsSettings(ca=n1.ca, cert=n1.cert, key=tmp_path),
            f"{tmp_path}: cannot read the node key (tls.key): Is a directory",
        ),
        (
            TlsSettings(ca=n1.ca, cert=n1.key, key=n1.key),
            f"{n1.key}: tls.cert is not valid: expected a PEM certificate",
        ),
        (
            TlsSettings(ca=n1.ca, cert=n1.cert, key=n1.cert),
            f"{n1.cert}: the node key is not valid: expected a PEM private key",
        ),
        (  # a certificate from another CA than the one this node trusts: peers would refuse it
            TlsSettings(ca=n1.ca, cert=cluster.n3.cert, key=cluster.n3.key),
            f"{cluster.n3.cert}: this certificate was not issued by the cluster CA {n1.ca}",
        ),
    ]
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(n1.key.read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    cases.append(
        (
            TlsSettings(ca=n1.ca, cert=n1.cert, key=encrypted),
            f"{encrypted}: the node key is encrypted",
        )
    )
    for tls, message in cases:
        for make in (server_context, client_context):
            with pytest.raises(ConfigError) as err:
                make(tls)
            assert str(err.value).startswith(message), (str(err.value), message)


# --------------------------------------------------------------------------------------------
# Handshakes over real loopback TCP


async def test_mutual_tls_handshake_identifies_both_nodes(cluster: Cluster) -> None:
    server, client = await connect(server_context(cluster.n1), client_context(cluster.n2))

    assert server == End(peer="n2", received=b"ping", handshake_done=True)
    assert client == End(peer="n1", received=b"pong", handshake_done=True)


async def test_a_server_certificate_from_another_ca_is_refused(cluster: Cluster) -> None:
    # n2 dials n3, a node of another cluster: n2 refuses n3's certificate.
    server, client = await connect(server_context(cluster.n3), client_context(cluster.n2))

    assert not client.handshake_done
    assert isinstance(client.error, trio.BrokenResourceError)
    assert isinstance(client.error.__cause__, ssl.SSLCertVerificationError)
    assert NOT_OUR_CA in refused(client)
    assert CLOSED_ON_US in refused(server)
    assert server.peer is None


async def test_a_client_certificate_from_another_ca_is_refused(cluster: Cluster) -> None:
    # A client that trusts our CA (so it accepts n1) but presents another CA's certificate.
    rogue = bare_client_context(cluster.ca / "ca.crt", chain=cluster.n3)
    server, client = await connect(server_context(cluster.n1), rogue)

    assert not server.handshake_done
    assert isinstance(server.error, trio.BrokenResourceError)
    assert isinstance(server.error.__cause__, ssl.SSLCertVerificationError)
    assert NOT_OUR_CA in refused(server)
    # TLS 1.3: the client's handshake completes; it learns of the refusal on its first read.
    assert client.handshake_done
    assert CLOSED_ON_US in refused(client)


async def test_an_expired_server_certificate_is_refused(cluster: Cluster) -> None:
    server, client = await connect(
        server_context(expired(cluster, "old")), client_context(cluster.n2)
    )
    assert "certificate has expired" in refused(client)
    assert CLOSED_ON_US in refused(server)


async def test_an_expired_client_certificate_is_refused(cluster: Cluster) -> None:
    server, client = await connect(
        server_context(cluster.n1), client_context(expired(cluster, "old"))
    )
    assert "certificate has expired" in refused(server)
    assert CLOSED_ON_US in refused(client)


async def test_a_client_without_a_certificate_is_refused(cluster: Cluster) -> None:
    anonymous = bare_client_context(cluster.ca / "ca.crt")
    server, client = await connect(server_context(cluster.n1), anonymous)

    assert "the peer presented no certificate" in refused(server)
    assert client.handshake_done and client.peer == "n1"
    assert CLOSED_ON_US in refused(client)


@pytest.mark.parametrize(
    ("plaintext", "sentence"),
    [
        (b"GET /api/tags HTTP/1.1\r\nHost: n1\r\n\r\n", "plaintext HTTP request"),
        (b"\x00\x00\x00\x2a{'op': 'hello', 'node': 'n2'}", "the peer is not speaking TLS"),
        (b"hello n1, this is n2\n", "the peer is not speaking TLS"),
    ],
)
async def test_plaintext_to_a_tls_listener_is_refused(
    cluster: Cluster, plaintext: bytes, sentence: str
) -> None:
    server, client = await connect(server_context(cluster.n1), None, client_plaintext=plaintext)

    assert sentence in refused(server)
    assert not server.handshake_done
    assert client.received == b""  # the listener hung up on it


@pytest.mark.parametrize(
    ("reply", "sentence"),
    [
        (b"\x00\x00\x00\x05error", "the peer is not speaking TLS"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "the peer is not speaking TLS"),
        (b"", CLOSED_ON_US),  # a listener that just hangs up
    ],
)
async def test_tls_to_a_plaintext_listener_fails(
    cluster: Cluster, reply: bytes, sentence: str
) -> None:
    server, client = await connect(None, client_context(cluster.n2), server_plaintext=reply)

    assert server.received.startswith(b"\x16\x03")  # what it got was a TLS ClientHello
    assert sentence in refused(client)


# --------------------------------------------------------------------------------------------
# describe_tls_error beyond what a handshake produces here


def test_describe_tls_error_on_wrappers_and_other_causes(tmp_path: Path) -> None:
    try:
        issue(tmp_path, "n1", tmp_path)
    except ConfigError as exc:
        assert describe_tls_error(exc) == str(exc)
    alert = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
    wrapped = trio.BrokenResourceError()
    wrapped.__cause__ = alert
    group = ExceptionGroup("connect", [ValueError("unrelated"), wrapped])
    assert describe_tls_error(group).startswith("the peer refused our certificate")
    assert describe_tls_error(trio.TooSlowError()).startswith("the TLS handshake timed out")
    assert describe_tls_error(ConnectionResetError(104, "reset")).startswith("the peer reset")
    assert describe_tls_error(trio.BrokenResourceError()) == (
        "the connection was closed before TLS was established"
    )
    assert describe_tls_error(RuntimeError("odd")) == "the TLS connection failed: RuntimeError: odd"


# --------------------------------------------------------------------------------------------
# The CLI


def test_cli_init_ca_and_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    assert in_process("certs", "init-ca", "--dir", str(ca), "--days", "30") == 0
    out = capsys.readouterr().out
    assert f"wrote {ca / 'ca.crt'} " in out
    assert f"wrote {ca / 'ca.key'} " in out
    assert f"tensord certs issue NODE_ID --ca-dir {ca}" in out
    assert mode(ca / "ca.key") == 0o600

    argv = ["certs", "issue", "n1", "--ca-dir", str(ca), "--out", str(tmp_path / "n1")]
    assert in_process(*argv, "--host", "10.1.2.3", "--host", "n1.lan", "--days", "7") == 0
    out = capsys.readouterr().out
    cert, key = tmp_path / "n1" / "n1.crt", tmp_path / "n1" / "n1.key"
    assert f"wrote {cert} " in out and f"wrote {key} " in out
    assert mode(cert) == 0o644 and mode(key) == 0o600
    san = load_cert(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["n1", "n1.lan"]

    # The snippet it prints is a valid "security" section that configures a working node.
    line, shared = [x for x in out.splitlines() if x.lstrip().startswith('"security":')]
    assert "{node}.crt" in shared  # the form for a cluster file that every node shares
    security = json.loads("{" + line + "}")["security"]
    assert security == {"tls": {"ca": str(ca / "ca.crt"), "cert": str(cert), "key": str(key)}}
    cluster_file = write_cluster_file(
        tmp_path / "cluster.json", {"n1": "127.0.0.1:7070"}, security=security
    )
    settings = load_settings({}, cluster_file=cluster_file, node_id="n1", library=True)
    assert settings.security.tls == TlsSettings(ca=ca / "ca.crt", cert=cert, key=key)
    server_context(settings.security.tls)


def test_cli_uses_default_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert in_process("certs", "init-ca") == 0
    assert in_process("certs", "issue", "n2") == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "tensord-ca").iterdir()) == ["ca.crt", "ca.key"]
    assert (tmp_path / "n2.crt").is_file() and (tmp_path / "n2.key").is_file()


def test_cli_errors_are_one_line_and_status_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = str(tmp_path / "ca")
    assert in_process("certs", "init-ca", "--dir", ca) == 0
    capsys.readouterr()

    assert in_process("certs", "init-ca", "--dir", ca) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"tensord: {tmp_path / 'ca' / 'ca.crt'}: a cluster CA already exists")
    assert err.count("\n") == 1

    assert in_process("certs", "issue", "bad id", "--ca-dir", ca, "--out", str(tmp_path)) == 78
    assert capsys.readouterr().err.startswith("tensord: node id: 'bad id' is not valid")
    assert in_process("certs", "issue", "n1", "--ca-dir", str(tmp_path / "none")) == 78
    assert "does not exist (create the cluster CA with" in capsys.readouterr().err


def test_cli_requires_a_certs_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        in_process("certs")
    assert exit_.value.code == 2
    assert "init-ca" in capsys.readouterr().err
