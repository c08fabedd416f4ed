"""One typed, validated ``Settings``: defaults < JSON cluster file < env vars < CLI flags.

The cluster file is the same on every node; a node finds itself in it by its id. Everything is
validated here, at start, so that a bad value fails with one line naming where it came from (the
file and key, or the variable), the value, and what is accepted - never deep inside a transfer.
Nothing else in tensord reads ``os.environ``: the ``Settings`` object is built once and passed down.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .limits import MAX_CHUNK, MIN_CHUNK

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MIN_CHUNK_SIZE = MIN_CHUNK  # the protocol's bounds (tensord/limits.py)
MAX_CHUNK_SIZE = MAX_CHUNK
DEFAULT_PEER_PORT = 7070
LOG_LEVELS = ("debug", "info", "warning", "error")
TRANSPORTS = ("tcp", "quic")

_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")  # \Z: "$" lets "x\n" in
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")


@dataclass(frozen=True)
class HostPort:
    """A validated ``host:port`` (IPv6 hosts in brackets on the wire, bare here)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeEntry:
    """One node of the cluster file."""

    id: str
    addr: HostPort
    ollama: str | None = None
    transport: str = "tcp"


@dataclass(frozen=True)
class TensorProtocolSettings:
    """The ``tensor_protocol`` section, spelled exactly as Ollama's cluster guide spells it."""

    use_streaming_protocol: bool = True
    chunk_size: int = 1 * MiB
    enable_compression: bool = True
    compression_threshold: int = 4096
    max_retries: int = 3
    retry_base_delay: int = 500  # milliseconds, doubled per retry, capped at 5 s


@dataclass(frozen=True)
class PoolSettings:
    max_connections: int = 10
    max_idle_seconds: float = 300.0


@dataclass(frozen=True)
class TransferSettings:
    """Flow control, timeouts and the limits a peer's input is held to."""

    window_bytes: int = 32 * MiB  # bytes of chunks in flight before the sender waits for acks
    connect_timeout: float = 10.0  # dial + handshake
    io_timeout: float = 30.0  # no progress at all for this long -> the attempt fails
    max_tensor_bytes: int = 64 * GiB
    max_header_bytes: int = 64 * KiB
    partial_ttl_seconds: float = 600.0  # receiver keeps an interrupted transfer this long
    drain_timeout: float = 30.0  # on SIGTERM, transfers in flight get this long to finish
    peer_check_interval: float = 10.0  # the daemon pings each configured peer this often
    # What one peer may hold of this node (a hostile or broken peer is refused, others go on):
    max_peer_connections: int = 64  # inbound connections from one peer at once
    max_peer_transfers: int = 64  # receives from one peer in flight (and partials kept)
    max_peer_pending_bytes: int = 64 * GiB  # tensor bytes of those receives and partials
    max_connections: int = 1024  # inbound connections, all peers, handshakes included
    # Before a peer has proved who it is (TLS, secret, Hello) it gets a short deadline and a
    # small budget of its own; when the budget is full the oldest such connection is dropped
    # for the new one (sshd's MaxStartups), so idle strangers cannot lock members out.
    handshake_timeout: float = 5.0  # inbound: accept to authenticated Hello
    max_unauthenticated: int = 32  # inbound connections still in their handshake


@dataclass(frozen=True)
class TlsSettings:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class SecuritySettings:
    secret_file: Path | None = None
    tls: TlsSettings | None = None
    insecure: bool = False


@dataclass(frozen=True)
class DownloadSettings:
    connections: int = 4
    min_chunk_size: int = 8 * MiB
    max_concurrent: int = 2
    credentials_file: Path | None = None
    max_bytes: int = 256 * GiB  # largest blob or URL download; a bigger Content-Length is refused


@dataclass(frozen=True)
class GatewaySettings:
    listen: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 11435))
    api_keys_file: Path | None = None
    keepalive_seconds: float = 15.0
    max_connections: int = 1024  # client connections open at once
    read_timeout: float = 30.0  # a request (headers and body) must arrive within this


@dataclass(frozen=True)
class ControlSettings:
    socket: Path | None = None
    max_connections: int = 64  # control clients connected at once
    read_timeout: float = 30.0  # a request (headers and body) must arrive within this


@dataclass(frozen=True)
class QuicSettings:
    """The QUIC transport's knobs (tensord/net/quic.py QuicTuning explains each)."""

    max_datagram_size: int = 1452  # 8952 on jumbo-frame networks: ~4.5x the throughput
    congestion_control: str = "reno"
    idle_timeout: float = 30.0
    stream_window: int = 8 * MiB
    connection_window: int = 32 * MiB


@dataclass(frozen=True)
class StoreSettings:
    """The tensor store under ``state_dir``: ``max_bytes`` caps it (``None``: the disk does)."""

    max_bytes: int | None = None


@dataclass(frozen=True)
class Settings:
    """Everything a node needs to know, validated. Build it with :func:`load_settings`."""

    node_id: str = "local"
    listen: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", DEFAULT_PEER_PORT))
    cluster_name: str = "tensord"
    cluster_file: Path | None = None
    nodes: tuple[NodeEntry, ...] = ()
    tensor_protocol: TensorProtocolSettings = field(default_factory=TensorProtocolSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    downloads: DownloadSettings = field(default_factory=DownloadSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    control: ControlSettings = field(default_factory=ControlSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    quic: QuicSettings = field(default_factory=QuicSettings)
    transport: str = "tcp"
    state_dir: Path | None = None
    log_level: str = "info"

    @classmethod
    def for_library(cls, **changes: Any) -> Settings:
        """Embedded defaults for a library node: a fresh id, 127.0.0.1 on an ephemeral port."""
        base = cls(node_id=f"node-{secrets.token_hex(4)}", listen=HostPort("127.0.0.1", 0))
        return replace(base, **changes)

    def node(self, node_id: str) -> NodeEntry | None:
        for entry in self.nodes:
            if entry.id == node_id:
                return entry
        return None

    @property
    def peers(self) -> tuple[NodeEntry, ...]:
        """The cluster's other nodes."""
        return tuple(n for n in self.nodes if n.id != self.node_id)

    def with_protocol(self, **changes: Any) -> Settings:
        return replace(self, tensor_protocol=replace(self.tensor_protocol, **changes))

    def with_transfer(self, **changes: Any) -> Settings:
        return replace(self, transfer=replace(self.transfer, **changes))

    def with_pool(self, **changes: Any) -> Settings:
        return replace(self, pool=replace(self.pool, **changes))


# --------------------------------------------------------------------------------------------
# Value parsers. Each takes (where, value) and returns the typed value or raises ConfigError with
# one line: "<where>: <value> is not valid: <what is accepted>".


def _fail(where: str, value: object, accepted: str) -> ConfigError:
    return ConfigError(f"{where}: {value!r} is not valid: expected {accepted}")


def parse_bool(where: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    raise _fail(where, value, "true or false")


def parse_int(where: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool):
        raise _fail(where, value, "an integer")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        n = int(value)
    else:
        raise _fail(where, value, "an integer")
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        raise _fail(where, value, f"an integer in {_range_text(lo, hi)}")
    return n


def parse_float(where: str, value: object, lo: float = 0.0) -> float:
    if isinstance(value, bool):
        raise _fail(where, value, "a number")
    try:
        f = float(value) if isinstance(value, int | float | str) else None
    except ValueError:
        f = None
    if f is None or f != f or f < lo:
        raise _fail(where, value, f"a number >= {lo:g}")
    return f


def parse_str(where: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(where, value, "a non-empty string")
    return value


def parse_path(where: str, value: object) -> Path:
    return Path(parse_str(where, value)).expanduser()


def parse_node_id(where: str, value: object) -> str:
    if not isinstance(value, str) or not _NODE_ID_RE.match(value):
        raise _fail(where, value, "a node id of 1-63 letters, digits, '.', '_' or '-'")
    return value


def parse_choice(where: str, value: object, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    if isinstance(value, str) and value.strip().lower() == "warn" and "warning" in choices:
        return "warning"
    raise _fail(where, value, "one of " + ", ".join(choices))


def parse_hostport(where: str, value: object, allow_port_zero: bool = False) -> HostPort:
    """Parse ``host:port`` or ``[v6]:port``; the host must be an IP address or a hostname."""
    accepted = "host:port (an IP address or hostname, and a port 1-65535)"
    if not isinstance(value, str):
        raise _fail(where, value, accepted)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})", value) or re.fullmatch(
        r"([^:\[\]\s]+):(\d{1,5})", value
    )
    if not m:
        raise _fail(where, value, accepted)
    host, port = m.group(1), int(m.group(2))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.match(host) or ":" in value[: value.rfind(":")].strip("[]"):
            raise _fail(where, value, accepted) from None
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise _fail(where, value, accepted)
    return HostPort(host, port)


def parse_url(where: str, value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise _fail(where, value, "an http:// or https:// URL")
    return value.rstrip("/")


def _range_text(lo: int | None, hi: int | None) -> str:
    def fmt(n: int) -> str:
        for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
            if n >= size and n % size == 0:
                return f"{n // size} {unit}"
        return str(n)

    if lo is not None and hi is not None:
        return f"{fmt(lo)}..{fmt(hi)}"
    if lo is not None:
        return f">= {fmt(lo)}"
    return f"<= {fmt(hi or 0)}"


# --------------------------------------------------------------------------------------------
# The cluster file.

T = TypeVar("T")


def _section(
    where: str, value: object, keys: Mapping[str, Callable[[str, object], Any]]
) -> dict[str, Any]:
    """Validate a JSON object against known keys; unknown keys are errors, not silently ignored."""
    if not isinstance(value, dict):
        raise _fail(where, value, "a JSON object")
    out: dict[str, Any] = {}
    for key, raw in value.items():
        parser = keys.get(key)
        if parser is None:
            raise ConfigError(
                f"{where}: unknown key {key!r}: expected one of {', '.join(sorted(keys))}"
            )
        out[key] = parser(f"{where}.{key}", raw)
    return out


def _nullable(parser: Callable[[str, object], T]) -> Callable[[str, object], T | None]:
    def parse(where: str, value: object) -> T | None:
        return None if value is None else parser(where, value)

    return parse


def _not_string(where: str, value: object, accepted: str) -> None:
    """In the JSON file, numbers and booleans are JSON numbers and booleans, not strings
    (env vars are always strings and use the parsers directly)."""
    if isinstance(value, str):
        raise _fail(where, value, f"{accepted} (a JSON value, not a string)")


def _int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str, object], int]:
    def parse(where: str, value: object) -> int:
        _not_string(where, value, "an integer")
        return parse_int(where, value, lo, hi)

    return parse


def _float_min(lo: float) -> Callable[[str, object], float]:
    def parse(where: str, value: object) -> float:
        _not_string(where, value, "a number")
        return parse_float(where, value, lo)

    return parse


def _json_bool(where: str, value: object) -> bool:
    _not_string(where, value, "true or false")
    return parse_bool(where, value)


_PROTOCOL_KEYS: dict[str, Callable[[str, object], Any]] = {
    "use_streaming_protocol": _json_bool,
    "chunk_size": _int_in(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE),
    "enable_compression": _json_bool,
    "compression_threshold": _int_in(0),
    "max_retries": _int_in(0, 100),
    "retry_base_delay": _int_in(0, 60_000),
}
_POOL_KEYS: dict[str, Callable[[str, object], Any]] = {
    "max_connections": _int_in(1, 1024),
    "max_idle_seconds": _float_min(0.0),
}
_TRANSFER_KEYS: dict[str, Callable[[str, object], Any]] = {
    "window_bytes": _int_in(64 * KiB, 4 * GiB),
    "connect_timeout": _float_min(0.001),
    "io_timeout": _float_min(0.001),
    "max_tensor_bytes": _int_in(1, 1 << 50),
    "max_header_bytes": _int_in(1 * KiB, 16 * MiB),
    "partial_ttl_seconds": _float_min(0.0),
    "drain_timeout": _float_min(0.0),
    "peer_check_interval": _float_min(0.01),
    "max_peer_connections": _int_in(1, 1 << 16),
    "max_peer_transfers": _int_in(1, 1 << 16),
    "max_peer_pending_bytes": _int_in(1, 1 << 62),
    "max_connections": _int_in(1, 1 << 20),
    "handshake_timeout": _float_min(0.001),
    "max_unauthenticated": _int_in(1, 1 << 16),
}
_DOWNLOAD_KEYS: dict[str, Callable[[str, object], Any]] = {
    "connections": _int_in(1, 64),
    "min_chunk_size": _int_in(64 * KiB, 1 * GiB),
    "max_concurrent": _int_in(1, 64),
    "credentials_file": _nullable(parse_path),
    "max_bytes": _int_in(1, 1 << 50),
}
_CONTROL_KEYS: dict[str, Callable[[str, object], Any]] = {
    "socket": _nullable(parse_path),
    "max_connections": _int_in(1, 1 << 16),
    "read_timeout": _float_min(0.1),
}
_STORE_KEYS: dict[str, Callable[[str, object], Any]] = {"max_bytes": _nullable(_int_in(0, 1 << 62))}
_QUIC_KEYS: dict[str, Callable[[str, object], Any]] = {
    "max_datagram_size": _int_in(1200, 16000),
    "congestion_control": lambda w, v: parse_choice(w, v, ("reno", "cubic")),
    "idle_timeout": _float_min(1.0),
    "stream_window": _int_in(64 * KiB, 4 * GiB),
    "connection_window": _int_in(64 * KiB, 4 * GiB),
}


def _parse_tls(where: str, value: object) -> TlsSettings | None:
    if value is None:
        return None
    keys: dict[str, Callable[[str, object], Any]] = {
        "ca": parse_path,
        "cert": parse_path,
        "key": parse_path,
    }
    got = _section(where, value, keys)
    missing = [k for k in keys if k not in got]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}: expected ca, cert and key paths")
    return TlsSettings(**got)


def _parse_security(where: str, value: object) -> SecuritySettings:
    keys: dict[str, Callable[[str, object], Any]] = {
        "secret_file": _nullable(parse_path),
        "tls": _parse_tls,
        "insecure": _json_bool,
    }
    return SecuritySettings(**_section(where, value, keys))


def _quic_settings(where: str, values: dict[str, Any]) -> QuicSettings:
    q = QuicSettings(**values)
    if q.connection_window < q.stream_window:
        raise ConfigError(f"{where}: connection_window must be at least stream_window")
    return q


def _parse_gateway(where: str, value: object) -> GatewaySettings:
    keys: dict[str, Callable[[str, object], Any]] = {
        "listen": parse_hostport,
        "api_keys_file": _nullable(parse_path),
        "keepalive_seconds": _float_min(0.1),
        "max_connections": _int_in(1, 1 << 20),
        "read_timeout": _float_min(0.1),
    }
    return GatewaySettings(**_section(where, value, keys))


def _parse_node(where: str, value: object) -> NodeEntry:
    keys: dict[str, Callable[[str, object], Any]] = {
        "id": parse_node_id,
        "addr": parse_hostport,
        "ollama": _nullable(parse_url),
        "transport": lambda w, v: parse_choice(w, v, TRANSPORTS),
    }
    got = _section(where, value, keys)
    for required in ("id", "addr"):
        if required not in got:
            raise ConfigError(f"{where}: missing {required!r}: every node needs an id and an addr")
    return NodeEntry(**got)


def _parse_nodes(where: str, value: object) -> tuple[NodeEntry, ...]:
    if not isinstance(value, list):
        raise _fail(where, value, "a JSON array of node objects")
    nodes = tuple(_parse_node(f"{where}[{i}]", v) for i, v in enumerate(value))
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        if node.id in seen:
            raise ConfigError(
                f"{where}[{i}].id: {node.id!r} is a duplicate: node ids must be unique"
            )
        seen.add(node.id)
    return nodes


_FILE_KEYS: dict[str, Callable[[str, object], Any]] = {
    "name": parse_str,
    "nodes": _parse_nodes,
    "tensor_protocol": lambda w, v: TensorProtocolSettings(**_section(w, v, _PROTOCOL_KEYS)),
    "pool": lambda w, v: PoolSettings(**_section(w, v, _POOL_KEYS)),
    "transfer": lambda w, v: TransferSettings(**_section(w, v, _TRANSFER_KEYS)),
    "security": _parse_security,
    "downloads": lambda w, v: DownloadSettings(**_section(w, v, _DOWNLOAD_KEYS)),
    "gateway": _parse_gateway,
    "control": lambda w, v: ControlSettings(**_section(w, v, _CONTROL_KEYS)),
    "store": lambda w, v: StoreSettings(**_section(w, v, _STORE_KEYS)),
    "quic": lambda w, v: _quic_settings(w, _section(w, v, _QUIC_KEYS)),
    "state_dir": _nullable(parse_path),
    "log_level": lambda w, v: parse_choice(w, v, LOG_LEVELS),
}


def read_cluster_file(path: Path) -> dict[str, Any]:
    """Read and validate a cluster file; returns the parsed sections keyed as in the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the cluster file: {exc.strerror or exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"
        ) from None
    return _section(str(path), raw, _FILE_KEYS)


# --------------------------------------------------------------------------------------------
# Environment variables: (tensord name, Ollama name or None, section, key, parser).

_EnvParser = Callable[[str, object], Any]
_ENV_PROTOCOL: tuple[tuple[str, str, str, _EnvParser], ...] = (
    (
        "TENSORD_CHUNK_SIZE",
        "OLLAMA_TENSOR_CHUNK_SIZE",
        "chunk_size",
        lambda w, v: parse_int(w, v, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE),
    ),
    (
        "TENSORD_ENABLE_COMPRESSION",
        "OLLAMA_TENSOR_ENABLE_COMPRESSION",
        "enable_compression",
        parse_bool,
    ),
    (
        "TENSORD_COMPRESSION_THRESHOLD",
        "OLLAMA_TENSOR_COMPRESSION_THRESHOLD",
        "compression_threshold",
        lambda w, v: parse_int(w, v, 0),
    ),
    (
        "TENSORD_MAX_RETRIES",
        "OLLAMA_TENSOR_MAX_RETRIES",
        "max_retries",
        lambda w, v: parse_int(w, v, 0, 100),
    ),
    (
        "TENSORD_RETRY_DELAY",
        "OLLAMA_TENSOR_RETRY_DELAY",
        "retry_base_delay",
        lambda w, v: parse_int(w, v, 0, 60_000),
    ),
    (
        "TENSORD_STREAMING_PROTOCOL",
        "OLLAMA_TENSOR_STREAMING_PROTOCOL",
        "use_streaming_protocol",
        parse_bool,
    ),
)

#: Every environment variable tensord reads, for documentation and tests.
ENV_VARS: tuple[str, ...] = (
    "TENSORD_CLUSTER_FILE",
    "TENSORD_NODE_ID",
    "TENSORD_LISTEN",
    *(name for name, _, _, _ in _ENV_PROTOCOL),
    *(name for _, name, _, _ in _ENV_PROTOCOL),
    "TENSORD_LOG_LEVEL",
    "OLLAMA_LOG_LEVEL",
    "TENSORD_WINDOW_BYTES",
    "TENSORD_MAX_TENSOR_BYTES",
    "TENSORD_DRAIN_TIMEOUT",
    "TENSORD_STATE_DIR",
    "TENSORD_STORE_MAX_BYTES",
    "TENSORD_CONTROL_SOCKET",
    "TENSORD_GATEWAY_LISTEN",
    "TENSORD_TRANSPORT",
    "TENSORD_DOWNLOAD_CONNECTIONS",
    "TENSORD_DOWNLOAD_MAX_BYTES",
    "TENSORD_CLUSTER_SECRET_FILE",
)


def default_state_dir(env: Mapping[str, str]) -> Path:
    """Where the daemon keeps tensors when ``state_dir`` is not set: systemd's
    ``StateDirectory=`` (``$STATE_DIRECTORY``), else ``$XDG_STATE_HOME/tensord``, else
    ``/var/lib/tensord`` for root and ``~/.local/state/tensord`` for anyone else."""
    if (found := env.get("STATE_DIRECTORY")) and found.strip():
        return Path(found.split(":")[0])
    if (found := env.get("XDG_STATE_HOME")) and found.strip():
        return Path(found) / "tensord"
    if os.geteuid() == 0:
        return Path("/var/lib/tensord")
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "tensord"


def default_control_socket(env: Mapping[str, str]) -> Path:
    """Where the control socket is when ``control.socket`` is not set: systemd's
    ``RuntimeDirectory=`` (``$RUNTIME_DIRECTORY/control.sock``), else
    ``$XDG_RUNTIME_DIR/tensord/control.sock``, else ``/run/tensord/control.sock`` for root and
    ``/tmp/tensord-<uid>/control.sock`` for anyone else. The CLI resolves it the same way."""
    if (found := env.get("TENSORD_CONTROL_SOCKET")) and found.strip():
        return Path(found)
    if (found := env.get("RUNTIME_DIRECTORY")) and found.strip():
        return Path(found.split(":")[0]) / "control.sock"
    if (found := env.get("XDG_RUNTIME_DIR")) and found.strip():
        return Path(found) / "tensord" / "control.sock"
    if os.geteuid() == 0:
        return Path("/run/tensord/control.sock")
    return Path(f"/tmp/tensord-{os.geteuid()}/control.sock")


def _env(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """The first of ``names`` that is set (and not empty), with its value: TENSORD_* wins."""
    for name in names:
        value = env.get(name)
        if value is not None and value.strip() != "":
            return name, value
    return None


def _security_paths(sec: SecuritySettings, node: str, env: Mapping[str, str]) -> SecuritySettings:
    """Paths that one shared cluster file can name for every node: ``{node}`` is this node's
    id, ``{credentials}`` systemd's ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``, the way a
    ``DynamicUser=`` service reads root-only keys). With no secret file configured, a
    ``cluster.secret`` credential is the secret."""
    creds = env.get("CREDENTIALS_DIRECTORY", "")

    def fill(p: Path) -> Path:
        text = str(p).replace("{node}", node)
        if "{credentials}" in text:
            if not creds:
                raise ConfigError(
                    f"security: {p} names {{credentials}} but CREDENTIALS_DIRECTORY is not set "
                    "(use LoadCredential= in the systemd unit, or a plain path)"
                )
            text = text.replace("{credentials}", creds)
        return Path(text)

    secret = sec.secret_file
    if secret is None and creds and (Path(creds) / "cluster.secret").is_file():
        secret = Path(creds) / "cluster.secret"
    tls = sec.tls
    if tls is not None:
        tls = TlsSettings(fill(tls.ca), fill(tls.cert), fill(tls.key))
    return replace(sec, secret_file=fill(secret) if secret is not None else None, tls=tls)


def is_loopback(host: str) -> bool:
    """Is ``host`` a loopback address (or ``localhost``)? ``0.0.0.0`` and ``::`` are not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_security_policy(settings: Settings) -> str | None:
    """A daemon that strangers can reach must authenticate its peers.

    Raises :class:`ConfigError` when the cluster file lists more than one node, or the peer
    listener is bound to anything but loopback (a single-node file or ``TENSORD_LISTEN`` can do
    that too), and neither ``security.secret_file`` nor ``security.tls`` is set - unless
    ``security.insecure`` is true; then returns the warning to log at every start.
    """
    sec = settings.security
    if sec.secret_file is not None or sec.tls is not None:
        return None
    multi = len(settings.nodes) > 1
    exposed = not is_loopback(settings.listen.host)
    if not multi and not exposed:
        return None
    if not sec.insecure:
        why = (
            f"the cluster has {len(settings.nodes)} nodes"
            if multi
            else f"the peer listener {settings.listen} is not on loopback"
        )
        raise ConfigError(
            f"{why} and there is no peer authentication: set security.secret_file (or "
            "TENSORD_CLUSTER_SECRET_FILE) or security.tls, or security.insecure: true to run "
            "without (anyone who can reach the port can send and fetch tensors)"
        )
    return (
        "security.insecure is set: peers are not authenticated, and anyone who can reach "
        f"{settings.listen} can send and fetch tensors"
    )


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    cluster_file: str | Path | None = None,
    node_id: str | None = None,
    listen: str | None = None,
    log_level: str | None = None,
    library: bool = False,
) -> Settings:
    """Build the node's ``Settings``: defaults < cluster file < env vars < these arguments (CLI).

    ``library=True`` starts from :meth:`Settings.for_library` (random id, ephemeral port) instead
    of the daemon's defaults. Raises :class:`ConfigError` with one line on any invalid input.
    """
    env = os.environ if env is None else env
    base = Settings.for_library() if library else Settings()

    # Cluster file: the CLI flag wins over the variable.
    path: Path | None = None
    if cluster_file is not None:
        path = Path(cluster_file)
    elif (found := _env(env, "TENSORD_CLUSTER_FILE")) is not None:
        path = Path(found[1])
    file: dict[str, Any] = read_cluster_file(path) if path is not None else {}

    protocol = file.get("tensor_protocol", base.tensor_protocol)
    for tensord_name, ollama_name, key, parser in _ENV_PROTOCOL:
        if (found := _env(env, tensord_name, ollama_name)) is not None:
            protocol = replace(protocol, **{key: parser(found[0], found[1])})

    transfer = file.get("transfer", base.transfer)
    if (found := _env(env, "TENSORD_WINDOW_BYTES")) is not None:
        transfer = replace(transfer, window_bytes=parse_int(*found, 64 * KiB, 4 * GiB))
    if (found := _env(env, "TENSORD_DRAIN_TIMEOUT")) is not None:
        transfer = replace(transfer, drain_timeout=parse_float(*found))
    if (found := _env(env, "TENSORD_MAX_TENSOR_BYTES")) is not None:
        transfer = replace(transfer, max_tensor_bytes=parse_int(*found, 1, 1 << 50))

    security = file.get("security", base.security)
    if (found := _env(env, "TENSORD_CLUSTER_SECRET_FILE")) is not None:
        security = replace(security, secret_file=parse_path(*found))
    downloads = file.get("downloads", base.downloads)
    if (found := _env(env, "TENSORD_DOWNLOAD_CONNECTIONS")) is not None:
        downloads = replace(downloads, connections=parse_int(*found, 1, 64))
    if (found := _env(env, "TENSORD_DOWNLOAD_MAX_BYTES")) is not None:
        downloads = replace(downloads, max_bytes=parse_int(*found, 1, 1 << 50))
    gateway = file.get("gateway", base.gateway)
    if (found := _env(env, "TENSORD_GATEWAY_LISTEN")) is not None:
        gateway = replace(gateway, listen=parse_hostport(*found, allow_port_zero=True))
    control = file.get("control", base.control)
    if (found := _env(env, "TENSORD_CONTROL_SOCKET")) is not None:
        control = replace(control, socket=parse_path(*found))
    state_dir = file.get("state_dir", base.state_dir)
    if (found := _env(env, "TENSORD_STATE_DIR")) is not None:
        state_dir = parse_path(*found)
    store = file.get("store", base.store)
    if (found := _env(env, "TENSORD_STORE_MAX_BYTES")) is not None:
        store = replace(store, max_bytes=parse_int(*found, 0, 1 << 62))
    if not library:
        # The daemon always has a state directory and a control socket; a library node keeps
        # tensors in memory and has no control socket unless they are configured.
        if state_dir is None:
            state_dir = default_state_dir(env)
        if control.socket is None:
            control = replace(control, socket=default_control_socket(env))

    level = file.get("log_level", base.log_level)
    if log_level is not None:
        level = parse_choice("--log-level", log_level, LOG_LEVELS)
    elif (found := _env(env, "TENSORD_LOG_LEVEL", "OLLAMA_LOG_LEVEL")) is not None:
        level = parse_choice(found[0], found[1], LOG_LEVELS)

    nodes: tuple[NodeEntry, ...] = file.get("nodes", ())
    me = base.node_id
    if node_id is not None:
        me = parse_node_id("--node-id", node_id)
    elif (found := _env(env, "TENSORD_NODE_ID")) is not None:
        me = parse_node_id(*found)
    elif nodes and not library:
        raise ConfigError(
            f"{path}: this node's id is not set: expected TENSORD_NODE_ID or --node-id naming one "
            f"of {', '.join(n.id for n in nodes)}"
        )
    entry = next((n for n in nodes if n.id == me), None)
    explicit = node_id is not None or _env(env, "TENSORD_NODE_ID") is not None
    if nodes and entry is None and (explicit or not library):
        # A library node with no id of its own is a client of the cluster, not one of its nodes.
        where = "--node-id" if node_id is not None else "TENSORD_NODE_ID"
        raise ConfigError(
            f"{where}: {me!r} is not valid: expected one of the cluster file's node ids "
            f"({', '.join(n.id for n in nodes)})"
        )

    addr = base.listen
    if entry is not None:
        # Listen on the node's own port, on all interfaces unless the address is loopback.
        host = entry.addr.host
        loop = is_loopback(host)
        addr = HostPort(host if loop else ("::" if ":" in host else "0.0.0.0"), entry.addr.port)
    if listen is not None:
        addr = parse_hostport("--listen", listen, allow_port_zero=True)
    elif (found := _env(env, "TENSORD_LISTEN")) is not None:
        addr = parse_hostport(found[0], found[1], allow_port_zero=True)

    transport = entry.transport if entry is not None else base.transport
    if (found := _env(env, "TENSORD_TRANSPORT")) is not None:
        transport = parse_choice(found[0], found[1], TRANSPORTS)

    security = _security_paths(security, me, env)
    return Settings(
        node_id=me,
        listen=addr,
        cluster_name=file.get("name", base.cluster_name),
        cluster_file=path,
        nodes=nodes,
        tensor_protocol=protocol,
        pool=file.get("pool", base.pool),
        transfer=transfer,
        security=security,
        downloads=downloads,
        gateway=gateway,
        control=control,
        store=store,
        quic=file.get("quic", base.quic),
        transport=transport,
        state_dir=state_dir,
        log_level=level,
    )
