"""Two real ``tensord serve`` subprocesses, a and b, in one cluster (plus c, which never runs):
what the client library and CLI tests talk to. Module-scoped in those tests (starting daemons is
slow), so each test names its tensors with :func:`tests.support.tensor_files.unique`. Blocking
(``subprocess.Popen``): the client tests are mostly synchronous."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tensord import AsyncClient, Client
from tensord.control.client import DaemonNotRunning

from .cluster import write_cluster_file
from .daemons import daemon_env, free_port

#: b's store limit (``TENSORD_STORE_MAX_BYTES``), small enough for a test to fill.
B_STORE_CAP = 24 << 20


@dataclass
class Node:
    id: str
    home: Path
    socket: Path
    proc: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        return (self.home / "log").read_text(errors="replace")

    def client(self) -> Client:
        return Client(self.socket)

    def async_client(self) -> AsyncClient:
        return AsyncClient(self.socket)


@dataclass
class Cluster:
    a: Node
    b: Node
    file: Path
    work: Path


def _start(home: Path, node_id: str, port: int, cluster: Path, **env: str) -> Node:
    home.mkdir()
    full = daemon_env({"TENSORD_NODE_ID": node_id, "TENSORD_LISTEN": f"127.0.0.1:{port}"}, home)
    with open(home / "log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensord", "serve", "--cluster", str(cluster)],
            env=full | env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    return Node(node_id, home, Path(full["TENSORD_CONTROL_SOCKET"]), proc)


def wait_ready(node: Node, deadline: float = 30.0) -> None:
    """Until the daemon answers ``status()`` on its socket (bounded; fails with its log)."""
    give_up = time.monotonic() + deadline
    with node.client() as c:
        while True:
            if node.proc.poll() is not None:
                pytest.fail(f"daemon {node.id} exited ({node.proc.returncode}):\n{node.log}")
            try:
                c.status()
                return
            except DaemonNotRunning:
                if time.monotonic() > give_up:
                    pytest.fail(f"daemon {node.id} not ready after {deadline} s:\n{node.log}")
                time.sleep(0.05)  # polling interval, not synchronisation


def _stop(node: Node) -> None:
    if node.proc.poll() is None:
        node.proc.terminate()
        try:
            node.proc.wait(30)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()


def running_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Daemons a and b (b's store capped), stopped at the end."""
    root = tmp_path_factory.mktemp("ctl")  # short: a socket path must fit in 108 bytes
    ports = {"a": free_port(), "b": free_port(), "c": free_port()}  # c never runs
    file = write_cluster_file(
        root / "cluster.json",
        ports,
        name="client-test",
        transfer={"peer_check_interval": 0.2, "connect_timeout": 2.0},
        tensor_protocol={"retry_base_delay": 20, "max_retries": 1, "chunk_size": 256 << 10},
    )
    work = root / "work"
    work.mkdir()
    a = _start(root / "a", "a", ports["a"], file)
    b = _start(root / "b", "b", ports["b"], file, TENSORD_STORE_MAX_BYTES=str(B_STORE_CAP))
    try:
        wait_ready(a)
        wait_ready(b)
        yield Cluster(a, b, file, work)
    finally:
        _stop(a)
        _stop(b)
