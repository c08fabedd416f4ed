"""Mutual TLS between cluster nodes: a cluster CA, one certificate per node, and the contexts.

A peer is authenticated by "its certificate was signed by our cluster CA" and identified by the
node id in that certificate (the URI SAN ``tensord://node/<id>``), never by hostname: nodes
change addresses, their ids do not, and the caller compares the id with the node it meant to
reach (:func:`peer_node_id`). Operators create the files with ``tensord certs init-ca`` and
``tensord certs issue NODE_ID`` (:mod:`tensord.cli.certs`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import ssl
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import TlsSettings, parse_node_id
from .errors import ConfigError
from .fsutil import fsync_dir, unlink_quietly, write_temp

if TYPE_CHECKING:
    import trio

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
NODE_URI_PREFIX = "tensord://node/"

# Certificates start a little in the past so that a peer whose clock is slightly behind the
# issuer's does not refuse a certificate issued a moment ago as "not yet valid".
_CLOCK_SKEW = timedelta(minutes=5)
# Every node both listens and dials, so one certificate serves both ends.
_NODE_USAGES = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
# RFC 1123 labels; stricter than the cluster file's check because a DNSName SAN that a TLS
# library rejects would make the whole certificate unusable.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\Z")

_IssuerPublicKey = (
    ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
_SigningKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


# --------------------------------------------------------------------------------------------
# Creating the CA and node certificates


def init_ca(
    directory: Path, *, common_name: str = "tensord cluster CA", days: int = 3650
) -> tuple[Path, Path]:
    """Create the cluster CA in ``directory``: ``ca.crt`` (0644) and ``ca.key`` (0600).

    Refuses to overwrite an existing CA: replacing it silently would make every node
    certificate it signed untrusted at once. ``path_length=0`` because the CA signs node
    certificates only, never another CA. Returns ``(cert_path, key_path)``.
    """
    _check_days(days)
    if not 1 <= len(common_name) <= 64:
        raise ConfigError(f"CA common name {common_name!r} is not valid: expected 1-64 characters")
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    for path in (cert_path, key_path):
        if os.path.lexists(path):
            raise ConfigError(
                f"{path}: a cluster CA already exists here: refusing to overwrite it, since every "
                "node certificate it signed would stop being trusted (use another directory, "
                "or remove the old CA deliberately)"
            )
    _make_dir(directory)
    key, builder = _self_signed(common_name, days)
    cert = (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_files([(key_path, _private_pem(key), 0o600), (cert_path, _cert_pem(cert), 0o644)])
    return cert_path, key_path


def ephemeral_certificate() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A throwaway self-signed certificate for a QUIC listener without ``security.tls``: QUIC
    cannot run without one. Nobody verifies it; it only keys the encryption."""
    key, builder = _self_signed("tensord ephemeral", 365)
    return builder.sign(key, hashes.SHA256()), key


def _self_signed(
    common_name: str, days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateBuilder]:
    """A new P-256 key and a certificate builder naming it as its own issuer."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
    )
    return key, builder


def issue(
    ca_dir: Path,
    node_id: str,
    out_dir: Path,
    *,
    days: int = 825,
    hosts: Sequence[str] = (),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[Path, Path]:
    """Issue node ``node_id`` a key and a certificate signed by the CA in ``ca_dir``.

    Writes ``<node_id>.crt`` (0644) and ``<node_id>.key`` (0600) into ``out_dir``, replacing
    earlier ones: issuing again is how a certificate is renewed. ``hosts`` (hostnames or IP
    addresses) are added as SANs for tools that check them; tensord itself checks the node id.
    ``not_before``/``not_after`` override the validity (naive datetimes are UTC), e.g. to make
    an expired certificate in a test. Returns ``(cert_path, key_path)``.
    """
    node_id = parse_node_id("node id", node_id)
    _check_days(days)
    sans = _subject_alt_names(node_id, hosts)
    ca_cert, ca_key = _load_ca(ca_dir)
    now = datetime.now(UTC)
    start = _utc(not_before) if not_before is not None else now - _CLOCK_SKEW
    if not_after is not None:
        end = _utc(not_after)
    else:
        ca_end = ca_cert.not_valid_after_utc
        if ca_end <= now:
            raise ConfigError(
                f"{ca_dir / CA_CERT_NAME}: the cluster CA expired on {ca_end:%Y-%m-%d}: "
                "certificates it signs would be refused; create a new CA"
            )
        # A certificate cannot outlive the CA that vouches for it.
        end = min(now + timedelta(days=days), ca_end)
    if end <= start:
        raise ConfigError(
            f"certificate validity is empty: not_after ({end:%Y-%m-%d %H:%M:%S}) must be later "
            f"than not_before ({start:%Y-%m-%d %H:%M:%S})"
        )

    cert_path, key_path = out_dir / f"{node_id}.crt", out_dir / f"{node_id}.key"
    ca_files = {(ca_dir / CA_CERT_NAME).resolve(), (ca_dir / CA_KEY_NAME).resolve()}
    if {cert_path.resolve(), key_path.resolve()} & ca_files:
        raise ConfigError(
            f"{cert_path}: writing node {node_id!r} here would overwrite the cluster CA: "
            "choose another output directory"
        )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(_NODE_USAGES), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
        .sign(ca_key, _signing_hash(ca_key))
    )
    _make_dir(out_dir)
    _write_files([(key_path, _private_pem(key), 0o600), (cert_path, _cert_pem(cert), 0o644)])
    return cert_path, key_path


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """Points at the CA's key, so that verifiers find the issuer even while two CAs with the
    same name are trusted (a CA rotation)."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_issuer_public_key(ca_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _issuer_public_key(cert: x509.Certificate) -> _IssuerPublicKey:
    key = cert.public_key()
    if not isinstance(key, _IssuerPublicKey):
        raise ConfigError(f"the CA certificate's key type ({type(key).__name__}) cannot sign")
    return key


def _check_days(days: int) -> None:
    if not 1 <= days <= 100 * 366:
        raise ConfigError(f"days {days!r} is not valid: expected a number of days from 1 to 36600")


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _subject_alt_names(node_id: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The identity URI first, then DNS names and IP addresses for other tools' benefit."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_id)]
    seen: set[str] = set()
    if _is_hostname(node_id):
        names.append(x509.DNSName(node_id))
        seen.add(node_id.lower())
    for host in hosts:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if not _is_hostname(host):
                raise ConfigError(
                    f"host {host!r} is not valid: expected a hostname or an IP address"
                ) from None
            if host.lower() not in seen:
                seen.add(host.lower())
                names.append(x509.DNSName(host))
        else:
            if str(ip) not in seen:
                seen.add(str(ip))
                names.append(x509.IPAddress(ip))
    return names


def _is_hostname(name: str) -> bool:
    """A DNS name (not an IP address written as one: "10.0.0.1" is a valid node id too)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return bool(_HOSTNAME_RE.match(name))
    return False


def _make_dir(directory: Path) -> None:
    """Create ``directory`` as 0700 if missing: it holds private keys."""
    if directory.is_dir():
        return
    try:
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot create the directory: {_why(exc)}") from None


def _write_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write each file atomically (temp file, fsync, rename), with its mode set before any byte.

    All temp files are written before the first rename, so a failure (a full disk) leaves the
    directory as it was; a key file is never readable by others, not even for a moment.
    """
    written: list[tuple[Path, Path]] = []
    current = files[0][0]
    try:
        for current, data, mode in files:
            written.append((write_temp(current, data, mode), current))
        for tmp, current in written:
            os.replace(tmp, current)
    except OSError as exc:
        raise ConfigError(f"{current}: cannot write the file: {_why(exc)}") from None
    finally:
        for tmp, _ in written:
            unlink_quietly(tmp)
    fsync_dir(files[0][0].parent)


def _private_pem(key: _SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _signing_hash(key: _SigningKey) -> hashes.SHA256 | None:
    """Ed25519 and Ed448 sign without a separate hash; the others use SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


# --------------------------------------------------------------------------------------------
# Reading certificates and keys, with one clear line for each thing that can be wrong


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _read(path: Path, what: str, hint: str = "") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} does not exist{hint}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {_why(exc)}") from None


def _parse_certs(path: Path, data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{path}: {what} is not valid: expected a PEM certificate")
    return certs


def _parse_key(path: Path, data: bytes, what: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{path}: {what} is encrypted: tensord needs an unencrypted key, protected by its "
            "file permissions (0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: {what} is not valid: expected a PEM private key") from None


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert == ca:
        return True
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, _SigningKey]:
    hint = f" (create the cluster CA with `tensord certs init-ca --dir {ca_dir}`)"
    cert_path, key_path = ca_dir / CA_CERT_NAME, ca_dir / CA_KEY_NAME
    cert_data = _read(cert_path, "the cluster CA certificate", hint)
    key_data = _read(key_path, "the cluster CA key", hint)
    cert = _parse_certs(cert_path, cert_data, "the cluster CA certificate")[0]
    key = _parse_key(key_path, key_data, "the cluster CA key")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        is_ca = False
    if not is_ca:
        raise ConfigError(
            f"{cert_path}: not a CA certificate: expected one made by `tensord certs init-ca`"
        )
    if not isinstance(key, _SigningKey) or _spki(key.public_key()) != _spki(cert.public_key()):
        raise ConfigError(
            f"{key_path}: this key does not match the CA certificate {cert_path}: expected the "
            "pair written together by `tensord certs init-ca`"
        )
    return cert, key


# --------------------------------------------------------------------------------------------
# SSL contexts


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The listener's context: TLS 1.3, and a client certificate from the cluster CA required."""
    return _context(tls, server_side=True)


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """The dialer's context: TLS 1.3, and the server's certificate from the cluster CA required.

    No hostname check: the caller checks the node id (:func:`peer_node_id`) instead, so pass
    ``server_hostname=None`` (or anything, it is only sent as SNI).
    """
    return _context(tls, server_side=False)


def _context(tls: TlsSettings, *, server_side: bool) -> ssl.SSLContext:
    """Check the three files first, so that a mistake is one line naming the file and the fix
    rather than an OpenSSL error, or every peer refusing us later."""
    ca_certs = _parse_certs(
        tls.ca, _read(tls.ca, "the cluster CA certificate (tls.ca)"), "the CA certificate"
    )
    chain = _parse_certs(tls.cert, _read(tls.cert, "the node certificate (tls.cert)"), "tls.cert")
    key = _parse_key(tls.key, _read(tls.key, "the node key (tls.key)"), "the node key")
    if _spki(key.public_key()) != _spki(chain[0].public_key()):
        raise ConfigError(
            f"{tls.key}: this key does not match the certificate {tls.cert}: expected the key "
            "issued with it (`tensord certs issue` writes them as a pair)"
        )
    if not any(_issued_by(chain[-1], ca) for ca in ca_certs):
        raise ConfigError(
            f"{tls.cert}: this certificate was not issued by the cluster CA {tls.ca}: peers "
            "would refuse it; issue it with the same CA (`tensord certs issue --ca-dir ...`)"
        )

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is the node id, checked by the caller
    ctx.verify_mode = ssl.CERT_REQUIRED  # both ends: mutual TLS
    try:
        # Only the cluster CA: a certificate from a public CA must not admit anyone.
        ctx.load_verify_locations(cadata="".join(_cert_pem(c).decode() for c in ca_certs))
    except ssl.SSLError as exc:
        raise ConfigError(f"{tls.ca}: OpenSSL refused the CA certificate: {exc}") from None
    try:
        # password=b"": an encrypted key fails instead of OpenSSL prompting on the terminal.
        ctx.load_cert_chain(certfile=tls.cert, keyfile=tls.key, password=b"")
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{tls.cert}: OpenSSL refused the certificate or its key {tls.key}: {exc}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{exc.filename or tls.cert}: cannot read the file: {_why(exc)}"
        ) from None
    return ctx


# --------------------------------------------------------------------------------------------
# Identity


def node_id_of(cert_der: bytes) -> str | None:
    """The node id a DER certificate names: its ``tensord://node/<id>`` URI SAN, or, only when
    it has no such URI, its common name. ``None`` if there is none, or it is not a valid id.

    The URI wins because the CN of a certificate from an operator's own PKI may be anything.
    """
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except ValueError:
        return None
    ids = {uri[len(NODE_URI_PREFIX) :] for uri in uris if uri.startswith(NODE_URI_PREFIX)}
    if ids:
        # Two different ids in one certificate identify no one.
        return _valid_node_id(ids.pop()) if len(ids) == 1 else None
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) != 1 or not isinstance(common_names[0].value, str):
        return None
    return _valid_node_id(common_names[0].value)


def peer_node_id(stream: trio.SSLStream[Any]) -> str | None:
    """The node id of the peer of ``stream``, whose handshake must be done (else trio raises
    ``NeedHandshakeError``). The peer was verified against the cluster CA by then."""
    der = stream.getpeercert(binary_form=True)
    return node_id_of(der) if isinstance(der, bytes) else None


def _valid_node_id(value: str) -> str | None:
    try:
        return parse_node_id("node id", value)
    except ConfigError:
        return None


# --------------------------------------------------------------------------------------------
# Explaining failures

_NOT_OUR_CA = (
    "the peer's certificate was not issued by this cluster's CA: is it a node of another "
    "cluster, or was its certificate issued from another CA directory?"
)
_NOT_TLS = (
    "the peer is not speaking TLS: it is probably a node without TLS configured (plaintext), "
    "or not a tensord node at all"
)
# OpenSSL verify codes (X509_V_ERR_*) for a certificate that does not chain to our CA.
_UNKNOWN_ISSUER_CODES = frozenset({2, 7, 18, 19, 20, 21, 30, 31, 32})
_REASONS: dict[str, str] = {
    "TLSV1_ALERT_UNKNOWN_CA": (
        "the peer refused our certificate: it does not trust the CA that issued it "
        "(does it use another cluster's CA?)"
    ),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": (
        "the peer refused our certificate as expired: renew it with `tensord certs issue`"
    ),
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the peer refused our certificate as unsuitable",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "the peer requires a certificate and we presented none: configure security.tls here"
    ),
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": (
        "the peer presented no certificate: it has no TLS certificate configured "
        "(security.tls), or it is not a node of this cluster"
    ),
    "HTTP_REQUEST": "the peer sent a plaintext HTTP request to this TLS listener",
    "HTTPS_PROXY_REQUEST": "the peer sent an HTTP proxy request to this TLS listener",
    "WRONG_VERSION_NUMBER": _NOT_TLS,
    "UNKNOWN_PROTOCOL": _NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": _NOT_TLS,
    "RECORD_LAYER_FAILURE": _NOT_TLS,
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer does not support TLS 1.3, which tensord requires",
    "UNSUPPORTED_PROTOCOL": "the peer does not support TLS 1.3, which tensord requires",
    "NO_PROTOCOLS_AVAILABLE": "the peer does not support TLS 1.3, which tensord requires",
    "UNEXPECTED_EOF_WHILE_READING": (
        "the peer closed the connection without ending TLS: right after connecting, that means "
        "it refused our certificate (another cluster's CA, expired, or none) or does not speak TLS"
    ),
}


def describe_tls_error(exc: BaseException) -> str:
    """One short sentence for a failed TLS connection, for log lines and typed errors.

    Looks through trio's wrappers (``BrokenResourceError`` from an ``SSLError``) and exception
    groups for the most telling cause. The side that refuses gets the precise reason; its peer
    only sees the connection close, because trio closes without sending the TLS alert. With
    TLS 1.3 a client whose certificate is refused completes its handshake and sees that close
    on its first read.
    """
    fallback: str | None = None
    for cause in _causes(exc):
        found = _describe(cause)
        if found is not None:
            return found
        if fallback is None:
            fallback = _describe_generic(cause)
    return fallback or f"the TLS connection failed: {type(exc).__name__}: {exc}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        nested: list[BaseException] = []
        if isinstance(e, BaseExceptionGroup):
            nested.extend(e.exceptions)
        nested.extend(c for c in (e.__cause__, e.__context__) if c is not None)
        stack.extend(reversed(nested))


def _describe(e: BaseException) -> str | None:
    if isinstance(e, ConfigError):
        return str(e)
    if isinstance(e, ssl.SSLCertVerificationError):
        code = e.verify_code
        if code == 10:
            return (
                "the peer's certificate has expired (renew it with `tensord certs issue`), "
                "or this machine's clock is wrong"
            )
        if code == 9:
            return "the peer's certificate is not valid yet: check both machines' clocks"
        if code in _UNKNOWN_ISSUER_CODES:
            return _NOT_OUR_CA
        if code == 26:
            return "the peer's certificate is not for TLS between nodes (its key usage is wrong)"
        return f"the peer's certificate failed verification: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        reason = (e.reason or "").upper()
        if reason in _REASONS:
            return _REASONS[reason]
        if isinstance(e, ssl.SSLEOFError):
            return _REASONS["UNEXPECTED_EOF_WHILE_READING"]
        if isinstance(e, ssl.SSLZeroReturnError):
            return "the peer closed the TLS connection"
        return f"TLS failed: {(e.reason or str(e)).lower().replace('_', ' ')}"
    return None


def _describe_generic(e: BaseException) -> str | None:
    """Causes that are not TLS errors themselves, used only if no TLS error explains more."""
    name = type(e).__name__
    if name == "TooSlowError":  # trio's, without importing trio at run time
        return (
            "the TLS handshake timed out: the peer is not answering TLS (a plaintext listener?) "
            "or is stalled"
        )
    if isinstance(e, ConnectionResetError) or (
        isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.EPIPE)
    ):
        return "the peer reset the connection during TLS: it may have refused our certificate"
    if isinstance(e, ConnectionRefusedError):
        return "the connection was refused: nothing is listening there"
    if name in ("BrokenResourceError", "ClosedResourceError", "EndOfChannel"):
        return "the connection was closed before TLS was established"
    return None


__all__ = [
    "CA_CERT_NAME",
    "CA_KEY_NAME",
    "NODE_URI_PREFIX",
    "client_context",
    "describe_tls_error",
    "init_ca",
    "issue",
    "node_id_of",
    "peer_node_id",
    "server_context",
]
