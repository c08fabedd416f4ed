"""The ``Settings`` dataclasses: every setting with its default, range, variable and meaning.

Each field is declared with :func:`~tensord.config.schema.setting`, which is the one place its
facts live; the cluster-file check, the env vars ``load_settings`` reads, ``ENV_VARS`` and the
README's configuration tables (``python -m tensord.config.docs``) are derived from them.

Durations are in seconds (``*_timeout``, ``*_seconds``, ``*_interval``), with one exception kept
for Ollama compatibility: ``tensor_protocol.retry_base_delay`` is in milliseconds, as Ollama's
``OLLAMA_TENSOR_RETRY_DELAY`` is.
"""

# ruff: noqa: RUF009 - setting() and required() return dataclasses.field(); ruff cannot tell

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..limits import MAX_CHUNK, MIN_CHUNK
from .paths import CLUSTER_FILE_VAR, CONTROL_SOCKET_VAR
from .schema import (
    NODE_ID,
    PATH,
    TEXT,
    URL,
    Address,
    Boolean,
    Choice,
    Integer,
    Nullable,
    Number,
    Section,
    SectionList,
    required,
    setting,
    walk,
)
from .values import GiB, HostPort, KiB, MiB

MIN_CHUNK_SIZE = MIN_CHUNK  # the protocol's bounds (tensord/limits.py)
MAX_CHUNK_SIZE = MAX_CHUNK
DEFAULT_PEER_PORT = 7070
LOG_LEVELS = ("debug", "info", "warning", "error")
TRANSPORTS = ("tcp", "quic")

_BYTES = "bytes"
_SECONDS = "seconds"
_WINDOW = Integer(64 * KiB, 4 * GiB, _BYTES)  # a flow-control window: TCP's and QUIC's alike
_OPTIONAL_PATH = Nullable(PATH)


@dataclass(frozen=True)
class NodeEntry:
    """One node of the cluster file."""

    id: str = required(NODE_ID, "the node's id; ids are unique in the file")
    addr: HostPort = required(Address(), "where its peers reach it")
    ollama: str | None = setting(
        None, Nullable(URL), "its Ollama server, for the token gateway (optional)"
    )
    transport: str = setting("tcp", Choice(TRANSPORTS), "how peers dial it")


@dataclass(frozen=True)
class TensorProtocolSettings:
    """The ``tensor_protocol`` section, spelled exactly as Ollama's cluster guide spells it."""

    use_streaming_protocol: bool = setting(
        True,
        Boolean(),
        "the chunked protocol; `false` is the legacy single-frame mode",
        env="TENSORD_STREAMING_PROTOCOL",
        ollama="OLLAMA_TENSOR_STREAMING_PROTOCOL",
    )
    chunk_size: int = setting(
        1 * MiB,
        Integer(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE, _BYTES),
        "chunk size",
        env="TENSORD_CHUNK_SIZE",
        ollama="OLLAMA_TENSOR_CHUNK_SIZE",
    )
    enable_compression: bool = setting(
        True,
        Boolean(),
        "adaptive lz4 (incompressible chunks are detected and sent raw)",
        env="TENSORD_ENABLE_COMPRESSION",
        ollama="OLLAMA_TENSOR_ENABLE_COMPRESSION",
    )
    compression_threshold: int = setting(
        4096,
        Integer(0, unit=_BYTES),
        "smallest chunk worth compressing",
        env="TENSORD_COMPRESSION_THRESHOLD",
        ollama="OLLAMA_TENSOR_COMPRESSION_THRESHOLD",
    )
    max_retries: int = setting(
        3,
        Integer(0, 100),
        "retries in a row without progress (an attempt that got chunks acknowledged starts "
        "the count again); `0`: never retry",
        env="TENSORD_MAX_RETRIES",
        ollama="OLLAMA_TENSOR_MAX_RETRIES",
    )
    retry_base_delay: int = setting(
        500,
        Integer(0, 60_000, "milliseconds"),
        "base backoff delay (doubles per retry, capped at 5 s, ±20 % jitter); in milliseconds, "
        "not seconds like every other duration, because Ollama's variable is",
        env="TENSORD_RETRY_DELAY",
        ollama="OLLAMA_TENSOR_RETRY_DELAY",
    )


@dataclass(frozen=True)
class PoolSettings:
    """Outbound connections kept open to each peer."""

    max_connections: int = setting(10, Integer(1, 1024), "connections kept per peer")
    max_idle_seconds: float = setting(
        300.0,
        Number(0.0, _SECONDS),
        "idle connections are closed after this",
    )


@dataclass(frozen=True)
class TransferSettings:
    """Flow control, timeouts and the limits a peer's input is held to.

    What one peer may hold of this node is bounded (``max_peer_*``): a hostile or broken peer is
    refused, the others go on. Before a peer has proved who it is (TLS, secret, Hello) it gets a
    short deadline and a small budget of its own; when the budget is full the oldest such
    connection is dropped for the new one (sshd's MaxStartups), so idle strangers cannot lock
    members out.
    """

    window_bytes: int = setting(
        32 * MiB,
        _WINDOW,
        "bytes of chunks in flight before the sender waits for acks",
        env="TENSORD_WINDOW_BYTES",
    )
    connect_timeout: float = setting(
        10.0,
        Number(0.001, _SECONDS),
        "dial and handshake must finish within this",
    )
    io_timeout: float = setting(
        30.0,
        Number(0.001, _SECONDS),
        "an attempt fails after this long without progress",
    )
    max_tensor_bytes: int = setting(
        64 * GiB,
        Integer(1, 1 << 50, _BYTES),
        "largest tensor accepted from a peer",
        env="TENSORD_MAX_TENSOR_BYTES",
    )
    max_header_bytes: int = setting(
        64 * KiB,
        Integer(1 * KiB, 16 * MiB, _BYTES),
        "largest frame header accepted",
    )
    partial_ttl_seconds: float = setting(
        600.0,
        Number(0.0, _SECONDS),
        "how long an interrupted receive is kept for resume",
    )
    drain_timeout: float = setting(
        30.0,
        Number(0.0, _SECONDS),
        "on SIGTERM/SIGINT, how long transfers in flight may take to finish",
        env="TENSORD_DRAIN_TIMEOUT",
    )
    peer_check_interval: float = setting(
        10.0,
        Number(0.01, _SECONDS),
        "the daemon pings each configured peer this often (RTT, up/down)",
    )
    max_peer_connections: int = setting(
        64, Integer(1, 1 << 16), "inbound connections from one peer at once (beyond: `busy`)"
    )
    max_peer_transfers: int = setting(
        64, Integer(1, 1 << 16), "receives from one peer in flight, and partials kept for it"
    )
    max_peer_pending_bytes: int = setting(
        64 * GiB,
        Integer(1, 1 << 62, _BYTES),
        "tensor bytes of one peer's receives in flight and partials kept",
    )
    max_connections: int = setting(
        1024,
        Integer(1, 1 << 20),
        "inbound connections open at once, handshakes included (TCP and QUIC)",
    )
    handshake_timeout: float = setting(
        5.0,
        Number(0.001, _SECONDS),
        "an inbound connection must complete TLS and an authenticated Hello within this",
    )
    max_unauthenticated: int = setting(
        32,
        Integer(1, 1 << 16),
        "inbound connections still in their handshake; when full, the oldest is dropped for "
        "the new one",
    )


@dataclass(frozen=True)
class TlsSettings:
    """Mutual TLS between nodes: PEM paths."""

    ca: Path = required(PATH, "the cluster's CA certificate")
    cert: Path = required(PATH, "this node's certificate")
    key: Path = required(PATH, "this node's private key")


@dataclass(frozen=True)
class SecuritySettings:
    """How peers prove they belong to the cluster."""

    secret_file: Path | None = setting(
        None,
        _OPTIONAL_PATH,
        "the cluster secret (the same file contents on every node, at least 16 bytes); under "
        "systemd a `cluster.secret` credential (`LoadCredential=`) is used when this is null",
        env="TENSORD_CLUSTER_SECRET_FILE",
    )
    tls: TlsSettings | None = setting(
        None,
        Nullable(Section(TlsSettings)),
        "mutual TLS; `{node}` in a path is this node's id, `{credentials}` systemd's "
        "`$CREDENTIALS_DIRECTORY`",
    )
    insecure: bool = setting(
        False,
        Boolean(),
        "allow a multi-node cluster (or a listener off loopback) without secret or TLS; "
        "warned about at every start",
    )


@dataclass(frozen=True)
class DownloadSettings:
    """Background downloads of registry blobs and URLs."""

    connections: int = setting(
        4,
        Integer(1, 64),
        "parallel ranged connections per blob",
        env="TENSORD_DOWNLOAD_CONNECTIONS",
    )
    min_chunk_size: int = setting(
        8 * MiB,
        Integer(64 * KiB, 1 * GiB, _BYTES),
        "smallest range a connection is given (and stolen halves are at least a quarter of it)",
    )
    max_concurrent: int = setting(
        2, Integer(1, 64), "blobs (and download jobs) fetched at the same time"
    )
    credentials_file: Path | None = setting(
        None,
        _OPTIONAL_PATH,
        "registry credentials: Docker's `config.json` (`auths`) or "
        '`{"registries": {"host": {"username", "password", "token_hosts": [...]}}}` '
        "(`token_hosts`: token servers on other hosts that may get these credentials; also "
        "accepted in a `config.json` entry); never logged",
    )
    max_bytes: int = setting(
        256 * GiB,
        Integer(1, 1 << 50, _BYTES),
        "largest blob or URL download; a larger `Content-Length` or manifest size is refused "
        "before the first write",
        env="TENSORD_DOWNLOAD_MAX_BYTES",
    )
    share: bool | None = setting(
        None,
        Nullable(Boolean()),
        "peer-first downloads: blob pieces come from peers that have them (complete or still "
        "arriving) and from the origin only what no peer has or will have; null = on when the "
        "cluster has peers",
        env="TENSORD_DOWNLOAD_SHARE",
    )
    piece_size: int = setting(
        4 * MiB,
        Integer(256 * KiB, 64 * MiB, _BYTES),
        "the unit peers share blobs in (and the origin fetch is split into): one piece is "
        "fetched from the origin by exactly one node",
    )


@dataclass(frozen=True)
class ServerTlsSettings:
    """TLS for an HTTP listener: PEM paths (``client_ca`` asks clients for certificates)."""

    cert: Path = required(PATH, "the server's certificate chain (PEM)")
    key: Path = required(PATH, "its private key (PEM)")
    client_ca: Path | None = setting(
        None,
        _OPTIONAL_PATH,
        "when set, clients must present a certificate signed by this CA (mutual TLS); it "
        "authenticates them as API keys do",
    )


@dataclass(frozen=True)
class MirrorSettings:
    """A read-only OCI registry mirror (Distribution API) over the store, for skopeo,
    containerd and Ollama."""

    listen: HostPort | None = setting(
        None,
        Nullable(Address()),
        "the mirror's HTTP(S) listener; off loopback it needs `api_keys_file` or "
        "`tls.client_ca` (clients authenticated); null = off",
        env="TENSORD_MIRROR_LISTEN",
    )
    tls: ServerTlsSettings | None = setting(
        None,
        Nullable(Section(ServerTlsSettings)),
        "serve HTTPS (`cert`, `key`, optional `client_ca`); null = plain HTTP",
    )
    upstream: str | None = setting(
        None,
        Nullable(URL),
        "the registry a miss is fetched from (through the cluster); null = the registry a "
        "client names in its `ns` query parameter (containerd), else `registry.ollama.ai`",
        env="TENSORD_MIRROR_UPSTREAM",
    )
    api_keys_file: Path | None = setting(
        None,
        _OPTIONAL_PATH,
        "one API key per line (`#` comments); clients send `Authorization: Bearer KEY`",
    )
    max_connections: int = setting(1024, Integer(1, 1 << 20), "client connections open at once")
    read_timeout: float = setting(
        30.0,
        Number(0.1, _SECONDS),
        "a client must send a request's headers within this",
    )


@dataclass(frozen=True)
class GatewaySettings:
    """The token gateway (runs when nodes have `ollama` URLs)."""

    listen: HostPort = setting(
        HostPort("127.0.0.1", 11435),
        Address(),
        "the gateway's HTTP/WebSocket listener; off loopback it needs `api_keys_file`",
        env="TENSORD_GATEWAY_LISTEN",
    )
    api_keys_file: Path | None = setting(
        None,
        _OPTIONAL_PATH,
        "one API key per line (`#` comments); clients send `Authorization: Bearer KEY`",
    )
    keepalive_seconds: float = setting(
        15.0,
        Number(0.1, _SECONDS),
        "`: keep-alive` comment (SSE) and WebSocket ping interval",
    )
    max_connections: int = setting(1024, Integer(1, 1 << 20), "client connections open at once")
    read_timeout: float = setting(
        30.0,
        Number(0.1, _SECONDS),
        "a client must send a request's headers and body within this",
    )


@dataclass(frozen=True)
class ControlSettings:
    """The local control socket (HTTP/JSON over a Unix socket)."""

    socket: Path | None = setting(
        None,
        _OPTIONAL_PATH,
        "the control socket (the CLI finds it the same way); null = the default",
        env=CONTROL_SOCKET_VAR,
        default_doc="`$RUNTIME_DIRECTORY/control.sock`, else "
        "`$XDG_RUNTIME_DIR/tensord/control.sock`, else `/run/tensord/control.sock` (root) or "
        "`/tmp/tensord-<uid>/control.sock`",
    )
    max_connections: int = setting(64, Integer(1, 1 << 16), "control clients connected at once")
    read_timeout: float = setting(
        30.0,
        Number(0.1, _SECONDS),
        "a control client must send a request's headers and body within this",
    )


@dataclass(frozen=True)
class QuicSettings:
    """The QUIC transport's knobs (tensord/net/quic's QuicTuning explains each)."""

    max_datagram_size: int = setting(
        1452,
        Integer(1200, 16000, _BYTES),
        "UDP payload size; 8952 on jumbo-frame networks is ~4.5x the throughput",
    )
    congestion_control: str = setting(
        "reno", Choice(("reno", "cubic")), "reno measured at least as fast here"
    )
    idle_timeout: float = setting(
        30.0,
        Number(1.0, _SECONDS),
        "a QUIC connection without a packet for this long is closed (open streams keep it "
        "alive with PINGs)",
    )
    stream_window: int = setting(
        8 * MiB,
        _WINDOW,
        "receive credit per stream (bytes a peer may send ahead of our reader)",
    )
    connection_window: int = setting(
        32 * MiB,
        _WINDOW,
        "receive credit per QUIC connection (at least `stream_window`)",
    )
    udp_offload: bool = setting(
        True,
        Boolean(),
        "UDP GSO on send and GRO on receive where the kernel has them (false: one syscall per "
        "datagram)",
        env="TENSORD_QUIC_UDP_OFFLOAD",
    )

    def violation(self) -> str | None:
        """The rule across keys the cluster-file check applies (tensord/config/schema.py)."""
        if self.connection_window < self.stream_window:
            return "connection_window must be at least stream_window"
        return None


@dataclass(frozen=True)
class StoreSettings:
    """The tensor store under ``state_dir``."""

    max_bytes: int | None = setting(
        None,
        Nullable(Integer(0, 1 << 62, _BYTES)),
        "cap on the store; a tensor that would exceed it is refused with `quota`; null = the "
        "disk is the limit",
        env="TENSORD_STORE_MAX_BYTES",
    )


@dataclass(frozen=True)
class Settings:
    """Everything a node needs to know, validated. Build it with
    :func:`~tensord.config.load_settings`; its fields are the cluster file's top-level keys."""

    node_id: str = setting(
        "local",
        NODE_ID,
        "this node's id in the cluster file",
        env="TENSORD_NODE_ID",
        flag="--node-id",
        in_file=False,
    )
    listen: HostPort = setting(
        HostPort("127.0.0.1", DEFAULT_PEER_PORT),
        Address(),
        "the peer listener",
        env="TENSORD_LISTEN",
        flag="--listen",
        in_file=False,
        default_doc="the node's `addr` (its port; all interfaces unless the address is "
        "loopback), else `127.0.0.1:7070`",
    )
    cluster_name: str = setting("tensord", TEXT, "the cluster's name", key="name")
    cluster_file: Path | None = setting(
        None,
        _OPTIONAL_PATH,
        "path of the cluster file",
        env=CLUSTER_FILE_VAR,
        flag="--cluster",
        in_file=False,
        default_doc="none (a single node)",
    )
    nodes: tuple[NodeEntry, ...] = setting(
        (), SectionList(NodeEntry, "node", "id"), "the cluster's nodes, this one included"
    )
    tensor_protocol: TensorProtocolSettings = setting(
        TensorProtocolSettings(), Section(TensorProtocolSettings), "as Ollama's cluster guide"
    )
    pool: PoolSettings = setting(PoolSettings(), Section(PoolSettings), "outbound connections")
    transfer: TransferSettings = setting(
        TransferSettings(), Section(TransferSettings), "flow control, timeouts, limits"
    )
    security: SecuritySettings = setting(
        SecuritySettings(), Section(SecuritySettings), "peer authentication"
    )
    downloads: DownloadSettings = setting(
        DownloadSettings(), Section(DownloadSettings), "background downloads"
    )
    gateway: GatewaySettings = setting(
        GatewaySettings(), Section(GatewaySettings), "the token gateway"
    )
    mirror: MirrorSettings = setting(
        MirrorSettings(), Section(MirrorSettings), "the OCI registry mirror"
    )
    control: ControlSettings = setting(
        ControlSettings(), Section(ControlSettings), "the control socket"
    )
    store: StoreSettings = setting(StoreSettings(), Section(StoreSettings), "the tensor store")
    quic: QuicSettings = setting(QuicSettings(), Section(QuicSettings), "the QUIC transport")
    transport: str = setting(
        "tcp",
        Choice(TRANSPORTS),
        "`quic`: also listen on QUIC (UDP, same port number) and dial QUIC to ad-hoc "
        "addresses; see QUIC below",
        env="TENSORD_TRANSPORT",
        in_file=False,
        default_doc="the node's `transport`, else `tcp`",
    )
    state_dir: Path | None = setting(
        None,
        _OPTIONAL_PATH,
        "where the tensor store lives (`tensors/`, `partial/`); null = the default",
        env="TENSORD_STATE_DIR",
        default_doc="`$STATE_DIRECTORY`, else `$XDG_STATE_HOME/tensord`, else "
        "`/var/lib/tensord` (root) or `~/.local/state/tensord`",
    )
    log_level: str = setting(
        "info",
        Choice(LOG_LEVELS),
        "how much the daemon logs (`warn` is read as `warning`)",
        env="TENSORD_LOG_LEVEL",
        ollama="OLLAMA_LOG_LEVEL",
        flag="--log-level",
    )

    @classmethod
    def for_library(cls, **changes: Any) -> Settings:
        """Embedded defaults for a library node: a fresh id, 127.0.0.1 on an ephemeral port."""
        # os.urandom, as secrets.token_hex does: importing secrets (hmac, hashlib, random)
        # costs a client command that reads the settings ~10 ms.
        base = cls(node_id=f"node-{os.urandom(4).hex()}", listen=HostPort("127.0.0.1", 0))
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


#: Every environment variable tensord reads (Ollama's aliases included), in the README's order.
ENV_VARS: tuple[str, ...] = tuple(name for row in walk(Settings) for name in row.spec.env_names)
