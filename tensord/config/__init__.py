"""One typed, validated ``Settings``: defaults < JSON cluster file < env vars < CLI flags.

- values.py: the value types (``HostPort``) and parsers, with the one-line error messages;
- schema.py: a setting's spec (kind, range, env var, Ollama alias, flag, doc) and what is
  derived from the specs: the cluster-file check, the env var lookup, the list of settings;
- settings.py: the ``Settings`` dataclasses, each field declared once with its spec;
- load.py: the sources in their order of precedence (``load_settings``);
- docs.py: the README's configuration tables, printed from the specs.
"""

from __future__ import annotations

from .load import (
    check_security_policy,
    default_control_socket,
    default_state_dir,
    is_loopback,
    load_settings,
    read_cluster_file,
    unauthenticated_listener,
)
from .settings import (
    DEFAULT_PEER_PORT,
    ENV_VARS,
    LOG_LEVELS,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    TRANSPORTS,
    ControlSettings,
    DownloadSettings,
    GatewaySettings,
    MirrorSettings,
    NodeEntry,
    PoolSettings,
    QuicSettings,
    SecuritySettings,
    Settings,
    StoreSettings,
    TensorProtocolSettings,
    TlsSettings,
    TransferSettings,
)
from .values import (
    GiB,
    HostPort,
    KiB,
    MiB,
    parse_bool,
    parse_choice,
    parse_float,
    parse_hostport,
    parse_int,
    parse_node_id,
    parse_path,
    parse_str,
    parse_url,
)

__all__ = [
    "DEFAULT_PEER_PORT",
    "ENV_VARS",
    "LOG_LEVELS",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "TRANSPORTS",
    "ControlSettings",
    "DownloadSettings",
    "GatewaySettings",
    "GiB",
    "HostPort",
    "KiB",
    "MiB",
    "MirrorSettings",
    "NodeEntry",
    "PoolSettings",
    "QuicSettings",
    "SecuritySettings",
    "Settings",
    "StoreSettings",
    "TensorProtocolSettings",
    "TlsSettings",
    "TransferSettings",
    "check_security_policy",
    "default_control_socket",
    "default_state_dir",
    "is_loopback",
    "load_settings",
    "parse_bool",
    "parse_choice",
    "parse_float",
    "parse_hostport",
    "parse_int",
    "parse_node_id",
    "parse_path",
    "parse_str",
    "parse_url",
    "read_cluster_file",
    "unauthenticated_listener",
]
