"""The control API's JSON endpoints in-process: the ASGI app driven by httpx's ASGITransport
under trio, against a real node with an on-disk store, without a daemon subprocess or a socket.

The app depends on :class:`tensord.control.service.DaemonServices` only, so the services here
are a plain object; tests/test_control.py covers the same API through a real ``tensord serve``.
"""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np
import trio

from tensord import ConfigError, TensorNode
from tensord.config import Settings
from tensord.control.app import ControlApp
from tensord.download.manager import DownloadManager
from tensord.peer_health import PeerHealth
from tensord.store import TensorStore
from tensord.transfers import TransferTable

from .support.helpers import fast_settings


@dataclass
class Services:
    """A daemon's services without the daemon: what ControlApp needs (DaemonServices)."""

    settings: Settings
    node: TensorNode
    store: TensorStore
    downloads: DownloadManager
    transfers: TransferTable = field(default_factory=TransferTable)
    peers: dict[str, PeerHealth] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    reload_error: str | None = None
    reloads: int = 0

    def reload_or_raise(self) -> int:
        self.reloads += 1
        if self.reload_error is not None:
            raise ConfigError(self.reload_error)
        return len(self.peers)


@asynccontextmanager
async def control_app(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Services]]:
    settings = replace(fast_settings(), state_dir=tmp_path / "state")
    async with TensorNode(settings) as node:
        assert node.store is not None
        services = Services(
            settings,
            node,
            node.store,
            DownloadManager(node.store.root / "models", settings.downloads, node.events),
        )
        transport = httpx.ASGITransport(app=ControlApp(services))
        async with httpx.AsyncClient(transport=transport, base_url="http://tensord") as client:
            yield client, services


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


async def test_status_names_the_node_and_its_store(tmp_path: Path) -> None:
    async with control_app(tmp_path) as (client, services):
        r = await client.get("/v1/status")
        assert r.status_code == 200
        doc = r.json()
        assert doc["node_id"] == services.node.node_id
        assert doc["listen"] == services.node.addr
        assert doc["store"]["root"] == str(services.store.root)
        assert doc["store"]["tensors"] == 0
        assert doc["peers"] == [] and doc["transfers"] == []


async def test_upload_list_read_back_and_delete_a_tensor(tmp_path: Path) -> None:
    data = np.arange(1000, dtype=np.float32)
    async with control_app(tmp_path) as (client, services):
        r = await client.put(
            "/v1/tensors/blk.0",
            content=npy(data),
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 201, r.text
        assert r.json()["name"] == "blk.0"
        listed = (await client.get("/v1/tensors")).json()["tensors"]
        assert [t["name"] for t in listed] == ["blk.0"]
        info = (await client.get("/v1/tensors/blk.0")).json()
        assert info["nbytes"] == data.nbytes
        raw = await client.get("/v1/tensors/blk.0/data")
        assert raw.headers["x-tensord-dtype"] == "<f4"
        assert np.array_equal(np.load(io.BytesIO(raw.content)), data)  # a .npy file
        assert np.array_equal(services.node.get_tensor("blk.0"), data)
        r = await client.delete("/v1/tensors/blk.0")
        assert r.json() == {"deleted": "blk.0"}
        r = await client.get("/v1/tensors/blk.0")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"


async def test_errors_carry_status_code_and_a_message(tmp_path: Path) -> None:
    async with control_app(tmp_path) as (client, _):
        cases = [
            (client.get("/v1/nothing"), 404, "not_found"),
            (client.post("/v1/status"), 405, "method_not_allowed"),
            (client.get("/v1/tensors/..%2Fetc"), 400, "bad_name"),
            (client.post("/v1/pull", json={"peer": "x", "nme": "y"}), 400, "bad_request"),
            (client.get("/v1/downloads/no-such-job"), 404, "download"),
        ]
        for request, status, code in cases:
            r = await request
            assert r.status_code == status, (r.request.url, r.text)
            error = r.json()["error"]
            assert error["code"] == code, error
            assert error["message"] and not error["message"].endswith(":"), error


async def test_reload_reports_the_peer_count_or_the_config_error(tmp_path: Path) -> None:
    async with control_app(tmp_path) as (client, services):
        r = await client.post("/v1/reload")
        assert r.json() == {"reloaded": True, "peers": 0}
        services.reload_error = "cluster.json: key 'nodes' must be a list"
        r = await client.post("/v1/reload")
        assert r.status_code == 400, r.text
        assert "'nodes' must be a list" in r.json()["error"]["message"]
        assert services.reloads == 2


async def test_pull_from_an_unreachable_peer_is_a_typed_error(tmp_path: Path) -> None:
    async with control_app(tmp_path) as (client, _):
        with trio.fail_after(30):
            r = await client.post("/v1/pull", json={"peer": "127.0.0.1:1", "name": "w"})
        assert r.status_code in (502, 503, 504), r.text
        assert r.json()["error"]["code"] in ("peer_unreachable", "transfer_failed")


async def test_peers_lists_each_configured_peer_with_its_pool(tmp_path: Path) -> None:
    from tensord.config import HostPort, NodeEntry

    async with control_app(tmp_path) as (client, services):
        entry = NodeEntry("gpu-2", HostPort("127.0.0.1", 7071))
        services.peers["gpu-2"] = PeerHealth(entry, state="down", failures=3, last_error="refused")
        peers = (await client.get("/v1/peers")).json()["peers"]
        assert peers == [
            {
                "id": "gpu-2",
                "addr": str(entry.addr),
                "state": "down",
                "rtt_ms": None,
                "failures": 3,
                "last_error": "refused",
                "pool": {"size": 0, "idle": 0, "in_use": 0},
            }
        ]
