"""The control API of a real ``tensord serve`` over its Unix socket (raw HTTP, no client
library): endpoints, errors, the events stream, permissions, and a daemon killed mid-transfer."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import trio

from .support.cluster import two_node_cluster
from .support.control_api import events, http, ready
from .support.daemons import daemon, free_port
from .support.helpers import require
from .support.tcp_proxy import proxied


async def test_tensors_round_trip_and_errors_name_the_cause(tmp_path: Path) -> None:
    array = np.random.default_rng(0).standard_normal((64, 33)).astype(np.float32)
    np.save(tmp_path / "w.npy", array)
    async with daemon({"TENSORD_LISTEN": "127.0.0.1:0", "TENSORD_NODE_ID": "n1"}) as d:
        await ready(d)
        assert oct(d.socket.stat().st_mode & 0o777) == "0o660"
        async with http(d) as c:
            status = (await c.get("/v1/status")).json()
            assert status["node_id"] == "n1" and status["store"]["tensors"] == 0
            name = quote("layers/0/w", safe="")
            r = await c.put(f"/v1/tensors/{name}", json={"path": str(tmp_path / "w.npy")})
            assert r.status_code == 201 and r.json()["shape"] == [64, 33]
            listed = (await c.get("/v1/tensors")).json()["tensors"]
            assert [t["name"] for t in listed] == ["layers/0/w"]
            r = await c.get(f"/v1/tensors/{name}/data")
            assert r.headers["x-tensord-dtype"] == "<f4"
            (tmp_path / "back.npy").write_bytes(r.content)
            assert np.array_equal(np.load(tmp_path / "back.npy"), array)

            async def error(method: str, url: str, **kw: Any) -> tuple[int, str, str]:
                r = await c.request(method, url, **kw)
                e = r.json()["error"]
                return r.status_code, e["code"], e["message"]

            st, code, msg = await error("GET", "/v1/tensors/absent")
            assert (st, code) == (404, "not_found") and "'absent'" in msg
            st, code, msg = await error("PUT", "/v1/tensors/x", json={"path": "rel.npy"})
            assert (st, code) == (400, "bad_request") and "absolute" in msg
            st, code, msg = await error("PUT", "/v1/tensors/x", json={"path": "/nonexistent.npy"})
            assert (st, code) == (400, "bad_request") and "no such file" in msg
            st, code, msg = await error("POST", "/v1/send", json={"peer": "zz", "name": "x"})
            assert (st, code) == (404, "not_found") and "no tensor named 'x'" in msg
            path = str(tmp_path / "w.npy")
            st, code, msg = await error("POST", "/v1/send", json={"peer": "zz", "path": path})
            assert (st, code) == (404, "unknown_peer") and "unknown peer 'zz'" in msg
            st, code, _ = await error("DELETE", "/v1/status")
            assert (st, code) == (405, "method_not_allowed")
            st, code, _ = await error("POST", "/v1/send", content=b"{not json")
            assert (st, code) == (400, "bad_request")
            assert (await c.delete(f"/v1/tensors/{name}")).json() == {"deleted": "layers/0/w"}
            assert (await c.get("/v1/tensors")).json() == {"tensors": []}


async def test_send_between_daemons_with_events_pushed_as_they_happen(tmp_path: Path) -> None:
    size = 64 << 20
    array = np.random.default_rng(1).integers(0, 255, size=size, dtype=np.uint8)
    np.save(tmp_path / "big.npy", array)
    b_port = free_port()
    # At network speed (a 100 MB/s link), not at loopback speed where the three processes of
    # this test saturate both cores and measure the scheduler instead.
    async with (
        proxied(b_port, {}, rate=100e6) as link,
        daemon(
            {"TENSORD_NODE_ID": "a"},
            "--cluster",
            str(
                cluster := two_node_cluster(tmp_path / "c.json", {"a": free_port(), "b": link.port})
            ),
        ) as a,
        daemon(
            {"TENSORD_NODE_ID": "b", "TENSORD_LISTEN": f"127.0.0.1:{b_port}"},
            "--cluster",
            str(cluster),
        ) as b,
    ):
        await ready(a)
        await ready(b)
        async with http(a) as ca, events(b) as seen:
            r = await ca.post("/v1/send", json={"peer": "b", "path": str(tmp_path / "big.npy")})
            assert r.status_code == 200, r.text
            (result,) = r.json()["transfers"]
            assert result["name"] == "big" and result["nbytes"] == array.nbytes
            got: list[tuple[float, dict[str, Any]]] = []
            with trio.fail_after(10):
                async for at, ev in seen:
                    got.append((at, ev))
                    if ev["kind"] == "arrival":
                        break
        progress = [e for _, e in got if e["kind"] == "transfer" and e["state"] == "progress"]
        assert len(progress) >= 8  # one per chunk, not a poll's worth
        assert [e["bytes_done"] for e in progress] == sorted(e["bytes_done"] for e in progress)
        lags = sorted(at - ev["at"] for at, ev in got)
        assert lags[len(lags) // 2] < 0.02, lags  # median: milliseconds, not a polling interval
        async with http(b) as cb:
            r = await cb.get("/v1/tensors/big/data")
            (tmp_path / "out.npy").write_bytes(r.content)
            assert np.array_equal(np.load(tmp_path / "out.npy"), array)
            done = (await cb.get("/v1/transfers")).json()["transfers"]
            assert done[0]["state"] == "done" and done[0]["direction"] == "receive"
            peers = (await cb.get("/v1/peers")).json()["peers"]
            assert [p["id"] for p in peers] == ["a"]
            text = (await cb.get("/metrics")).text
            done = 'tensord_transfers_total{direction="receive",outcome="done"} 1.0'
            assert done in text and "tensord_transfer_bytes_total" in text


async def test_receiver_killed_mid_transfer_resumes_after_restart(tmp_path: Path) -> None:
    size = 64 << 20
    array = np.random.default_rng(2).integers(0, 255, size=size, dtype=np.uint8)
    np.save(tmp_path / "big.npy", array)
    b_port = free_port()
    async with proxied(b_port, {}, rate=24e6) as proxy:
        cluster = two_node_cluster(
            tmp_path / "c.json",
            {"a": free_port(), "b": proxy.port},
            tensor_protocol={"retry_base_delay": 200, "max_retries": 10, "chunk_size": 1 << 20},
        )
        b_env = {"TENSORD_NODE_ID": "b", "TENSORD_LISTEN": f"127.0.0.1:{b_port}"}
        b_home = tmp_path / "b-home"
        b_home.mkdir()
        async with daemon({"TENSORD_NODE_ID": "a"}, "--cluster", str(cluster)) as a:
            await ready(a)
            async with trio.open_nursery() as nursery:
                results: list[dict[str, Any]] = []
                sent = trio.Event()

                async def send() -> None:
                    async with http(a) as ca:
                        path = str(tmp_path / "big.npy")
                        r = await ca.post("/v1/send", json={"peer": "b", "path": path})
                        assert r.status_code == 200, r.text
                        results.append(r.json()["transfers"][0])
                        sent.set()

                async with daemon(b_env, "--cluster", str(cluster), home=b_home) as b1:
                    await ready(b1)
                    async with events(b1) as seen:
                        nursery.start_soon(send)
                        saved = 0
                        with trio.fail_after(30):
                            async for _, ev in seen:
                                if ev.get("state") == "checkpoint" and ev["bytes_done"] > size // 8:
                                    saved = ev["bytes_done"]
                                    break
                    b1.proc.kill()  # SIGKILL: no drain, no final save
                    await b1.proc.wait()
                    b1.terminated = True
                upstream_before = proxy.bytes_upstream
                async with daemon(b_env, "--cluster", str(cluster), home=b_home) as b2:
                    await b2.wait_for("on disk from before a restart")
                    with trio.fail_after(60):
                        await sent.wait()
                    async with http(b2) as cb:
                        r = await cb.get("/v1/tensors/big/data")
                    (tmp_path / "out.npy").write_bytes(r.content)
                    assert np.array_equal(np.load(tmp_path / "out.npy"), array)
        result = results[0]
        assert result["retries"] >= 1
        # The restarted receiver asked only for what its last checkpoint lacked.
        after = proxy.bytes_upstream - upstream_before
        assert after <= size - saved + (32 << 20) + (1 << 20), (after, saved)
        assert result["bytes_resent"] <= size - saved


def _as_nobody() -> dict[str, Any]:
    nobody = pwd.getpwnam("nobody")

    def demote() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    return {"preexec_fn": demote}


CLIENT = """
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])
c = C("tensord")
try:
    c.request("GET", "/v1/status")
    r = c.getresponse()
    print(r.status, r.read().decode())
except OSError as e:
    print("oserror", e.errno)
"""


async def test_control_socket_refuses_other_users(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "needs root to run a client as nobody")
    # The client needs only the standard library; our venv's python may sit under /root.
    python = "/usr/bin/python3"
    require(os.access(python, os.X_OK), "needs /usr/bin/python3 for a client run as nobody")
    # Outside pytest's tmp tree, whose 0700 parents would stop nobody before our socket does.
    with tempfile.TemporaryDirectory(prefix="tensord-perm-") as where:
        home = Path(where)
        os.chmod(home, 0o755)
        await _refuses_other_users(home, python)


async def _refuses_other_users(home: Path, python: str) -> None:
    async with daemon({"TENSORD_LISTEN": "127.0.0.1:0"}, home=home) as d:
        await ready(d)
        run = lambda: subprocess.run(  # noqa: E731
            [python, "-c", CLIENT, str(d.socket)],
            capture_output=True, text=True, timeout=30, **_as_nobody(),
        )  # fmt: skip
        # The file mode (0660) stops nobody at connect()...
        out = await trio.to_thread.run_sync(run)
        assert out.stdout.strip() == "oserror 13", out
        # ...and SO_PEERCRED stops it even if the socket is opened up by mistake.
        os.chmod(d.socket, 0o666)
        out = await trio.to_thread.run_sync(run)
        status, body = out.stdout.split(" ", 1)
        assert status == "403", out
        err = json.loads(body)["error"]
        assert err["code"] == "forbidden" and "may not use" in err["message"]
        await d.wait_for("control socket: refused uid")
        # The daemon's own user still gets in.
        async with http(d) as c:
            assert (await c.get("/v1/status")).status_code == 200


async def test_npy_streamed_in_the_body_is_stored_and_bad_bodies_refused(tmp_path: Path) -> None:
    array = np.arange(3 * 1000 * 1000, dtype=np.int32).reshape(3, -1)
    np.save(tmp_path / "x.npy", array)
    body = (tmp_path / "x.npy").read_bytes()
    octet = {"content-type": "application/octet-stream"}
    async with daemon({"TENSORD_LISTEN": "127.0.0.1:0"}) as d:
        await ready(d)
        async with http(d) as c:

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(body), 100_003):  # odd pieces: the header split too
                    yield body[i : i + 100_003]

            r = await c.put("/v1/tensors/up", content=chunks(), headers=octet)
            assert r.status_code == 201, r.text
            assert r.json()["shape"] == [3, 1_000_000] and r.json()["dtype"] == "<i4"
            r = await c.get("/v1/tensors/up/data")
            assert r.content == body
            for bad, why in [
                (body[:-1], "ended after"),
                (body + b"x", "longer than"),
                (b"not a numpy file", "magic"),
            ]:
                r = await c.put("/v1/tensors/bad", content=bad, headers=octet)
                assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
            assert [t["name"] for t in (await c.get("/v1/tensors")).json()["tensors"]] == ["up"]
        assert not list((d.home / "state" / "partial").iterdir())
