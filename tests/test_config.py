"""Settings: defaults < cluster file < env vars < CLI arguments, and one-line errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tensord.config import (
    ENV_VARS,
    GiB,
    HostPort,
    KiB,
    MiB,
    NodeEntry,
    SecuritySettings,
    Settings,
    TlsSettings,
    default_control_socket,
    default_state_dir,
    load_settings,
)
from tensord.config.schema import Integer, Nullable, Number, Row, walk
from tensord.errors import ConfigError, TensorError

from .support.cluster import write_cluster_file

NODES = [
    {"id": "gpu-1", "addr": "10.0.0.11:7071"},
    {"id": "gpu-2", "addr": "10.0.0.12:7072"},
]


def write(tmp_path: Path, content: Any, name: str = "cluster.json") -> Path:
    """A cluster file written by hand, for the malformed ones (an ordinary one:
    :func:`write_cluster_file`)."""
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return path


def config_error(**kwargs: Any) -> str:
    """load_settings(**kwargs) must fail with a ConfigError; returns its (one-line) message."""
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    err = info.value
    assert isinstance(err, TensorError)
    assert err.exit_code == 78
    text = str(err)
    assert text and "\n" not in text and "\r" not in text, f"not one line: {text!r}"
    return text


def file_error(tmp_path: Path, content: Any, **kwargs: Any) -> tuple[str, Path]:
    path = write(tmp_path, content)
    kwargs.setdefault("node_id", "gpu-1")
    return config_error(cluster_file=path, **kwargs), path


# ---------------------------------------------------------------------------------------------
# Defaults.


def test_defaults() -> None:
    s = load_settings(env={})
    p = s.tensor_protocol
    assert p.chunk_size == 1 * MiB
    assert p.enable_compression is True
    assert p.compression_threshold == 4096
    assert p.max_retries == 3
    assert p.retry_base_delay == 500
    assert p.use_streaming_protocol is True
    assert (s.pool.max_connections, s.pool.max_idle_seconds) == (10, 300.0)
    assert s.listen == HostPort("127.0.0.1", 7070)
    assert str(s.listen) == "127.0.0.1:7070"
    assert s.node_id == "local"
    assert s.log_level == "info"
    assert s.nodes == () and s.peers == () and s.cluster_file is None
    assert s.transport == "tcp"
    assert s.transfer.max_header_bytes == 64 * KiB
    assert s.transfer.max_tensor_bytes == 64 * GiB
    assert s.gateway.listen == HostPort("127.0.0.1", 11435)
    assert s.security == SecuritySettings()
    # The daemon always has a state directory and a control socket (embedded defaults here).
    assert s.state_dir == default_state_dir({}) and s.control.socket == default_control_socket({})
    assert s.store.max_bytes is None
    lib = load_settings(env={}, library=True)
    assert lib.control.socket is None and lib.state_dir is None


@pytest.mark.parametrize(
    ("env", "state", "sock"),
    [
        ({"STATE_DIRECTORY": "/var/lib/tensord", "RUNTIME_DIRECTORY": "/run/tensord"},
         "/var/lib/tensord", "/run/tensord/control.sock"),
        ({"XDG_STATE_HOME": "/home/u/.local/state", "XDG_RUNTIME_DIR": "/run/user/1000"},
         "/home/u/.local/state/tensord", "/run/user/1000/tensord/control.sock"),
        ({"STATE_DIRECTORY": "/a:/b", "XDG_STATE_HOME": "/x", "TENSORD_CONTROL_SOCKET": "/s.sock",
          "XDG_RUNTIME_DIR": "/r"}, "/a", "/s.sock"),
    ],
)  # fmt: skip
def test_default_paths_follow_systemd_then_xdg(env: dict[str, str], state: str, sock: str) -> None:
    s = load_settings(env=env)
    assert s.state_dir == Path(state) and s.control.socket == Path(sock)
    assert default_control_socket(env) == Path(sock)


def test_default_paths_without_systemd_or_xdg() -> None:
    if os.geteuid() == 0:
        assert default_state_dir({}) == Path("/var/lib/tensord")
        assert default_control_socket({}) == Path("/run/tensord/control.sock")
    else:
        assert default_state_dir({"HOME": "/h"}) == Path("/h/.local/state/tensord")
        assert default_control_socket({}) == Path(f"/tmp/tensord-{os.geteuid()}/control.sock")


def test_for_library_gives_port_zero_and_a_random_node_id() -> None:
    a, b = Settings.for_library(), Settings.for_library()
    assert a.listen == HostPort("127.0.0.1", 0)
    assert re.fullmatch(r"node-[0-9a-f]{8}", a.node_id)
    assert a.node_id != b.node_id
    assert Settings.for_library(log_level="debug").log_level == "debug"
    lib = load_settings(env={}, library=True)
    assert lib.listen.port == 0 and lib.node_id.startswith("node-")


def test_with_helpers_replace_one_section() -> None:
    s = Settings().with_protocol(chunk_size=4 * MiB).with_pool(max_connections=2)
    s = s.with_transfer(window_bytes=MiB)
    assert s.tensor_protocol.chunk_size == 4 * MiB
    assert s.tensor_protocol.max_retries == 3
    assert s.pool.max_connections == 2
    assert s.transfer.window_bytes == MiB


# ---------------------------------------------------------------------------------------------
# Precedence.


def test_precedence_defaults_file_env_cli(tmp_path: Path) -> None:
    path = write_cluster_file(
        tmp_path / "cluster.json",
        NODES,
        tensor_protocol={"chunk_size": 2 * MiB, "max_retries": 7},
        log_level="warning",
    )
    # the file over the defaults
    s = load_settings(env={}, cluster_file=path, node_id="gpu-1")
    assert s.tensor_protocol.chunk_size == 2 * MiB
    assert s.tensor_protocol.max_retries == 7
    assert s.tensor_protocol.retry_base_delay == 500  # not in the file: the default
    assert s.log_level == "warning"
    assert s.listen == HostPort("0.0.0.0", 7071)  # from the node's own addr in the file
    # env vars over the file
    env = {
        "TENSORD_CHUNK_SIZE": str(4 * MiB),
        "TENSORD_LOG_LEVEL": "error",
        "TENSORD_LISTEN": "127.0.0.1:9000",
        "TENSORD_NODE_ID": "gpu-2",
    }
    s = load_settings(env=env, cluster_file=path)
    assert s.tensor_protocol.chunk_size == 4 * MiB
    assert s.tensor_protocol.max_retries == 7  # not in env: still the file's
    assert s.log_level == "error"
    assert s.listen == HostPort("127.0.0.1", 9000)
    assert s.node_id == "gpu-2"
    # CLI arguments over env vars
    s = load_settings(
        env=env, cluster_file=path, node_id="gpu-1", listen="[::1]:9001", log_level="debug"
    )
    assert s.node_id == "gpu-1"
    assert s.listen == HostPort("::1", 9001)
    assert str(s.listen) == "[::1]:9001"
    assert s.log_level == "debug"


def test_cluster_file_argument_wins_over_the_variable(tmp_path: Path) -> None:
    a = write_cluster_file(tmp_path / "a.json", name="from-env")
    b = write_cluster_file(tmp_path / "b.json", name="from-cli")
    assert load_settings(env={"TENSORD_CLUSTER_FILE": str(a)}).cluster_name == "from-env"
    s = load_settings(env={"TENSORD_CLUSTER_FILE": str(a)}, cluster_file=b)
    assert s.cluster_name == "from-cli" and s.cluster_file == b


def test_env_overrides_one_protocol_key_and_keeps_the_files_others(tmp_path: Path) -> None:
    protocol = {"enable_compression": False, "max_retries": 9}
    path = write_cluster_file(tmp_path / "cluster.json", tensor_protocol=protocol)
    s = load_settings(env={"OLLAMA_TENSOR_MAX_RETRIES": "1"}, cluster_file=path)
    assert s.tensor_protocol.max_retries == 1
    assert s.tensor_protocol.enable_compression is False


# ---------------------------------------------------------------------------------------------
# Every variable and its alias.

PROTOCOL_VARS = [
    # (TENSORD_*, OLLAMA_* alias, field, value, expected, another value, its expected)
    ("TENSORD_CHUNK_SIZE", "OLLAMA_TENSOR_CHUNK_SIZE", "chunk_size", "4096", 4096, "8388608",
     8 * MiB),
    ("TENSORD_ENABLE_COMPRESSION", "OLLAMA_TENSOR_ENABLE_COMPRESSION", "enable_compression",
     "false", False, "1", True),
    ("TENSORD_COMPRESSION_THRESHOLD", "OLLAMA_TENSOR_COMPRESSION_THRESHOLD",
     "compression_threshold", "0", 0, " 65536 ", 65536),
    ("TENSORD_MAX_RETRIES", "OLLAMA_TENSOR_MAX_RETRIES", "max_retries", "0", 0, "10", 10),
    ("TENSORD_RETRY_DELAY", "OLLAMA_TENSOR_RETRY_DELAY", "retry_base_delay", "100", 100,
     "2000", 2000),
    ("TENSORD_STREAMING_PROTOCOL", "OLLAMA_TENSOR_STREAMING_PROTOCOL", "use_streaming_protocol",
     "off", False, "yes", True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("tensord", "ollama", "key", "v1", "e1", "v2", "e2"), PROTOCOL_VARS, ids=lambda v: str(v)
)
def test_protocol_variable_and_alias(
    tensord: str, ollama: str, key: str, v1: str, e1: Any, v2: str, e2: Any
) -> None:
    def get(env: dict[str, str]) -> Any:
        return getattr(load_settings(env=env).tensor_protocol, key)

    assert get({tensord: v1}) == e1
    assert get({ollama: v1}) == e1
    assert get({tensord: v2}) == e2
    assert get({ollama: v2}) == e2
    assert get({tensord: v1, ollama: v2}) == e1  # TENSORD_* wins
    assert get({tensord: v2, ollama: v1}) == e2
    assert get({tensord: "", ollama: v2}) == e2  # an empty variable counts as unset
    # a bad value names the variable that carried it, and the value
    for name in (tensord, ollama):
        msg = config_error(env={name: "bogus"})
        assert msg.startswith(f"{name}: ") and "'bogus'" in msg


def test_log_level_variable_and_alias() -> None:
    assert load_settings(env={"TENSORD_LOG_LEVEL": "debug"}).log_level == "debug"
    assert load_settings(env={"OLLAMA_LOG_LEVEL": "ERROR"}).log_level == "error"
    assert load_settings(env={"OLLAMA_LOG_LEVEL": "warn"}).log_level == "warning"
    both = {"TENSORD_LOG_LEVEL": "error", "OLLAMA_LOG_LEVEL": "debug"}
    assert load_settings(env=both).log_level == "error"
    assert load_settings(env=both, log_level="info").log_level == "info"
    msg = config_error(env={"OLLAMA_LOG_LEVEL": "loud"})
    assert msg.startswith("OLLAMA_LOG_LEVEL: ") and "'loud'" in msg
    assert "--log-level" in config_error(log_level="verbose")


OTHER_VARS: list[tuple[str, str, Any]] = [
    ("TENSORD_WINDOW_BYTES", str(8 * MiB), lambda s: s.transfer.window_bytes == 8 * MiB),
    ("TENSORD_MAX_TENSOR_BYTES", "1000", lambda s: s.transfer.max_tensor_bytes == 1000),
    ("TENSORD_DRAIN_TIMEOUT", "2.5", lambda s: s.transfer.drain_timeout == 2.5),
    ("TENSORD_STATE_DIR", "/var/lib/t", lambda s: s.state_dir == Path("/var/lib/t")),
    ("TENSORD_STORE_MAX_BYTES", "1000000", lambda s: s.store.max_bytes == 1_000_000),
    ("TENSORD_CONTROL_SOCKET", "/run/t.sock", lambda s: s.control.socket == Path("/run/t.sock")),
    ("TENSORD_GATEWAY_LISTEN", "0.0.0.0:8080",
     lambda s: s.gateway.listen == HostPort("0.0.0.0", 8080)),
    ("TENSORD_TRANSPORT", "QUIC", lambda s: s.transport == "quic"),
    ("TENSORD_DOWNLOAD_CONNECTIONS", "16", lambda s: s.downloads.connections == 16),
    ("TENSORD_DOWNLOAD_MAX_BYTES", "1000", lambda s: s.downloads.max_bytes == 1000),
    ("TENSORD_DOWNLOAD_SHARE", "false", lambda s: s.downloads.share is False),
    ("TENSORD_QUIC_UDP_OFFLOAD", "false", lambda s: s.quic.udp_offload is False),
    ("TENSORD_MIRROR_LISTEN", "127.0.0.1:5005",
     lambda s: s.mirror.listen == HostPort("127.0.0.1", 5005)),
    ("TENSORD_MIRROR_UPSTREAM", "http://127.0.0.1:5000",
     lambda s: s.mirror.upstream == "http://127.0.0.1:5000"),
    ("TENSORD_CLUSTER_SECRET_FILE", "/etc/t/secret",
     lambda s: s.security.secret_file == Path("/etc/t/secret")),
    ("TENSORD_LISTEN", "0.0.0.0:0", lambda s: s.listen == HostPort("0.0.0.0", 0)),
    ("TENSORD_NODE_ID", "edge-7", lambda s: s.node_id == "edge-7"),
]  # fmt: skip


@pytest.mark.parametrize(("var", "value", "check"), OTHER_VARS, ids=[v[0] for v in OTHER_VARS])
def test_other_variables(var: str, value: str, check: Any) -> None:
    assert check(load_settings(env={var: value}))


@pytest.mark.parametrize(
    ("var", "value"),
    [("TENSORD_WINDOW_BYTES", "1"), ("TENSORD_MAX_TENSOR_BYTES", "0"),
     ("TENSORD_GATEWAY_LISTEN", "nohost"), ("TENSORD_TRANSPORT", "udp"),
     ("TENSORD_DOWNLOAD_CONNECTIONS", "0"), ("TENSORD_DOWNLOAD_MAX_BYTES", "0"),
     ("TENSORD_LISTEN", "host:99999"), ("TENSORD_DOWNLOAD_SHARE", "maybe"),
     ("TENSORD_MIRROR_LISTEN", "nohost"),
     ("TENSORD_NODE_ID", "bad id"), ("TENSORD_NODE_ID", "gpu-1\n"),
     ("TENSORD_CHUNK_SIZE", "1024"), ("TENSORD_CHUNK_SIZE", str(128 * MiB)),
     ("OLLAMA_TENSOR_CHUNK_SIZE", "1MiB"), ("TENSORD_MAX_RETRIES", "-1"),
     ("OLLAMA_TENSOR_MAX_RETRIES", "-3"), ("TENSORD_RETRY_DELAY", "0.5"),
     ("TENSORD_ENABLE_COMPRESSION", "2")],
)  # fmt: skip
def test_bad_variables_name_the_variable_and_the_value(var: str, value: str) -> None:
    msg = config_error(env={var: value})
    assert msg.startswith(f"{var}: ")
    assert repr(value) in msg


def test_every_documented_variable_is_tested() -> None:
    tested = {v[0] for v in PROTOCOL_VARS} | {v[1] for v in PROTOCOL_VARS}
    tested |= {v[0] for v in OTHER_VARS}
    tested |= {"TENSORD_LOG_LEVEL", "OLLAMA_LOG_LEVEL", "TENSORD_CLUSTER_FILE"}
    assert tested == set(ENV_VARS)


def test_environment_is_only_read_from_the_mapping_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORD_CHUNK_SIZE", "8192")
    assert load_settings(env={}).tensor_protocol.chunk_size == 1 * MiB
    assert load_settings().tensor_protocol.chunk_size == 8192  # None means os.environ


# ---------------------------------------------------------------------------------------------
# Bad cluster files: one line naming the file and key, and the value.


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg, path = file_error(tmp_path, {"nodes": NODES, "chunk_size": 4096})
    assert msg.startswith(f"{path}: ")
    assert "'chunk_size'" in msg and "tensor_protocol" in msg  # what is accepted


@pytest.mark.parametrize(
    ("content", "where", "key"),
    [
        ({"tensor_protocol": {"chunk_sise": 4096}}, "tensor_protocol", "chunk_sise"),
        ({"pool": {"max_conns": 1}}, "pool", "max_conns"),
        ({"transfer": {"window": 1}}, "transfer", "window"),
        ({"security": {"secret": "x"}}, "security", "secret"),
        ({"security": {"tls": {"ca": "a", "cert": "b", "key": "c", "crl": "d"}}}, "security.tls",
         "crl"),
        ({"downloads": {"parallel": 2}}, "downloads", "parallel"),
        ({"gateway": {"port": 1}}, "gateway", "port"),
        ({"control": {"path": "/x"}}, "control", "path"),
        ({"nodes": [{"id": "gpu-1", "addr": "h:1", "port": 2}]}, "nodes[0]", "port"),
    ],
)  # fmt: skip
def test_unknown_key_inside_a_section(
    tmp_path: Path, content: dict[str, Any], where: str, key: str
) -> None:
    msg, path = file_error(tmp_path, content)
    assert msg.startswith(f"{path}.{where}: ")
    assert repr(key) in msg


@pytest.mark.parametrize(
    ("content", "key", "value"),
    [
        ({"tensor_protocol": {"chunk_size": "big"}}, "tensor_protocol.chunk_size", "big"),
        ({"tensor_protocol": {"chunk_size": 1024}}, "tensor_protocol.chunk_size", 1024),
        ({"tensor_protocol": {"chunk_size": 128 * MiB}}, "tensor_protocol.chunk_size", 128 * MiB),
        ({"tensor_protocol": {"chunk_size": 4096.5}}, "tensor_protocol.chunk_size", 4096.5),
        ({"tensor_protocol": {"chunk_size": True}}, "tensor_protocol.chunk_size", True),
        ({"tensor_protocol": {"max_retries": -1}}, "tensor_protocol.max_retries", -1),
        ({"tensor_protocol": {"enable_compression": "maybe"}},
         "tensor_protocol.enable_compression", "maybe"),
        ({"tensor_protocol": {"enable_compression": 1}}, "tensor_protocol.enable_compression", 1),
        ({"tensor_protocol": []}, "tensor_protocol", []),
        ({"pool": {"max_connections": 0}}, "pool.max_connections", 0),
        ({"pool": {"max_idle_seconds": -1}}, "pool.max_idle_seconds", -1),
        ({"transfer": {"io_timeout": "soon"}}, "transfer.io_timeout", "soon"),
        ({"security": {"insecure": "no way"}}, "security.insecure", "no way"),
        ({"security": {"secret_file": 5}}, "security.secret_file", 5),
        ({"gateway": {"listen": "nohost"}}, "gateway.listen", "nohost"),
        ({"log_level": "chatty"}, "log_level", "chatty"),
        ({"name": ""}, "name", ""),
        ({"nodes": {"id": "gpu-1"}}, "nodes", {"id": "gpu-1"}),
        ({"nodes": [{"id": "gpu 1", "addr": "h:1"}]}, "nodes[0].id", "gpu 1"),
        ({"nodes": [{"id": "gpu-1\n", "addr": "h:1"}]}, "nodes[0].id", "gpu-1\n"),
        ({"nodes": [{"id": "gpu-1", "addr": "h:1", "ollama": "ftp://x"}]}, "nodes[0].ollama",
         "ftp://x"),
        ({"nodes": [{"id": "gpu-1", "addr": "h:1", "transport": "udp"}]}, "nodes[0].transport",
         "udp"),
    ],
)  # fmt: skip
def test_wrong_value_names_file_key_and_value(
    tmp_path: Path, content: dict[str, Any], key: str, value: object
) -> None:
    msg, path = file_error(tmp_path, content)
    assert msg.startswith(f"{path}.{key}: ")
    assert repr(value) in msg
    assert "expected" in msg


@pytest.mark.parametrize("addr", ["nohost", "host:99999", "a b:1", "host:0", ":7070", "host:",
                                  "[::1]", "::1:7070", "-bad:1", 7070])  # fmt: skip
def test_malformed_node_addr(tmp_path: Path, addr: object) -> None:
    msg, path = file_error(tmp_path, {"nodes": [{"id": "gpu-1", "addr": addr}]})
    assert msg.startswith(f"{path}.nodes[0].addr: ")
    assert repr(addr) in msg


@pytest.mark.parametrize("addr", ["nohost", "host:99999", "a b:1"])
def test_malformed_listen_from_cli_and_env(addr: str) -> None:
    assert config_error(listen=addr).startswith("--listen: ")
    assert repr(addr) in config_error(env={"TENSORD_LISTEN": addr})


def test_missing_id_or_addr(tmp_path: Path) -> None:
    msg, path = file_error(tmp_path, {"nodes": [{"addr": "h:1"}]})
    assert msg.startswith(f"{path}.nodes[0]: ") and "'id'" in msg
    msg, path = file_error(tmp_path, {"nodes": [{"id": "gpu-1"}]})
    assert msg.startswith(f"{path}.nodes[0]: ") and "'addr'" in msg


def test_duplicate_node_ids(tmp_path: Path) -> None:
    nodes = [*NODES, {"id": "gpu-1", "addr": "10.0.0.13:7070"}]
    msg, path = file_error(tmp_path, {"nodes": nodes})
    assert msg.startswith(f"{path}.nodes[2].id: ")
    assert "'gpu-1'" in msg and "duplicate" in msg


def test_unknown_node_id(tmp_path: Path) -> None:
    path = write_cluster_file(tmp_path / "cluster.json", NODES)
    msg = config_error(cluster_file=path, node_id="gpu-9")
    assert msg.startswith("--node-id: ") and "'gpu-9'" in msg and "gpu-1, gpu-2" in msg
    msg = config_error(env={"TENSORD_NODE_ID": "gpu-9"}, cluster_file=path)
    assert msg.startswith("TENSORD_NODE_ID: ") and "'gpu-9'" in msg


def test_node_id_required_with_a_cluster_file(tmp_path: Path) -> None:
    path = write_cluster_file(tmp_path / "cluster.json", NODES)
    msg = config_error(cluster_file=path)
    assert msg.startswith(f"{path}: ") and "TENSORD_NODE_ID" in msg and "gpu-1" in msg


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "name": "x",\n  "nodes": [,]\n}\n')
    msg = config_error(cluster_file=path)
    assert msg.startswith(f"{path}: line 3 column 13: invalid JSON")


def test_trailing_comma_is_invalid_json(tmp_path: Path) -> None:
    path = write(tmp_path, '{"name": "x",}')
    assert "line 1 column" in config_error(cluster_file=path)


def test_top_level_must_be_an_object(tmp_path: Path) -> None:
    path = write(tmp_path, "[1, 2]")
    msg = config_error(cluster_file=path)
    assert msg.startswith(f"{path}: ") and "JSON object" in msg


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    msg = config_error(cluster_file=missing)
    assert msg.startswith(f"{missing}: cannot read the cluster file")
    msg = config_error(env={"TENSORD_CLUSTER_FILE": str(missing)})
    assert str(missing) in msg


def test_errors_are_one_line_even_for_multi_line_values(tmp_path: Path) -> None:
    msg, _ = file_error(tmp_path, {"name": "x", "log_level": "a\nb\r\nc"})
    assert "'a\\nb\\r\\nc'" in msg


# ---------------------------------------------------------------------------------------------
# The full schema.

FULL: dict[str, Any] = {
    "name": "inference-b",
    "nodes": [
        {"id": "gpu-1", "addr": "10.0.0.11:7070", "ollama": "http://10.0.0.11:11434/"},
        {"id": "gpu-2", "addr": "gpu2.lan:7100", "transport": "QUIC"},
        {"id": "lo", "addr": "127.0.0.1:7200", "ollama": None},
        {"id": "v6", "addr": "[fd00::5]:7300"},
        {"id": "v6lo", "addr": "[::1]:7400"},
        {"id": "named-lo", "addr": "localhost:7500"},
    ],
    "tensor_protocol": {
        "use_streaming_protocol": False,
        "chunk_size": 4 * MiB,
        "enable_compression": False,
        "compression_threshold": 0,
        "max_retries": 5,
        "retry_base_delay": 250,
    },
    "pool": {"max_connections": 4, "max_idle_seconds": 60},
    "transfer": {
        "window_bytes": 16 * MiB,
        "connect_timeout": 2.5,
        "io_timeout": 5,
        "max_tensor_bytes": GiB,
        "max_header_bytes": 8 * KiB,
        "partial_ttl_seconds": 0,
    },
    "security": {
        "secret_file": "/etc/tensord/secret",
        "tls": {"ca": "/etc/tensord/ca.pem", "cert": "/etc/tensord/n.pem", "key": "~/n.key"},
        "insecure": True,
    },
    "downloads": {
        "connections": 8,
        "min_chunk_size": 16 * MiB,
        "max_concurrent": 3,
        "credentials_file": "/etc/tensord/creds.json",
    },
    "gateway": {"listen": "0.0.0.0:11500", "api_keys_file": None, "keepalive_seconds": 5},
    "control": {"socket": "/run/tensord/control.sock"},
    "store": {"max_bytes": 1 << 40},
    "state_dir": "/var/lib/tensord",
    "log_level": "WARN",
}


def test_full_schema_parses(tmp_path: Path) -> None:
    path = write_cluster_file(tmp_path / "cluster.json", **FULL)
    s = load_settings(env={}, cluster_file=path, node_id="gpu-2")
    assert s.cluster_name == "inference-b" and s.cluster_file == path
    assert s.nodes[0] == NodeEntry("gpu-1", HostPort("10.0.0.11", 7070), "http://10.0.0.11:11434")
    assert s.nodes[1] == NodeEntry("gpu-2", HostPort("gpu2.lan", 7100), None, "quic")
    assert s.nodes[2].ollama is None and s.nodes[2].transport == "tcp"
    assert s.nodes[3].addr == HostPort("fd00::5", 7300)
    assert [p.id for p in s.peers] == ["gpu-1", "lo", "v6", "v6lo", "named-lo"]
    assert s.store.max_bytes == 1 << 40 and s.state_dir == Path("/var/lib/tensord")
    assert s.node("gpu-1") == s.nodes[0] and s.node("nope") is None
    assert s.transport == "quic"  # the node's own transport
    p = s.tensor_protocol
    assert (p.use_streaming_protocol, p.chunk_size, p.enable_compression) == (False, 4 * MiB, False)
    assert (p.compression_threshold, p.max_retries, p.retry_base_delay) == (0, 5, 250)
    assert (s.pool.max_connections, s.pool.max_idle_seconds) == (4, 60.0)
    t = s.transfer
    assert (t.window_bytes, t.connect_timeout, t.io_timeout) == (16 * MiB, 2.5, 5.0)
    assert (t.max_tensor_bytes, t.max_header_bytes, t.partial_ttl_seconds) == (GiB, 8 * KiB, 0)
    assert s.security == SecuritySettings(
        Path("/etc/tensord/secret"),
        TlsSettings(
            Path("/etc/tensord/ca.pem"), Path("/etc/tensord/n.pem"), Path("~/n.key").expanduser()
        ),
        True,
    )
    d = s.downloads
    assert (d.connections, d.min_chunk_size, d.max_concurrent) == (8, 16 * MiB, 3)
    assert d.credentials_file == Path("/etc/tensord/creds.json")
    assert s.gateway.listen == HostPort("0.0.0.0", 11500)
    assert s.gateway.api_keys_file is None and s.gateway.keepalive_seconds == 5.0
    assert s.control.socket == Path("/run/tensord/control.sock")
    assert s.state_dir == Path("/var/lib/tensord")
    assert s.log_level == "warning"


@pytest.mark.parametrize(
    ("node_id", "listen"),
    [
        ("gpu-1", HostPort("0.0.0.0", 7070)),  # routable address: all interfaces, its port
        ("gpu-2", HostPort("0.0.0.0", 7100)),  # hostname
        ("lo", HostPort("127.0.0.1", 7200)),  # loopback stays loopback
        ("v6", HostPort("::", 7300)),
        ("v6lo", HostPort("::1", 7400)),
        ("named-lo", HostPort("localhost", 7500)),
    ],
)
def test_listen_address_derives_from_the_nodes_own_addr(
    tmp_path: Path, node_id: str, listen: HostPort
) -> None:
    path = write_cluster_file(tmp_path / "cluster.json", **FULL)
    s = load_settings(env={}, cluster_file=path, node_id=node_id)
    assert s.listen == listen
    assert s.node_id not in [p.id for p in s.peers]


def test_tls_needs_all_three_paths(tmp_path: Path) -> None:
    msg, path = file_error(tmp_path, {"security": {"tls": {"ca": "/a", "cert": "/b"}}})
    assert msg.startswith(f"{path}.security.tls: ") and "key" in msg


def test_null_sections_values(tmp_path: Path) -> None:
    security = {"tls": None, "secret_file": None}
    path = write_cluster_file(tmp_path / "cluster.json", security=security, state_dir=None)
    s = load_settings(env={}, cluster_file=path)
    assert s.security.tls is None and s.security.secret_file is None
    assert s.state_dir == default_state_dir({})  # null means "the default"


def test_file_without_nodes_needs_no_node_id(tmp_path: Path) -> None:
    path = write_cluster_file(tmp_path / "cluster.json", name="solo", pool={"max_connections": 1})
    s = load_settings(env={}, cluster_file=path)
    assert s.node_id == "local" and s.pool.max_connections == 1
    assert s.listen == HostPort("127.0.0.1", 7070)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("tensor_protocol", "chunk_size", "4096"),
        ("tensor_protocol", "enable_compression", "yes"),
        ("pool", "max_idle_seconds", "30"),
        ("security", "insecure", "true"),
    ],
)
def test_file_numbers_and_booleans_must_not_be_strings(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    path = write(tmp_path, {section: {key: value}})
    with pytest.raises(ConfigError) as info:
        load_settings({}, cluster_file=path)
    assert f"{section}.{key}" in str(info.value) and "not a string" in str(info.value)


def test_library_node_may_use_a_cluster_file_without_being_one_of_its_nodes(
    tmp_path: Path,
) -> None:
    path = write_cluster_file(tmp_path / "cluster.json", {"a": "10.0.0.1:7070"})
    settings = load_settings({}, cluster_file=path, library=True)
    assert settings.node_id.startswith("node-") and settings.listen.port == 0
    assert [p.id for p in settings.peers] == ["a"]
    # ...but an explicit id must still be one of the file's
    with pytest.raises(ConfigError, match="--node-id"):
        load_settings({}, cluster_file=path, library=True, node_id="zz")


# ---------------------------------------------------------------------------------------------
# Each setting is stated once: the file and its variable accept and refuse the same values.


def _number_kind(row: Row) -> Integer | Number | None:
    kind = row.spec.kind.inner if isinstance(row.spec.kind, Nullable) else row.spec.kind
    return kind if isinstance(kind, Integer | Number) else None


RANGED = [r for r in walk(Settings) if r.spec.env and r.spec.in_file and _number_kind(r)]


@pytest.mark.parametrize("row", RANGED, ids=[r.path for r in RANGED])
def test_a_variable_and_its_file_key_share_one_range(tmp_path: Path, row: Row) -> None:
    kind = _number_kind(row)
    assert kind is not None and row.spec.env is not None
    bad = -(1 << 70) if isinstance(kind, Integer) else -1e9  # below every range
    from_env = config_error(env={row.spec.env: str(bad)})
    section, _, key = row.path.rpartition(".")
    from_file, path = file_error(tmp_path, {section: {key: bad}})
    assert from_env.startswith(f"{row.spec.env}: ")
    assert from_file.startswith(f"{path}.{row.path}: ")
    accepted = f"expected {kind.accepted}"
    assert from_env.endswith(accepted) and from_file.endswith(accepted)
