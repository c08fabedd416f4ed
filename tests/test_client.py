"""``tensord.Client`` / ``AsyncClient`` against real ``tensord serve`` subprocesses: every method,
typed errors, percent-encoded names, the events stream; and the SSE parser on byte strings."""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from tensord import AsyncClient, Client, ConfigError, PeerUnreachable, TensorNotFound
from tensord.control.client import (
    ControlError,
    DaemonNotRunning,
    connect_error,
    error_from_reply,
    resolve_socket,
    tensor_path,
)
from tensord.control.sse import SSEComment, SSEMessage, SSEParser, event_dict
from tensord.errors import BadAddress, StoreFull, TransferFailed

from .support.client_cluster import B_STORE_CAP, Cluster, running_cluster
from .support.cluster import write_cluster_file
from .support.tensor_files import save, unique, write_safetensors
from .support.unix_http import serving


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from running_cluster(tmp_path_factory)


# --------------------------------------------------------------------------------------------
# The SSE parser, on byte strings


STREAM = (
    b": subscribed\n\n"
    b'event: transfer\ndata: {"kind": "transfer", "state": "progress"}\n\n'
    b": keep-alive\n\n"
    b'event: peer\ndata: {"peer": "c",\ndata:  "state": "down"}\n\n'
)
EXPECTED = [
    SSEComment("subscribed"),
    SSEMessage("transfer", '{"kind": "transfer", "state": "progress"}'),
    SSEComment("keep-alive"),
    SSEMessage("peer", '{"peer": "c",\n "state": "down"}'),
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
def test_sse_parser_gives_the_same_items_however_the_bytes_are_split(size: int) -> None:
    parser = SSEParser()
    got: list[SSEMessage | SSEComment] = []
    for i in range(0, len(STREAM), size):
        got += parser.feed(STREAM[i : i + size])
    assert got == EXPECTED


@pytest.mark.parametrize("eol", [b"\r\n", b"\r", b"\n"])
def test_sse_parser_accepts_every_line_ending_even_split_between_chunks(eol: bytes) -> None:
    stream = STREAM.replace(b"\n", eol)
    for cut in range(len(stream)):  # a CR LF split across two chunks is one line end, not two
        parser = SSEParser()
        assert parser.feed(stream[:cut]) + parser.feed(stream[cut:]) == EXPECTED, cut


def test_sse_parser_follows_the_field_rules() -> None:
    parser = SSEParser()
    items = parser.feed(
        b"\xef\xbb\xbfdata:no space\n\n"  # a BOM is dropped; the space after ':' is optional
        b"event: lonely\n\n"  # no data: nothing is dispatched, and the type is reset
        b"data\n\n"  # a field name alone: empty data, still a message
        b"id: 7\nretry: 10\nfoo: bar\ndata: x\n\n"  # retry and unknown fields are ignored
        b"data: incomplete"  # no blank line yet: nothing
    )
    assert items == [
        SSEMessage("message", "no space"),
        SSEMessage("message", ""),
        SSEMessage("message", "x", id="7"),
    ]
    assert parser.feed(b"\n\n") == [SSEMessage("message", "incomplete", id="7")]


def test_event_dict_takes_kind_from_the_event_type_and_rejects_non_json() -> None:
    assert event_dict(SSEMessage("peer", '{"peer": "c"}')) == {"peer": "c", "kind": "peer"}
    assert event_dict(SSEMessage("x", '{"kind": "arrival"}'))["kind"] == "arrival"
    with pytest.raises(ControlError, match="not JSON"):
        event_dict(SSEMessage("peer", "{oops"))


# --------------------------------------------------------------------------------------------
# Pure helpers: names in paths, error mapping, finding the socket


def test_tensor_names_are_one_percent_encoded_segment() -> None:
    assert tensor_path("layers/0/wq") == "/v1/tensors/layers%2F0%2Fwq"
    assert tensor_path("a:b@c+d=e", "data") == "/v1/tensors/a%3Ab%40c%2Bd%3De/data"
    # httpx would normalise a literal ".." away; encoded, the daemon gets to refuse it itself.
    request = httpx.Request("GET", "http://tensord" + tensor_path(".."))
    assert request.url.raw_path == b"/v1/tensors/%2E%2E"


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("not_found", 404, TensorNotFound),
        ("unknown_peer", 404, BadAddress),
        ("peer_unreachable", 502, PeerUnreachable),
        ("transfer_failed", 502, TransferFailed),
        ("quota", 507, StoreFull),
        ("config", 400, ConfigError),
        ("bad_request", 400, ControlError),
        ("node_closed", 503, ControlError),
        ("forbidden", 403, ControlError),
    ],
)
def test_error_replies_become_typed_errors(code: str, status: int, kind: type) -> None:
    body = json.dumps({"error": {"code": code, "message": f"why {code}"}}).encode()
    exc = error_from_reply(status, body)
    assert type(exc) is kind and str(exc) == f"why {code}"
    if isinstance(exc, ControlError):
        assert (exc.code, exc.status) == (code, status)
    if isinstance(exc, TransferFailed):
        assert exc.code == "transfer_failed"


def test_an_error_reply_that_is_not_ours_keeps_its_status() -> None:
    exc = error_from_reply(502, b"<html>Bad Gateway</html>\n")
    assert isinstance(exc, ControlError) and exc.status == 502 and exc.code == "http"
    assert "HTTP 502" in str(exc) and "Bad Gateway" in str(exc)


def _wrapped(err: int) -> Exception:
    """An OSError as httpx raises it: under httpcore's and httpx's own ConnectErrors."""
    try:
        try:
            raise OSError(err, os.strerror(err))
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from exc
    except httpx.ConnectError as exc:
        return exc


def test_connect_errors_say_what_is_wrong_and_what_to_do(tmp_path: Path) -> None:
    sock = tmp_path / "c.sock"
    for err in (errno.ENOENT, errno.ECONNREFUSED):
        exc = connect_error(sock, _wrapped(err))
        assert isinstance(exc, DaemonNotRunning) and str(sock) in str(exc)
        assert "tensord serve" in str(exc) and "systemctl start tensord" in str(exc)
    denied = connect_error(sock, _wrapped(errno.EACCES))
    assert not isinstance(denied, DaemonNotRunning) and denied.code == "forbidden"
    assert "permission denied" in str(denied) and "group" in str(denied)


def test_the_socket_is_found_as_the_daemon_finds_it(tmp_path: Path) -> None:
    assert resolve_socket("/x/explicit.sock", {"TENSORD_CONTROL_SOCKET": "/y"}) == Path(
        "/x/explicit.sock"
    )
    assert resolve_socket(None, {"TENSORD_CONTROL_SOCKET": "/env/c.sock"}) == Path("/env/c.sock")
    cluster = write_cluster_file(tmp_path / "cluster.json", control={"socket": "/file/c.sock"})
    env = {"TENSORD_CLUSTER_FILE": str(cluster), "XDG_RUNTIME_DIR": "/xdg"}
    assert resolve_socket(None, env) == Path("/file/c.sock")
    # A cluster file that does not name this node is fine for a client...
    write_cluster_file(cluster, {"n": "10.0.0.1:1"}, control={"socket": "/file/c.sock"})
    assert resolve_socket(None, env) == Path("/file/c.sock")
    # ...and a broken one falls back to the defaults rather than failing.
    cluster.write_text("{broken")
    assert resolve_socket(None, env) == Path("/xdg/tensord/control.sock")


async def test_no_daemon_raises_daemon_not_running(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a socket file nobody listens on: ECONNREFUSED
    for path in (tmp_path / "absent.sock", tmp_path / "no-dir" / "c.sock", stale):
        with pytest.raises(DaemonNotRunning, match="tensord is not running") as sync_exc:
            Client(path).status()
        assert str(path) in str(sync_exc.value)
        async with AsyncClient(path) as c:
            with pytest.raises(DaemonNotRunning, match="`tensord serve`"):
                await c.tensors()
            with pytest.raises(DaemonNotRunning):
                await c.events().open()
    with Client(tmp_path / "absent.sock") as c, pytest.raises(DaemonNotRunning):
        c.events().open()


# --------------------------------------------------------------------------------------------
# Against the daemons


async def test_status_and_peers_show_the_cluster(cluster: Cluster) -> None:
    async with cluster.a.async_client() as a:
        status = await a.status()
        assert status["node_id"] == "a" and status["cluster"] == "client-test"
        assert status["listen"].startswith("tensord://a@127.0.0.1:")
        assert status["store"]["root"] == str(cluster.a.home / "state")

        async def b_up() -> bool:
            return any(p["id"] == "b" and p["state"] == "up" for p in await a.peers())

        async with a.subscribe() as events:
            with trio.fail_after(30):
                if not await b_up():
                    async for ev in events:
                        if ev["kind"] == "peer" and ev["peer"] == "b" and await b_up():
                            break
        peers = {p["id"]: p for p in await a.peers()}
        assert sorted(peers) == ["b", "c"]
        assert peers["b"]["rtt_ms"] > 0 and peers["b"]["addr"].startswith("127.0.0.1:")
        assert peers["c"]["state"] != "up"
    with cluster.b.client() as b:
        assert [p["id"] for p in b.status()["peers"]] == ["a", "c"]


def test_tensor_round_trip_with_slashes_in_the_name(cluster: Cluster) -> None:
    name = f"layers/0/{unique('wq')}:x@y+z=w"
    array = np.random.default_rng(0).standard_normal((64, 33)).astype(np.float32)
    src = save(cluster.work / f"{uuid.uuid4().hex}.npy", array)
    with cluster.a.client() as c:
        info = c.put(name, src)
        assert info["name"] == name and info["shape"] == [64, 33] and info["sender"] == ""
        assert c.tensor(name) == info
        assert name in [t["name"] for t in c.tensors()]
        assert np.array_equal(c.load(name), array)
        out = cluster.work / "out" / "w.npy"
        out.parent.mkdir(exist_ok=True)
        got = c.get(name, out)
        assert got["path"] == str(out) and got["file_bytes"] == out.stat().st_size
        assert np.array_equal(np.load(out), array)
        c.delete(name)
        with pytest.raises(TensorNotFound, match="no tensor named"):
            c.tensor(name)
        with pytest.raises(TensorNotFound):
            c.delete(name)


def test_get_replaces_the_file_atomically(cluster: Cluster) -> None:
    name = unique("atomic")
    where = cluster.work / unique("dl")
    where.mkdir()
    target = where / "t.npy"
    target.write_bytes(b"old contents")
    with cluster.a.client() as c:
        with pytest.raises(TensorNotFound):
            c.get(name, target)
        assert target.read_bytes() == b"old contents"
        c.put(name, save(where / "src.npy", np.arange(1000, dtype=np.int32)))
        c.get(name, target)
    assert np.array_equal(np.load(target), np.arange(1000, dtype=np.int32))
    assert sorted(p.name for p in where.iterdir()) == ["src.npy", "t.npy"]  # no temp left over
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes it, not 0600


async def test_async_client_round_trip_under_trio(cluster: Cluster) -> None:
    name = f"async/{unique('t')}"
    array = np.arange(3 * 1000, dtype=np.float64).reshape(3, -1)
    src = save(cluster.work / f"{uuid.uuid4().hex}.npy", array)
    async with cluster.a.async_client() as c:
        info = await c.put(name, src)
        assert info["dtype"] == "<f8" and await c.tensor(name) == info
        assert name in [t["name"] for t in await c.tensors()]
        assert np.array_equal(await c.load(name), array)
        out = cluster.work / f"{uuid.uuid4().hex}.npy"
        await c.get(name, out)
        assert np.array_equal(np.load(out), array)
        up = f"{name}-streamed"
        assert (await c.upload(up, src))["shape"] == [3, 1000]
        assert np.array_equal(await c.load(up), array)
        await c.delete(name)
        await c.delete(up)
        with pytest.raises(TensorNotFound):
            await c.load(name)
        with pytest.raises(TensorNotFound):
            await c.get(name, out)
        assert np.array_equal(np.load(out), array)  # a failed get leaves the file alone


async def test_download_is_a_deprecated_alias_of_get(cluster: Cluster) -> None:
    """``download(name, path)`` was the old name of ``get``: it still works, and says so."""
    name = unique("alias")
    array = np.arange(10, dtype=np.int16)
    with cluster.a.client() as c:
        c.put(name, save(cluster.work / f"{name}.npy", array))
        out = cluster.work / f"{name}-sync.npy"
        with pytest.warns(DeprecationWarning, match=r"Client\.get\(name, path\)"):
            assert c.download(name, out)["path"] == str(out)
        assert np.array_equal(np.load(out), array)
    async with cluster.a.async_client() as ac:
        out = cluster.work / f"{name}-async.npy"
        with pytest.warns(DeprecationWarning, match="tensord get"):
            info = await ac.download(name, out)
        assert info["file_bytes"] == out.stat().st_size
        assert np.array_equal(np.load(out), array)
        await ac.delete(name)


def test_upload_streams_the_file_to_the_daemon(cluster: Cluster) -> None:
    name = unique("streamed")
    array = np.arange(300_000, dtype=np.int32)
    with cluster.a.client() as c:
        assert c.upload(name, save(cluster.work / f"{name}.npy", array))["nbytes"] == 1_200_000
        assert np.array_equal(c.load(name), array)
        c.delete(name)


def test_send_stored_tensors_and_files_then_pull_back(cluster: Cluster) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((128, 128)).astype(np.float32)
    stored, sent_file, prefix = unique("stored"), unique("file"), unique("st")
    with cluster.a.client() as a, cluster.b.client() as b:
        a.put(stored, save(cluster.work / f"{stored}.npy", w))
        (r,) = a.send("b", name=stored)
        assert r["name"] == stored and r["peer"] == "b" and r["nbytes"] == w.nbytes
        assert r["retries"] == 0 and r["seconds"] > 0 and r["rate"] > 0
        assert b.tensor(stored)["sender"] == "a"
        assert np.array_equal(b.load(stored), w)

        (r,) = a.send("b", path=save(cluster.work / "x.npy", w[:2]), name=sent_file)
        assert r["name"] == sent_file and np.array_equal(b.load(sent_file), w[:2])

        parts = {"k": np.arange(10, dtype=np.int32), "v": np.ones((2, 3), np.float32)}
        st = write_safetensors(cluster.work / f"{prefix}.safetensors", parts)
        results = a.send("b", path=st, name=prefix)
        assert sorted(r["name"] for r in results) == [f"{prefix}/k", f"{prefix}/v"]
        for key, array in parts.items():
            assert np.array_equal(b.load(f"{prefix}/{key}"), array)

        reply = a.pull("b", sent_file, as_name=f"{sent_file}-back")
        assert reply["tensor"]["name"] == f"{sent_file}-back"
        assert reply["transfer"]["nbytes"] == w[:2].nbytes and reply["transfer"]["peer"] == "b"
        assert np.array_equal(a.load(f"{sent_file}-back"), w[:2])
        assert a.pull("b", stored)["tensor"]["name"] == stored  # over a's own copy

        transfers = a.transfers()
        assert {"send", "receive"} <= {t["direction"] for t in transfers}
        assert all(t["state"] == "done" for t in transfers if t["name"] == stored)
        for n in (stored, sent_file, f"{prefix}/k", f"{prefix}/v"):
            b.delete(n)


async def test_subscribe_then_send_sees_the_whole_transfer(cluster: Cluster) -> None:
    name = unique("watched")
    array = np.random.default_rng(2).integers(0, 255, size=4 << 20, dtype=np.uint8)
    src = save(cluster.work / f"{name}.npy", array)
    results: list[list[dict[str, Any]]] = []
    async with cluster.a.async_client() as a:
        await a.put(name, src)
        async with a.subscribe() as events:
            assert events.subscribed
            seen: list[dict[str, Any]] = []
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:

                    async def send() -> None:
                        results.append(await a.send("b", name=name))

                    nursery.start_soon(send)
                    async for ev in events:
                        if ev["kind"] == "transfer" and ev["name"] == name:
                            seen.append(ev)
                            if ev["state"] in ("done", "failed"):
                                break
    (result,) = results[0]
    states = [e["state"] for e in seen]
    assert states[0] == "started" and states[-1] == "done", states  # subscribed before the post
    assert {e["id"] for e in seen} == {result["id"]}
    assert all(e["direction"] == "send" and e["peer"] == "b" for e in seen)
    done = [e["bytes_done"] for e in seen if e["state"] == "progress"]
    assert done and done == sorted(done)
    assert seen[-1]["bytes_done"] == seen[-1]["bytes_total"] == array.nbytes
    with cluster.b.client() as b:
        b.delete(name)


def test_blocking_events_iterator_sees_the_arrival(cluster: Cluster) -> None:
    name = unique("arrival")
    with cluster.a.client() as a, cluster.b.client() as b:
        a.put(name, save(cluster.work / f"{name}.npy", np.zeros(1000, np.float32)))
        with b.events() as events:
            a.send("b", name=name)  # the stream buffers what happens meanwhile
            arrival = next(e for e in events if e["kind"] == "arrival")
        assert arrival["name"] == name and arrival["sender"] == "a"
        assert arrival["nbytes"] == 4000
        b.delete(name)


def _until_blocked_reading_a_unix_socket(thread: threading.Thread, deadline: float = 10) -> None:
    """Until ``thread`` waits in the kernel for a Unix socket's data (Linux: its wchan)."""
    wchan = Path(f"/proc/self/task/{thread.native_id}/wchan")
    give_up = time.monotonic() + deadline
    while wchan.read_text() != "unix_stream_read_generic":
        assert time.monotonic() < give_up, wchan.read_text()
        time.sleep(0.001)  # polling interval, not synchronisation


def test_stop_ends_a_blocked_events_iterator_from_another_thread(tmp_path: Path) -> None:
    """What the CLI does when its request has been answered: the thread reading the events,
    blocked on a quiet stream, sees it end (not an error), and the daemon sees the client go."""
    path = tmp_path / "quiet.sock"
    outcome: list[object] = []
    hung_up = threading.Event()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def serve() -> None:  # subscribed, then nothing, until the client hangs up
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)  # the request's head
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n10\r\n: subscribed\n\n\n\r\n"
                )
                conn.settimeout(5)  # then hang up: a test that fails must not hang
                with contextlib.suppress(TimeoutError):
                    while conn.recv(65536):
                        pass
                    hung_up.set()

        server = threading.Thread(target=serve)
        server.start()
        with Client(path) as c, c.events() as events:

            def read() -> None:
                try:
                    outcome.append(list(events))
                except BaseException as exc:
                    outcome.append(exc)

            reader = threading.Thread(target=read)
            reader.start()
            _until_blocked_reading_a_unix_socket(reader)
            events.stop()
            reader.join(10)
            assert hung_up.wait(10)  # before the stream is closed: stop() alone did it
        server.join(10)
    assert outcome == [[]]


def test_errors_from_the_daemon_are_typed(cluster: Cluster) -> None:
    with cluster.a.client() as a:
        absent = unique("absent")
        for call in (a.tensor, a.load, a.delete):
            with pytest.raises(TensorNotFound, match=absent):
                call(absent)
        with pytest.raises(TensorNotFound):
            a.send("b", name=absent)
        with pytest.raises(BadAddress, match="unknown peer 'zz'"):
            a.send("zz", path=save(cluster.work / "e.npy", np.zeros(3)))
        with pytest.raises(TensorNotFound):
            a.pull("b", absent)
        with pytest.raises(ControlError) as bad:
            a.put("x", cluster.work / "no-such-file.npy")
        assert (bad.value.code, bad.value.status) == ("bad_request", 400)
        assert "no such file" in str(bad.value)
        with pytest.raises(ValueError, match="name or a file"):
            a.send("b")
        name = unique("to-c")
        a.put(name, save(cluster.work / f"{name}.npy", np.zeros(10)))
        with pytest.raises(PeerUnreachable):
            a.send("c", name=name)  # in the cluster, but nothing listens
        a.delete(name)


def test_a_full_store_raises_store_full(cluster: Cluster) -> None:
    big = save(cluster.work / "big.npy", np.zeros(B_STORE_CAP + 1, np.uint8))
    with cluster.b.client() as b:
        before = b.tensors()
        with pytest.raises(StoreFull):
            b.put(unique("big"), big)
        assert b.tensors() == before


def test_reload_of_a_broken_cluster_file_raises_config_error(cluster: Cluster) -> None:
    good = cluster.file.read_text()
    with cluster.a.client() as a:
        try:
            cluster.file.write_text("{not json")
            with pytest.raises(ConfigError, match=str(cluster.file)):
                a.reload()
        finally:
            cluster.file.write_text(good)
        assert a.reload() == {"reloaded": True, "peers": 2}


# --------------------------------------------------------------------------------------------
# One request per endpoint, whichever client sends it (no daemon: a recording HTTP server)


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Records each request (method, raw path, body) and answers one JSON reply to all."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, bytes]]

    def _answer(self) -> None:
        if self.headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self.rfile.readline(), 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.seen.append((self.command, self.path, body))
        reply = json.dumps({"peers": [], "transfers": [{"name": "w"}], "name": "w"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _recording_server(path: Path) -> Iterator[list[tuple[str, str, bytes]]]:
    seen: list[tuple[str, str, bytes]] = []
    handler = type("Handler", (_Recorder,), {"seen": seen, "address_string": lambda _: "local"})
    with serving(path, handler):
        yield seen


async def test_both_clients_send_the_same_request_for_each_endpoint(tmp_path: Path) -> None:
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("status", (), {}),
        ("peers", (), {}),
        ("tensor", ("a/b",), {}),
        ("put", ("w", tmp_path / "w.npy"), {}),
        ("delete", ("w",), {}),
        ("send", ("b",), {"name": "w"}),
        ("send", ("b",), {"path": tmp_path / "x.safetensors", "name": "p"}),
        ("pull", ("b", "w"), {"as_name": "v"}),
        ("reload", (), {}),
        ("pull_model", ("llama3:8b",), {}),
        ("download_url", ("http://x/y", "ab" * 32), {}),
        ("download_job", ("j/1",), {}),
        ("cancel_download", ("j1",), {}),
    ]
    (tmp_path / "u.npy").write_bytes(b"\x93NUMPY" + bytes(range(256)) * 5000)  # > UPLOAD_CHUNK
    calls.append(("upload", ("u", tmp_path / "u.npy"), {}))
    sock = tmp_path / "rec.sock"
    with _recording_server(sock) as seen, Client(sock) as c:
        sync_results = [getattr(c, m)(*a, **k) for m, a, k in calls]
        sync_seen = seen[:]
        seen.clear()
        async with AsyncClient(sock) as ac:
            async_results = [await getattr(ac, m)(*a, **k) for m, a, k in calls]
        async_seen = seen[:]
    assert sync_seen == async_seen and sync_results == async_results
    assert sync_seen[-1] == ("PUT", "/v1/tensors/u", (tmp_path / "u.npy").read_bytes())
    assert sync_seen[2][:2] == ("GET", "/v1/tensors/a%2Fb")
    assert json.loads(sync_seen[7][2]) == {"peer": "b", "name": "w", "as": "v"}  # "as" in JSON
    assert sync_results[1] == [] and sync_results[4] is None  # peers, delete
    assert sync_results[5] == [{"name": "w"}]  # send: the reply's transfers
    with pytest.raises(ValueError, match="name or a file"):
        c.send("b")
    coro = ac.send("b")  # an async call's bad arguments raise when it is awaited
    with pytest.raises(ValueError, match="name or a file"):
        await coro


class _Refuser(socketserver.StreamRequestHandler):
    """Answers an upload with an error as soon as its head has come, and hangs up without
    reading the body (as a daemon may for a body too large to store)."""

    def handle(self) -> None:
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        reply = json.dumps({"error": {"code": "too_large", "message": "no room"}}).encode()
        head = f"HTTP/1.1 413 Payload Too Large\r\ncontent-length: {len(reply)}\r\n"
        self.wfile.write(head.encode() + b"connection: close\r\n\r\n" + reply)


async def test_an_answer_before_the_whole_upload_is_the_error_raised(tmp_path: Path) -> None:
    big = tmp_path / "big.npy"
    big.write_bytes(bytes(32 << 20))  # far more than the socket buffers hold
    sock = tmp_path / "refuser.sock"
    with serving(sock, _Refuser):
        with pytest.raises(ControlError, match="no room") as sync_exc:
            Client(sock).upload("w", big)
        async with AsyncClient(sock) as ac:
            with pytest.raises(ControlError, match="no room") as async_exc:
                await ac.upload("w", big)
    assert sync_exc.value.code == async_exc.value.code == "too_large"
    assert sync_exc.value.status == async_exc.value.status == 413


def test_the_client_does_not_import_the_daemons_modules() -> None:
    """A CLI command starts fast: the client needs neither the store nor numpy to talk."""
    code = (
        "import sys, tensord.control.client; "
        "print(sorted({'tensord.store', 'tensord.node', 'numpy'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
