"""One typed, validated ``Settings``: defaults < JSON cluster file < env vars < CLI flags.

- values.py: the value types (``HostPort``) and parsers, with the one-line error messages;
- schema.py: a setting's spec (kind, range, env var, Ollama alias, flag, doc) and what is
  derived from the specs: the cluster-file check, the env var lookup, the list of settings;
- settings.py: the ``Settings`` dataclasses, each field declared once with its spec;
- load.py: the sources in their order of precedence (``load_settings``);
- docs.py: the README's configuration tables, printed from the specs;
- paths.py: where the state directory and the control socket are by default.

The names below are imported on first use (as ``tensord`` does its heavy ones): a client
command that is told its socket, or finds it by the defaults, needs none of the specs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .load import (
        check_security_policy,
        is_loopback,
        load_settings,
        read_cluster_file,
        unauthenticated_listener,
    )
    from .paths import (
        CLUSTER_FILE_VAR,
        CONTROL_SOCKET_VAR,
        default_control_socket,
        default_state_dir,
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

#: Public names, and the module of this package each comes from.
_LAZY = {
    "check_security_policy": "load",
    "is_loopback": "load",
    "load_settings": "load",
    "read_cluster_file": "load",
    "unauthenticated_listener": "load",
    "CLUSTER_FILE_VAR": "paths",
    "CONTROL_SOCKET_VAR": "paths",
    "default_control_socket": "paths",
    "default_state_dir": "paths",
    "ControlSettings": "settings",
    "DEFAULT_PEER_PORT": "settings",
    "DownloadSettings": "settings",
    "ENV_VARS": "settings",
    "GatewaySettings": "settings",
    "LOG_LEVELS": "settings",
    "MAX_CHUNK_SIZE": "settings",
    "MIN_CHUNK_SIZE": "settings",
    "MirrorSettings": "settings",
    "NodeEntry": "settings",
    "PoolSettings": "settings",
    "QuicSettings": "settings",
    "SecuritySettings": "settings",
    "Settings": "settings",
    "StoreSettings": "settings",
    "TRANSPORTS": "settings",
    "TensorProtocolSettings": "settings",
    "TlsSettings": "settings",
    "TransferSettings": "settings",
    "GiB": "values",
    "HostPort": "values",
    "KiB": "values",
    "MiB": "values",
    "parse_bool": "values",
    "parse_choice": "values",
    "parse_float": "values",
    "parse_hostport": "values",
    "parse_int": "values",
    "parse_node_id": "values",
    "parse_path": "values",
    "parse_str": "values",
    "parse_url": "values",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (schema.py and settings.py cost tens of
    milliseconds at a CLI command's start)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CLUSTER_FILE_VAR",
    "CONTROL_SOCKET_VAR",
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
