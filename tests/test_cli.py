"""The ``tensord`` command as a real subprocess."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import trio

from .support.cli import start, tensord
from .support.cluster import write_cluster_file
from .support.daemons import daemon_env
from .support.helpers import running


def test_version() -> None:
    out = tensord("version")
    assert out.code == 0
    assert out.out.startswith("tensord 0.")


def test_bad_env_var_exits_78_with_one_line() -> None:
    out = tensord("serve", env={"OLLAMA_TENSOR_CHUNK_SIZE": "12"})
    assert out.code == 78
    lines = out.err.strip().splitlines()
    assert len(lines) == 1
    assert "OLLAMA_TENSOR_CHUNK_SIZE" in lines[0] and "'12'" in lines[0]
    assert "4 KiB..64 MiB" in lines[0]


def test_bad_cluster_file_exits_78_naming_file_and_key(tmp_path: Path) -> None:
    cluster = write_cluster_file(
        tmp_path / "cluster.json", {"a": "10.0.0.1:7070"}, tensor_protocol={"max_retries": -1}
    )
    out = tensord("serve", "--cluster", str(cluster), "--node-id", "a")
    assert out.code == 78
    assert str(cluster) in out.err and "tensor_protocol.max_retries" in out.err
    assert len(out.err.strip().splitlines()) == 1


def test_unknown_node_id_exits_78(tmp_path: Path) -> None:
    cluster = write_cluster_file(tmp_path / "cluster.json", {"a": "10.0.0.1:7070"})
    out = tensord("serve", "--cluster", str(cluster), env={"TENSORD_NODE_ID": "zz"})
    assert out.code == 78
    assert "TENSORD_NODE_ID" in out.err and "'zz'" in out.err


async def _read_until(stream: trio.abc.ReceiveStream, needle: bytes, seen: bytearray) -> None:
    while needle not in seen:
        chunk = await stream.receive_some(65536)
        assert chunk, f"process ended before printing {needle!r}: {seen.decode()}"
        seen += chunk


async def test_serve_accepts_tensors_and_logs_arrivals(tmp_path: Path) -> None:
    env = daemon_env({"TENSORD_LISTEN": "127.0.0.1:0", "TENSORD_NODE_ID": "cli-node"}, tmp_path)
    proc = await start("serve", env=env)
    assert proc.stderr is not None
    seen = bytearray()
    try:
        with trio.fail_after(30):
            await _read_until(proc.stderr, b"listening on tensord://cli-node@127.0.0.1:", seen)
            line = seen.decode().split("listening on ")[1].split()[0]
            array = np.arange(1000, dtype=np.float32)
            async with running() as a:
                result = await a.send_tensor(line, "from-test", array)
            assert result.nbytes == array.nbytes
            await _read_until(proc.stderr, b"tensor arrived: 'from-test'", seen)
            assert b"float32 shape (1000,)" in seen
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_every_way_to_start_the_cli_reaches_the_same_main() -> None:
    """``tensord`` (pyproject's console script), ``python -m tensord`` and ``python -m
    tensord.cli`` all run :func:`tensord.cli.main`, the package's entry point."""
    import importlib
    import subprocess
    import sys
    import tomllib

    from tensord.cli import main

    root = Path(__file__).resolve().parent.parent
    script = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]["tensord"]
    module, _, attr = script.partition(":")
    assert getattr(importlib.import_module(module), attr) is main
    for entry in (["-m", "tensord"], ["-m", "tensord.cli"]):
        out = subprocess.run(
            [sys.executable, *entry, "version"], capture_output=True, text=True, check=False
        )
        assert (out.returncode, out.stdout.startswith("tensord ")) == (0, True), out
