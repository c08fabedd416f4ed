"""The control socket against hostile or careless local clients (issue 12): requests naming FIFOs
(hole 5), a group member asking the daemon to read what only the daemon may (hole 6), slow bodies
and idle connections (hole 8), status built while the loop churns its tables, bad tensor names
and unknown fields, and the error boundary that counts a handler's bug instead of dying."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import trio
import trio.testing

import tensord.control.app as control_app
from tensord.config import HostPort, NodeEntry, load_settings
from tensord.control import status as control_status
from tensord.daemon import Daemon as InProcessDaemon
from tensord.peer_health import PeerHealth

from .support.caller import call_as_group_member
from .support.cluster import two_node_cluster, write_cluster_file
from .support.control_api import http, ready
from .support.daemons import daemon, free_port
from .support.helpers import require


def one_node_cluster(path: Path, **extra: Any) -> Path:
    return write_cluster_file(path, {"n1": free_port()}, **({"name": "t"} | extra))


async def raw_request(sock: Path, head: bytes, body: bytes = b"") -> bytes:
    """One request over a fresh connection; everything the daemon sends until it closes."""
    stream = await trio.open_unix_socket(str(sock))
    async with stream:
        await stream.send_all(head + body)
        out = b""
        while data := await stream.receive_some(65536):
            out += data
        return out


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def error_of(reply: bytes) -> dict[str, str]:
    doc: dict[str, dict[str, str]] = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    return doc["error"]


# -- hole 5: paths that block ---------------------------------------------------------------


async def test_requests_naming_a_fifo_do_not_wedge_the_daemon(tmp_path: Path) -> None:
    """48 concurrent PUTs naming a FIFO (more than trio's 40 default worker threads): each is
    refused at once with a 400 naming the FIFO, ``ls`` still answers, a transfer from a peer
    still arrives, and SIGTERM still stops the daemon. Before, each request pinned a worker
    thread in open() forever: the requests never answered and the daemon could not stop."""
    fifo = tmp_path / "pipe.npy"
    os.mkfifo(fifo)
    array = np.arange(1 << 16, dtype=np.float32)
    np.save(tmp_path / "w.npy", array)
    ports = {"a": free_port(), "b": free_port()}
    cluster = two_node_cluster(tmp_path / "c.json", ports)
    async with (
        daemon({"TENSORD_NODE_ID": "a"}, "--cluster", str(cluster)) as a,
        daemon({"TENSORD_NODE_ID": "b"}, "--cluster", str(cluster)) as b,
    ):
        await ready(a)
        await ready(b)
        async with http(b) as cb:
            answers: list[httpx.Response] = []

            async def put(i: int) -> None:
                answers.append(await cb.put(f"/v1/tensors/f{i}", json={"path": str(fifo)}))

            with trio.fail_after(60):  # generous: healthy runs answer in milliseconds
                async with trio.open_nursery() as nursery:
                    for i in range(48):
                        nursery.start_soon(put, i)
            assert len(answers) == 48
            for r in answers:
                assert r.status_code == 400, r.text
                assert "FIFO" in r.json()["error"]["message"], r.text
            assert (await cb.get("/v1/tensors")).json() == {"tensors": []}
            assert (await cb.get("/v1/status")).status_code == 200
        async with http(a) as ca:
            r = await ca.put("/v1/tensors/w", json={"path": str(tmp_path / "w.npy")})
            assert r.status_code == 201, r.text
            r = await ca.post("/v1/send", json={"peer": "b", "name": "w"})
            assert r.status_code == 200, r.text
        async with http(b) as cb:
            assert [t["name"] for t in (await cb.get("/v1/tensors")).json()["tensors"]] == ["w"]
        b.terminate()
        with trio.fail_after(30):
            await b.proc.wait()
        assert b.proc.returncode == 0, b.text


async def test_file_work_that_hangs_never_takes_the_threads_the_daemon_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file on a hung mount blocks even an O_NONBLOCK open in the kernel: simulated here by a
    read that blocks until released. 48 such requests hold at most the control API's own few
    threads; listing tensors (the default thread pool, as the receive path uses) still works.
    Before, the 48 took all 40 default threads and the listing hung behind them."""
    np.save(tmp_path / "w.npy", np.zeros(3))
    release = threading.Event()
    real = control_app.read_tensor_file

    def hung(path: Path, name: str | None = None) -> Any:
        release.wait(60)
        return real(path, name)

    monkeypatch.setattr(control_app, "read_tensor_file", hung)
    async with in_process(tmp_path) as (_, c):
        statuses: list[int] = []

        async def put(i: int) -> None:
            r = await c.put(f"/v1/tensors/h{i}", json={"path": str(tmp_path / "w.npy")})
            statuses.append(r.status_code)

        try:
            async with trio.open_nursery() as nursery:
                for i in range(48):
                    nursery.start_soon(put, i)
                await trio.testing.wait_all_tasks_blocked(0.2)
                with trio.fail_after(20):  # generous: it answers at once
                    r = await c.get("/v1/tensors")
                assert r.status_code == 200 and r.json() == {"tensors": []}
                assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
                release.set()
        finally:
            release.set()
        assert statuses == [201] * 48


async def test_directories_and_devices_are_refused_by_kind(tmp_path: Path) -> None:
    async with daemon({"TENSORD_LISTEN": "127.0.0.1:0"}) as d:
        await ready(d)
        async with http(d) as c:
            for path, kind in [
                (str(tmp_path), "a directory"),
                ("/dev/zero", "a character device"),
                ("/dev/null", "a character device"),
            ]:
                r = await c.put("/v1/tensors/x", json={"path": path})
                assert r.status_code == 400 and kind in r.json()["error"]["message"], r.text
                r = await c.post("/v1/send", json={"peer": "n", "path": path})
                assert r.status_code == 400 and kind in r.json()["error"]["message"], r.text


# -- hole 6: the confused deputy ------------------------------------------------------------


async def test_a_group_member_reads_only_files_it_could_read_itself() -> None:
    require(os.geteuid() == 0, "needs root to run a client as another uid")
    python = "/usr/bin/python3"  # the standard library is all the client needs
    require(os.access(python, os.X_OK), "needs /usr/bin/python3 for a client run as uid 65534")
    # Outside pytest's tmp tree, whose 0700 parents would stop the client before our checks.
    with tempfile.TemporaryDirectory(prefix="tensord-deputy-") as where:
        home = Path(where)
        os.chmod(home, 0o755)
        files = home / "files"
        files.mkdir(mode=0o755)
        for name, mode in [("secret", 0o600), ("group", 0o640), ("world", 0o644)]:
            np.save(files / f"{name}.npy", np.full(4, mode, dtype=np.int32))
            os.chmod(files / f"{name}.npy", mode)
        closed = home / "closed"
        closed.mkdir(mode=0o700)
        np.save(closed / "inside.npy", np.zeros(2))
        os.chmod(closed / "inside.npy", 0o644)
        (files / "link.npy").symlink_to(files / "secret.npy")
        async with daemon({"TENSORD_LISTEN": "127.0.0.1:0"}, home=home) as d:
            await ready(d)
            calls = [
                ["PUT", "/v1/tensors/s", {"path": str(files / "secret.npy")}],
                ["PUT", "/v1/tensors/l", {"path": str(files / "link.npy")}],
                ["PUT", "/v1/tensors/i", {"path": str(closed / "inside.npy")}],
                ["POST", "/v1/send", {"peer": "zz", "path": str(files / "secret.npy")}],
                ["PUT", "/v1/tensors/g", {"path": str(files / "group.npy")}],
                ["PUT", "/v1/tensors/w", {"path": str(files / "world.npy")}],
                ["GET", "/v1/tensors", {}],
            ]
            out = await trio.to_thread.run_sync(
                lambda: call_as_group_member(python, d.socket, calls)
            )
            assert out.returncode == 0, out.stderr
            replies = json.loads(out.stdout)
            for status, body in replies[:4]:
                assert status == 403 and body["error"]["code"] == "forbidden", replies
                assert "uid 65534 may not" in body["error"]["message"], replies
            assert "may not enter" in replies[2][1]["error"]["message"]
            assert [r[0] for r in replies[4:6]] == [201, 201], replies
            stored = [t["name"] for t in replies[6][1]["tensors"]]
            assert stored == ["g", "w"], replies
            # The daemon's own user (root here) still reads anything it can.
            async with http(d) as c:
                r = await c.put("/v1/tensors/s", json={"path": str(files / "secret.npy")})
                assert r.status_code == 201, r.text


# -- hole 8: slow bodies and idle connections ------------------------------------------------


async def test_a_slow_or_stalled_body_is_answered_408_and_closed(tmp_path: Path) -> None:
    cluster = one_node_cluster(tmp_path / "c.json", control={"read_timeout": 0.5})
    async with daemon({"TENSORD_NODE_ID": "n1"}, "--cluster", str(cluster)) as d:
        await ready(d)
        head = (
            b"PUT /v1/tensors/x HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n"
        )
        with trio.fail_after(20):  # generous: the daemon closes after 0.5 s
            stalled = await raw_request(d.socket, head, b'{"path": ')
        assert status_of(stalled) == 408, stalled
        assert "did not arrive within 0.5 s" in error_of(stalled)["message"]

        # A trickle (a byte every 0.1 s) is cut just the same: the deadline is for the body.
        stream = await trio.open_unix_socket(str(d.socket))
        async with stream:
            await stream.send_all(head)
            reply = b""
            with trio.fail_after(20):
                for _ in range(200):
                    try:
                        await stream.send_all(b" ")
                    except trio.BrokenResourceError:
                        break
                    with trio.move_on_after(0.1):
                        if not (data := await stream.receive_some(65536)):
                            break
                        reply += data
                while data := await stream.receive_some(65536):
                    reply += data
        assert status_of(reply) == 408, reply
        async with http(d) as c:
            assert (await c.get("/v1/status")).status_code == 200


async def test_connections_over_the_cap_displace_idle_ones_or_get_503(tmp_path: Path) -> None:
    """With control.max_connections = 3: three idle connections do not lock a real client out
    (the longest-idle is closed for it); three busy ones (event streams) make a newcomer a 503
    that names the limit."""
    cluster = one_node_cluster(tmp_path / "c.json", control={"max_connections": 3})
    async with daemon({"TENSORD_NODE_ID": "n1"}, "--cluster", str(cluster)) as d:
        await ready(d)
        idle = [await trio.open_unix_socket(str(d.socket)) for _ in range(3)]
        try:
            async with http(d) as c:
                assert (await c.get("/v1/status")).status_code == 200
            with trio.fail_after(10):  # the first idle connection was closed for the newcomer
                assert await idle[0].receive_some(1) == b""
        finally:
            for s in idle:
                await s.aclose()

        subscribed = 0
        changed = trio.Event()

        async def listen() -> None:
            nonlocal subscribed
            async with http(d) as c, c.stream("GET", "/v1/events") as r:
                async for line in r.aiter_lines():
                    if line == ": subscribed":
                        subscribed += 1
                        changed.set()

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(listen)
            with trio.fail_after(20):
                while subscribed < 3:
                    await changed.wait()
                    changed = trio.Event()
            head = b"GET /v1/status HTTP/1.1\r\nhost: t\r\n\r\n"
            with trio.fail_after(20):
                refused = await raw_request(d.socket, head)
            assert status_of(refused) == 503, refused
            err = error_of(refused)
            assert err["code"] == "busy" and "all 3 connections are busy" in err["message"]
            nursery.cancel_scope.cancel()


# -- in-process: status on the loop, names, fields, the error boundary -----------------------


@asynccontextmanager
async def in_process(tmp_path: Path) -> AsyncIterator[tuple[InProcessDaemon, httpx.AsyncClient]]:
    """A Daemon object with its node and control socket running in this test's loop."""
    env = {
        "TENSORD_STATE_DIR": str(tmp_path / "state"),
        "TENSORD_CONTROL_SOCKET": str(tmp_path / "control.sock"),
        "TENSORD_LISTEN": "127.0.0.1:0",
        "TENSORD_NODE_ID": "n1",
    }
    d = InProcessDaemon(load_settings(env), env)
    async with trio.open_nursery() as nursery:
        d._nursery = nursery
        await d.node.start(nursery)
        path = await d._start_control(nursery)
        client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(path)),
            base_url="http://tensord",
            timeout=httpx.Timeout(60, connect=5),
        )
        async with client:
            yield d, client
        nursery.cancel_scope.cancel()


async def test_status_is_built_on_the_event_loop_while_tables_churn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with in_process(tmp_path) as (d, c):
        threads: set[str] = set()
        peer_list, in_flight = control_status.peer_list, d.transfers.in_flight

        def watched_peers(services: Any) -> list[dict[str, Any]]:
            threads.add(threading.current_thread().name)
            return peer_list(services)

        def watched_transfers() -> list[dict[str, Any]]:
            threads.add(threading.current_thread().name)
            return in_flight()

        monkeypatch.setattr(control_status, "peer_list", watched_peers)
        d.transfers.in_flight = watched_transfers  # type: ignore[method-assign]
        entry = NodeEntry("p", HostPort("127.0.0.1", 9))
        stop = trio.Event()

        async def churn() -> None:  # what peer supervisors and reloads do to the table
            i = 0
            while not stop.is_set():
                d.peers[f"p{i % 50}"] = PeerHealth(entry)
                d.peers.pop(f"p{(i + 25) % 50}", None)
                i += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(churn)
            statuses = [(await c.get("/v1/status")).status_code for _ in range(100)]
            stop.set()
        assert statuses == [200] * 100
        assert threads == {threading.current_thread().name}, threads


async def test_bad_names_and_unknown_fields_are_400_with_a_clear_message(tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", np.zeros(3))
    path = str(tmp_path / "w.npy")
    async with in_process(tmp_path) as (_, c):
        for bad in ["layers//0", "a/../b", "x\x00y", "n" * 4096, "/abs", "."]:
            url = "/v1/tensors/" + quote(bad, safe="").replace(".", "%2E")
            for method, kw in [("GET", {}), ("DELETE", {}), ("PUT", {"json": {"path": path}})]:
                r = await c.request(method, url, **kw)
                assert r.status_code == 400, (bad, method, r.text)
                err = r.json()["error"]
                assert err["code"] == "bad_name" and err["message"].startswith("bad name"), err
            for body in [
                {"peer": "p", "name": bad},
                {"peer": "p", "name": "ok", "as": bad},
            ]:
                r = await c.post("/v1/pull", json=body)
                assert r.status_code == 400 and r.json()["error"]["code"] == "bad_name", r.text
            r = await c.post("/v1/send", json={"peer": "p", "name": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_name", r.text
        for url, body in [
            ("/v1/pull", {"peer": "p", "name": "x", "bogus": 1}),
            ("/v1/send", {"peer": "p", "name": "x", "path ": path}),
            ("/v1/downloads", {"url": "http://127.0.0.1:9/x", "sha": "0"}),
        ]:
            r = await c.post(url, json=body)
            assert r.status_code == 400, r.text
            assert "unknown field" in r.json()["error"]["message"], r.text
        r = await c.put("/v1/tensors/x", json={"path": path, "as": "y"})
        assert r.status_code == 400 and "unknown field 'as'" in r.json()["error"]["message"]
        for body in [{"peer": 5, "name": "x"}, {"peer": "p", "name": ["x"]}, {"peer": None}]:
            r = await c.post("/v1/pull", json=body)
            assert r.status_code == 400 and r.json()["error"]["message"], r.text
        r = await c.post("/v1/pull", content=b"[" * 200_000 + b"]" * 200_000)
        assert r.status_code == 400 and "nested too deep" in r.text, r.text
        assert (await c.get("/v1/tensors")).json() == {"tensors": []}


async def test_a_bug_in_a_handler_is_a_counted_500_and_the_daemon_carries_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with in_process(tmp_path) as (_, c):

        def broken(services: Any) -> list[dict[str, Any]]:
            raise RuntimeError("simulated bug")

        def errors() -> float:
            for line in metrics_text.splitlines():
                if line.startswith('tensord_unexpected_errors_total{boundary="control"}'):
                    return float(line.split()[-1])
            return 0.0

        metrics_text = (await c.get("/metrics")).text
        before = errors()
        monkeypatch.setattr(control_status, "peer_list", broken)
        r = await c.get("/v1/peers")
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["code"] == "internal" and "RuntimeError" in err["message"]
        assert "see the daemon's log" in err["message"]
        metrics_text = (await c.get("/metrics")).text
        assert errors() == before + 1
        assert (await c.get("/v1/tensors")).status_code == 200
