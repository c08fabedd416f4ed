"""``tensord pull-model``, ``download`` and ``downloads`` against a real daemon, registry and
nginx."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .support.cli import CliResult, run
from .support.control_api import ready
from .support.daemons import Daemon, daemon
from .support.nginx import nginx
from .support.registry import registry

MiB = 1 << 20


async def cli(d: Daemon, *args: str) -> CliResult:
    return await run(*args, socket=d.socket)


async def test_pull_model_shows_a_summary_and_downloads_lists_it(tmp_path: Path) -> None:
    layers = [np.random.default_rng(i).bytes(3 * MiB) for i in (5, 6)]
    with registry(tmp_path) as reg:
        reg.push_model("models/cli", "v2", layers)
        ref = f"http://{reg.host}/models/cli:v2"
        async with daemon({"TENSORD_LISTEN": "127.0.0.1:0"}) as d:
            await ready(d)
            code, out, err = await cli(d, "pull-model", ref)
            assert code == 0, err
            assert out.startswith(f"downloaded {ref}: 6.0 MiB in "), out
            code, out, _ = await cli(d, "downloads", "--json")
            (job,) = json.loads(out)
            assert job["state"] == "done" and job["bytes_done"] == job["bytes_total"]
            code, out, _ = await cli(d, "downloads")
            assert "done" in out and ref in out
            code, _, err = await cli(d, "pull-model", "NOT A REF")
            assert code == 1 and "bad model reference" in err and len(err.splitlines()) == 1


async def test_detach_then_cancel_and_a_wrong_digest_fails_clearly(tmp_path: Path) -> None:
    content = np.random.default_rng(7).bytes(32 * MiB)
    sha = hashlib.sha256(content).hexdigest()
    with nginx(tmp_path) as web:
        (web.root / "blob").write_bytes(content)
        (web.root / "small").write_bytes(content[:MiB])
        async with daemon({"TENSORD_LISTEN": "127.0.0.1:0"}) as d:
            await ready(d)
            slow = web.url("slowfirst", "blob")  # crawls: still running when we cancel it
            code, out, err = await cli(d, "download", slow, "--sha256", sha, "--detach")
            assert code == 0, err
            job = out.split()[1].rstrip(":")
            code, out, err = await cli(d, "downloads", "--cancel", job)
            assert code == 0 and out.strip() == f"download {job}: cancelled", (out, err)
            code, _, err = await cli(d, "download", web.url("files", "small"), "--sha256", sha)
            assert code == 1 and "sha256 mismatch" in err
