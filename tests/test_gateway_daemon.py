"""The gateway as ``tensord serve`` runs it: started from the cluster file's Ollama nodes, with
backends added and removed by SIGHUP."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx

from .support.cluster import NodeSpec, write_cluster_file
from .support.control_api import http, ready
from .support.daemons import daemon, free_port
from .support.ollama_backend import BackendConfig, ollama_backend


def cluster(path: Path, port: int, backends: dict[str, str]) -> Path:
    nodes: dict[str, NodeSpec] = {"me": port}
    nodes |= {k: {"addr": f"127.0.0.1:{free_port()}", "ollama": url} for k, url in backends.items()}
    return write_cluster_file(path, nodes, transfer={"peer_check_interval": 60})


async def test_daemon_serves_the_gateway_and_reload_changes_backends(tmp_path: Path) -> None:
    async with (
        ollama_backend(BackendConfig(models=["one:latest"], interval=0.0)) as b1,
        ollama_backend(BackendConfig(models=["two:latest"], interval=0.0)) as b2,
    ):
        port = free_port()
        path = cluster(tmp_path / "c.json", port, {"gpu-1": b1.url})
        async with daemon({"TENSORD_NODE_ID": "me"}, "--cluster", str(path)) as d:
            await ready(d)
            end = await d.wait_for("gateway on http://")
            url = d.text[end - len("http://") :].split(",")[0].strip()
            async with httpx.AsyncClient(timeout=30) as client:
                tags = (await client.get(f"{url}/api/tags")).json()
                assert [m["name"] for m in tags["models"]] == ["one:latest"]
                body = {"model": "one", "messages": [{"role": "user", "content": "x"}]}
                r = await client.post(f"{url}/api/chat", json=body)
                assert r.status_code == 200 and json.loads(r.text.splitlines()[-1])["done"]
                # SIGHUP: gpu-1 leaves, gpu-2 joins; the gateway follows.
                cluster(path, port, {"gpu-2": b2.url})
                mark = len(d.log)
                d.proc.send_signal(signal.SIGHUP)
                await d.wait_for("gateway backend gpu-2", after=mark)
                tags = (await client.get(f"{url}/api/tags")).json()
                assert [m["name"] for m in tags["models"]] == ["two:latest"]
            async with http(d) as c:
                text = (await c.get("/metrics")).text
            ok = 'tensord_gateway_requests_total{backend="gpu-1",endpoint="/api/chat",outcome="ok"}'
            assert f"{ok} 1.0" in text
