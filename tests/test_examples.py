"""The shipped example configuration loads, and means what its comments say."""

from __future__ import annotations

from pathlib import Path

from tensord.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def test_example_cluster_file_and_env_file_load() -> None:
    env = read_env_file(ROOT / "config" / "tensord.env.example")
    env["TENSORD_CLUSTER_FILE"] = str(ROOT / "config" / "cluster.example.json")
    settings = load_settings(env)
    assert settings.node_id == "gpu-1"
    assert settings.cluster_name == "inference-a"
    assert [n.id for n in settings.nodes] == ["gpu-1", "gpu-2", "gpu-3"]
    assert [p.id for p in settings.peers] == ["gpu-2", "gpu-3"]
    assert settings.listen.port == 7070 and settings.listen.host == "0.0.0.0"
    assert settings.tensor_protocol.chunk_size == 1 << 20
    assert settings.nodes[0].ollama == "http://10.0.0.11:11434"
    # null: under systemd the secret comes as the cluster.secret credential (LoadCredential=)
    assert settings.security.secret_file is None


def test_every_node_of_the_example_can_start_from_the_same_file() -> None:
    cluster = str(ROOT / "config" / "cluster.example.json")
    for node_id in ("gpu-1", "gpu-2", "gpu-3"):
        settings = load_settings({}, cluster_file=cluster, node_id=node_id)
        assert settings.node_id == node_id
        assert node_id not in [p.id for p in settings.peers]
