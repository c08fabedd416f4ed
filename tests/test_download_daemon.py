"""Background downloads in a real daemon: through the control API, from a real registry and a
real nginx, surviving a kill -9."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import trio

from .support.control_api import events, http, ready, wait_download
from .support.daemons import daemon
from .support.nginx import nginx
from .support.registry import registry

MiB = 1 << 20


async def test_model_pull_in_the_background_with_dedup_and_events(tmp_path: Path) -> None:
    data = [
        np.random.default_rng(i).integers(0, 255, 5 * MiB, dtype=np.uint8).tobytes() for i in (1, 2)
    ]
    with registry(tmp_path) as reg:
        reg.push_model("models/bg", "v1", data)
        model = f"http://{reg.host}/models/bg:v1"
        async with daemon({"TENSORD_LISTEN": "127.0.0.1:0"}) as d:
            await ready(d)
            async with http(d) as c, events(d) as seen:
                r = await c.post("/v1/downloads", json={"model": model})
                assert r.status_code == 202, r.text
                job = r.json()
                again = (await c.post("/v1/downloads", json={"model": model})).json()
                assert again["id"] == job["id"]  # one download, not two
                done = await wait_download(seen, job["id"], "done")
                assert done["bytes_done"] == done["bytes_total"] > 10 * MiB
                listed = (await c.get("/v1/downloads")).json()["downloads"]
                assert listed[0]["state"] == "done"
                bad = await c.post("/v1/downloads", json={"model": "Not A Ref"})
                assert bad.status_code == 400 and "bad model reference" in bad.text
            blobs = d.home / "state" / "models" / "blobs"
            for content in data:
                path = blobs / ("sha256-" + hashlib.sha256(content).hexdigest())
                assert path.read_bytes() == content


async def test_url_download_resumes_after_the_daemon_is_killed(tmp_path: Path) -> None:
    size = 48 * MiB
    content = np.random.default_rng(9).integers(0, 255, size, dtype=np.uint8).tobytes()
    sha = hashlib.sha256(content).hexdigest()
    home = tmp_path / "home"
    home.mkdir()
    env = {"TENSORD_LISTEN": "127.0.0.1:0", "TENSORD_DOWNLOAD_CONNECTIONS": "2"}
    with nginx(tmp_path) as web:
        (web.root / "blob").write_bytes(content)
        url = web.url("throttled", "blob")
        async with daemon(env, home=home) as d1:
            await ready(d1)
            async with http(d1) as c, events(d1) as seen:
                r = await c.post("/v1/downloads", json={"url": url, "sha256": sha})
                job = r.json()["id"]
                with trio.fail_after(30):
                    async for _, ev in seen:
                        if ev["kind"] == "download" and ev["bytes_done"] > size // 3:
                            break
            d1.proc.kill()
            await d1.proc.wait()
            d1.terminated = True
        async with daemon(env, home=home) as d2:
            await d2.wait_for("resumes after a restart")
            await ready(d2)
            async with http(d2) as c, events(d2) as seen:
                state = (await c.get(f"/v1/downloads/{job}")).json()["state"]
                if state != "done":
                    await wait_download(seen, job, "done")
        blob = home / "state" / "models" / "blobs" / f"sha256-{sha}"
        assert blob.read_bytes() == content
        sent = sum(x.sent for x in web.log())
        # Resumed, not restarted: what travelled twice is at most the pieces that were in flight
        # (2 connections x 8 MiB pieces), plus what the server had buffered in the sockets.
        assert size <= sent <= size + 2 * 8 * MiB + 8 * MiB, sent - size
