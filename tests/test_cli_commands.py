"""The client commands of ``tensord`` (status, ls, send, pull, watch, ...) as real subprocesses
against real daemons: human and ``--json`` output, summary lines, exit statuses."""

from __future__ import annotations

import io
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from rich.console import Console

from tensord import transfers
from tensord.cli.commands import _unseen_file
from tensord.cli.progress import FINAL_STATES, Bars
from tensord.cli.render import human_bytes, human_rate, table
from tensord.errors import ControlError

from .support.cli import ok, start, tensord
from .support.client_cluster import Cluster, running_cluster
from .support.tensor_files import save, unique, write_safetensors


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from running_cluster(tmp_path_factory)


SUMMARY = r"\d+\.\d (B|KiB|MiB) in \d+\.\d\d s \(\d+(\.\d+)? MB/s\)"


def test_formatting_helpers() -> None:
    assert human_bytes(256 << 20) == "256.0 MiB" and human_bytes(1023) == "1023 B"
    assert human_bytes(3 << 40) == "3.0 TiB"
    assert human_rate(516e6) == "516 MB/s" and human_rate(1.5e6) == "1.5 MB/s"
    assert table(["A", "NUM"], [["long-name", "1"], ["x", "200"]], right="NUM") == (
        "A          NUM\nlong-name    1\nx          200"
    )


def test_status_peers_ls_transfers_print_tables_and_json(cluster: Cluster) -> None:
    sock = str(cluster.a.socket)
    name = f"cli/{unique('ls')}"
    with cluster.a.client() as c, c.events() as events:
        c.put(name, save(cluster.work / f"{unique('f')}.npy", np.zeros((256, 1024), np.float32)))
        c.send("b", name=name)  # something for `transfers`
        # a's supervisor may have pinged b before b listened; the send's connection ends its
        # backoff, so b turns "up" now rather than seconds later: wait for that, not a time.
        if not any(p["id"] == "b" and p["state"] == "up" for p in c.peers()):
            b_up = ("peer", "b", "up")
            next(e for e in events if (e["kind"], e.get("peer"), e.get("state")) == b_up)

        status = json.loads(ok("--socket", sock, "status", "--json"))
        assert status["node_id"] == "a" and status["store"]["tensors"] >= 1
        human = ok("status", "--socket", sock)  # --socket after the command works too
        assert re.search(r"^node +a +tensord://a@127\.0\.0\.1:\d+$", human, re.M), human
        assert re.search(r"^peers +\d of 2 up$", human, re.M) and "PEER" in human

        peers = json.loads(ok("--socket", sock, "peers", "--json"))
        assert [p["id"] for p in peers] == ["b", "c"]
        lines = ok("--socket", sock, "peers").splitlines()
        assert lines[0].split()[:4] == ["PEER", "ADDR", "STATE", "RTT"]
        b_line = next(line for line in lines if line.startswith("b "))
        assert re.search(r" up +\d+\.\d\d ms ", b_line), b_line

        listed = json.loads(ok("--socket", sock, "ls", "--json"))
        assert listed == c.tensors()
        row = next(line for line in ok("--socket", sock, "ls").splitlines() if name in line)
        assert row.split()[:4] == [name, "<f4", "256x1024", "1.0"] and "MiB" in row

        transfers = json.loads(ok("--socket", sock, "transfers", "--json"))
        mine = [t for t in transfers if t["name"] == name]
        assert [t["direction"] for t in mine] == ["send"] and mine[0]["state"] == "done"
        text = ok("--socket", sock, "transfers")
        assert re.search(rf"send +{re.escape(name)} +b +done +1\.0 MiB / 1\.0 MiB \(100%\)", text)
        c.delete(name)
    with cluster.b.client() as b:
        b.delete(name)


def test_send_prints_one_summary_line_per_tensor(cluster: Cluster) -> None:
    sock = str(cluster.a.socket)
    name = unique("sent")
    src = save(cluster.work / f"{unique('s')}.npy", np.ones((512, 512), np.float32))
    out = tensord("--socket", sock, "send", str(src), "--to", "b", "--name", name)
    assert out.code == 0, out
    assert re.fullmatch(
        rf"sent {name} to b: 1\.0 MiB in \d+\.\d\d s \(.* MB/s\), 0 retries\n", out.out
    )
    assert out.err == ""  # no bars when stderr is not a terminal

    prefix = unique("st")
    st = write_safetensors(
        cluster.work / f"{prefix}.safetensors", {"k": np.arange(4, dtype=np.int32)}
    )
    lines = ok("--socket", sock, "send", str(st), "--to", "b", "--name", prefix).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sent {prefix}/k to b: 16 B in ")
    # --json: the transfer results, for programs.
    (result,) = json.loads(ok("--socket", sock, "send", str(src), "--to", "b", "--json"))
    assert (result["name"], result["nbytes"], result["retries"]) == (src.stem, 1 << 20, 0)
    with cluster.b.client() as b:
        assert b.tensor(name)["sender"] == "a"
        b.delete(name)
        b.delete(f"{prefix}/k")
        b.delete(src.stem)


def test_pull_get_rm(cluster: Cluster) -> None:
    name = unique("remote")
    array = np.arange(1 << 18, dtype=np.int32)
    with cluster.b.client() as b:
        b.put(name, save(cluster.work / f"{name}.npy", array))
    sock = str(cluster.a.socket)
    out_file = cluster.work / f"{unique('pulled')}.npy"
    local = unique("local")
    text = ok("--socket", sock, "pull", "b", name, "--as", local, "-o", str(out_file))
    first, second = text.splitlines()
    assert re.fullmatch(rf"pulled {name} as {local} from b: {SUMMARY}, 0 retries", first), first
    assert second == f"wrote {local} to {out_file} (1.0 MiB)"
    assert np.array_equal(np.load(out_file), array)

    got = cluster.work / f"{unique('got')}.npy"
    assert ok("--socket", sock, "get", local, "-o", str(got)).startswith(f"wrote {local} to ")
    assert np.array_equal(np.load(got), array)
    nowhere = cluster.work / "no-such-dir" / "x.npy"
    out = tensord("--socket", sock, "get", local, "-o", str(nowhere))
    assert out.code == 1 and out.err == (
        f"tensord: [Errno 2] No such file or directory: '{nowhere}'\n"
    )
    assert ok("--socket", sock, "rm", local) == f"deleted {local}\n"
    with cluster.a.client() as a:
        assert local not in [t["name"] for t in a.tensors()]
    with cluster.b.client() as b:
        b.delete(name)


def test_errors_are_one_line_with_an_exit_status(cluster: Cluster, tmp_path: Path) -> None:
    sock = str(cluster.a.socket)
    out = tensord("--socket", sock, "get", "no-such-tensor", "-o", str(tmp_path / "x.npy"))
    assert out.code == 1 and out.out == ""
    assert re.fullmatch(r"tensord: no tensor named 'no-such-tensor'.*\n", out.err)
    assert not (tmp_path / "x.npy").exists()
    out = tensord("--socket", sock, "send", str(tmp_path / "x.npy"), "--to", "b")
    assert out.code == 1 and out.err == f"tensord: {tmp_path / 'x.npy'}: no such file\n"
    src = save(tmp_path / "y.npy", np.zeros(4))
    out = tensord("--socket", sock, "send", str(src), "--to", "zz")
    assert out.code == 1 and "unknown peer 'zz'" in out.err

    absent = tmp_path / "absent.sock"
    for args in (["--socket", str(absent), "status"], ["ls", "--json"]):
        out = tensord(*args, env={"TENSORD_CONTROL_SOCKET": str(absent)})
        assert out.code == 69, out  # EX_UNAVAILABLE
        assert out.out == "" and len(out.err.splitlines()) == 1
        assert str(absent) in out.err and "start it with `tensord serve`" in out.err


def test_reload(cluster: Cluster) -> None:
    assert ok("--socket", str(cluster.a.socket), "reload") == (
        "reloaded the configuration: 2 peers\n"
    )


async def _read_until(stream: trio.abc.ReceiveStream, seen: bytearray, *needles: str) -> None:
    """Read into ``seen`` until every one of ``needles`` is in it."""
    while not all(n.encode() in seen for n in needles):
        chunk = await stream.receive_some(65536)
        assert chunk, f"process ended before printing {needles!r}: {seen.decode()}"
        seen += chunk


async def _watch(cluster: Cluster, *extra: str) -> tuple[str, str, int]:
    """``tensord watch`` on b while a sends it a tensor; Ctrl-C once the arrival is printed."""
    name = unique("watched")
    with cluster.a.client() as a:
        a.put(name, save(cluster.work / f"{name}.npy", np.zeros(1 << 20, np.uint8)))
    proc = await start("watch", *extra, socket=cluster.b.socket)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    try:
        with trio.fail_after(30):
            await _read_until(proc.stderr, err, "(Ctrl-C to stop)\n")  # subscribed
            async with cluster.a.async_client() as a:
                await a.send("b", name=name)
            # The arrival and the end of the receive, in either order.
            if extra:
                needles = [f'"name": "{name}", "sender": "a"', '"state": "done"']
            else:
                needles = [f"arrival: {name} from a", f"receive done: {name}"]
            await _read_until(proc.stdout, out, *needles)
            proc.send_signal(signal.SIGINT)
            code = await proc.wait()
            while chunk := await proc.stdout.receive_some(65536):
                out += chunk
            while chunk := await proc.stderr.receive_some(65536):
                err += chunk
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with cluster.b.client() as b:
        b.delete(name)
    return out.decode(), err.decode(), code


async def test_watch_prints_events_until_ctrl_c(cluster: Cluster) -> None:
    out, err, code = await _watch(cluster)
    assert code == 130, (out, err)
    assert err == f"watching {cluster.b.socket} (Ctrl-C to stop)\n"  # Ctrl-C: quietly
    lines = out.splitlines()
    assert any(re.search(r"receive started: watched-\w+ from a, 0 B / 1\.0 MiB", x) for x in lines)
    assert any(
        re.search(r"receive done: watched-\w+ from a, 1\.0 MiB / 1\.0 MiB", x) for x in lines
    )
    arrival = r"\d\d:\d\d:\d\d\.\d{3} arrival: watched-\w+ from a \(1\.0 MiB\)"
    assert any(re.fullmatch(arrival, x) for x in lines), lines


async def test_watch_json_prints_one_event_per_line(cluster: Cluster) -> None:
    out, _, code = await _watch(cluster, "--json")
    assert code == 130
    events: list[dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
    kinds = [e["kind"] for e in events]
    assert "transfer" in kinds and "arrival" in kinds
    arrival = events[kinds.index("arrival")]
    assert arrival["sender"] == "a" and arrival["nbytes"] == 1 << 20


def test_bars_draw_progress_on_a_terminal() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    ev = {"id": "x1", "name": "w", "peer": "b", "direction": "send", "retries": 0}
    with Bars(console) as bars:
        assert bars.live
        bars.update(ev | {"state": "started", "bytes_done": 0, "bytes_total": 8 << 20})
        bars.update(ev | {"state": "retry", "bytes_done": 0, "bytes_total": 8 << 20, "retries": 1})
        bars.update(
            ev | {"state": "progress", "bytes_done": 4 << 20, "bytes_total": 8 << 20, "retries": 1}
        )
        bars.finish()
    drawn = screen.getvalue()
    assert "w -> b" in drawn and "8.0/8.0 MiB" in drawn and "1 retries" in drawn
    assert bars.retries(lambda e: e["name"] == "w") == 1
    assert not Bars(Console(file=io.StringIO())).live  # not a terminal: nothing drawn


async def test_ctrl_c_during_send_exits_130_quietly(cluster: Cluster) -> None:
    name = unique("cancelled")
    with cluster.a.client() as a:
        a.put(name, save(cluster.work / f"{name}.npy", np.zeros(1000, np.uint8)))
        c_port = next(p["addr"] for p in a.peers() if p["id"] == "c").rsplit(":", 1)[1]
    # Peer c accepts connections but never answers the handshake: the send hangs.
    with trio.socket.socket() as hold:
        hold.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await hold.bind(("127.0.0.1", int(c_port)))
        hold.listen(16)
        async with cluster.a.async_client() as ac, ac.subscribe() as events:
            src = str(cluster.work / f"{name}.npy")
            # The socket from the environment, as a user under systemd finds it.
            proc = await start(
                "send", src, "--to", "c", env={"TENSORD_CONTROL_SOCKET": str(cluster.a.socket)}
            )
            try:
                with trio.fail_after(30):
                    async for ev in events:
                        if ev["kind"] == "transfer" and ev["name"] == name:
                            assert ev["state"] == "started"
                            break
                    proc.send_signal(signal.SIGINT)  # while the daemon is dialling c
                    assert await proc.wait() == 130
                    # The CLI's connection went with it: the daemon cancelled the send.
                    async for ev in events:
                        if ev["kind"] == "transfer" and ev["name"] == name:
                            break
                    assert (ev["state"], ev["detail"]) == ("failed", "cancelled"), ev
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    assert proc.stdout is not None and proc.stderr is not None
    assert await proc.stdout.receive_some() == b""
    assert await proc.stderr.receive_some() == b""  # quietly: no traceback, no message
    with cluster.a.client() as a:
        a.delete(name)


def test_the_bars_know_the_daemons_final_states() -> None:
    """progress.py, which runs without trio, has its own copy of them."""
    assert FINAL_STATES == transfers.FINAL_STATES


def test_watch_bars_go_when_their_transfer_ends() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    ev = {"id": "x2", "name": "w", "peer": "a", "direction": "receive", "retries": 0}
    with Bars(console, drop_finished=True) as bars:
        bars.update(ev | {"state": "started", "bytes_done": 0, "bytes_total": 100})
        assert len(bars.progress.tasks) == 1
        bars.update(ev | {"state": "done", "bytes_done": 100, "bytes_total": 100})
        assert bars.progress.tasks == []


def test_a_file_the_daemon_cannot_see_gets_a_hint(tmp_path: Path) -> None:
    here = save(tmp_path / "here.npy", np.zeros(2))
    refused = ControlError(f"{here}: no such file", code="bad_request", status=400)
    hinted = _unseen_file(refused, here)
    assert hinted.status == 400 and "the daemon cannot see it" in str(hinted)
    assert "PrivateTmp=" in str(hinted) and "\n" not in str(hinted)
    assert _unseen_file(refused, tmp_path / "absent.npy") is refused
