"""``tensord send FILE`` for a file the daemon cannot see (systemd's PrivateTmp=/ProtectHome=):
the CLI streams it into the daemon's store and sends it from there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .support.cli import run
from .support.cluster import write_cluster_file
from .support.control_api import http, ready
from .support.daemons import daemon, free_port
from .support.helpers import require


async def test_send_streams_a_file_hidden_from_the_daemon(tmp_path: Path) -> None:
    require(os.geteuid() == 0 and shutil.which("unshare") is not None, "needs root and unshare")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    array = np.random.default_rng(4).standard_normal((512, 256)).astype(np.float32)
    np.save(hidden / "w.npy", array)
    ports = {"a": free_port(), "b": free_port()}
    cluster = write_cluster_file(tmp_path / "c.json", ports)
    # Daemon a runs in its own mount namespace with an empty tmpfs over the file's directory,
    # as PrivateTmp= does under systemd.
    private = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount -t tmpfs tmpfs "{hidden}" && exec "$@"', "sh")  # fmt: skip
    async with (
        daemon({"TENSORD_NODE_ID": "a"}, "--cluster", str(cluster), wrapper=private) as a,
        daemon({"TENSORD_NODE_ID": "b"}, "--cluster", str(cluster)) as b,
    ):
        await ready(a)
        await ready(b)
        code, out, err = await run(
            "send", str(hidden / "w.npy"), "--to", "b", "--name", "hid", socket=a.socket
        )
        assert code == 0, err
        assert "sent hid to b" in out
        async with http(b) as cb:
            r = await cb.get("/v1/tensors/hid/data")
        (tmp_path / "got.npy").write_bytes(r.content)
        assert np.array_equal(np.load(tmp_path / "got.npy"), array)
