"""The daemon's own path: ``tensord send`` between two daemons into the on-disk store.

Usage (from the repository root)::

    .venv/bin/python bench/daemon_send.py          # 256 MiB, 5 reps of each
    SIZE=64M REPS=3 .venv/bin/python bench/daemon_send.py
    PROFILE=/tmp/rx.raw .venv/bin/python bench/daemon_send.py   # py-spy on the receiving daemon
    PROFILE=/tmp/tx.raw PROFILE_NODE=a .venv/bin/python bench/daemon_send.py  # on the sender

Two real ``tensord serve`` subprocesses, a and b, one cluster file, each with its own state
directory (b receives into its store: a memory-mapped partial file, checkpointed, fsynced and
renamed at commit). The tensor is a ``.npy`` file of float32 normals that daemon a reads.
Each rep is timed two ways, alternating:

- *daemon-reported*: ``Client.send`` over a's control socket, the transfer's ``seconds`` as a
  reports it (from the start of the send until b answered ``Stored``: verified and committed);
- *CLI wall*: ``tensord --socket A send FILE --to b`` as a subprocess, from its start (the
  interpreter and the CLI's imports included) until it exits.

Each rep sends a new name, deleted on b afterwards. The plain-socket baseline (reused buffer,
receiver clock; bench/baselines.py) runs before and after in the same run, and its median over
both is the reference. A receive into the store is durable when ``Stored`` is answered, so the
disk's own write + ``fdatasync`` speed (same file system, same run) is printed too, with each
row's ratio to the slower of the two: a receive that overlaps the disk with the socket perfectly
reaches 1.0x of it. Printed as ``target: <what> <figure> PASS|MISS`` (issue 15: >= 0.7x).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import baselines
import numpy as np
from harness import MiB, make_tensor

from tensord import Client
from tensord.errors import DaemonNotRunning

TARGET = 0.7
ROOT = Path(__file__).resolve().parent.parent


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_daemon(
    home: Path, node_id: str, port: int, cluster: Path, secret: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORD_", "OLLAMA_"))}
    env.pop("NOTIFY_SOCKET", None)
    sock = home / "control.sock"
    env |= {
        "TENSORD_NODE_ID": node_id,
        "TENSORD_LISTEN": f"127.0.0.1:{port}",
        "TENSORD_STATE_DIR": str(home / "state"),
        "TENSORD_CONTROL_SOCKET": str(sock),
        "TENSORD_GATEWAY_LISTEN": "127.0.0.1:0",
        "TENSORD_CLUSTER_SECRET_FILE": str(secret),
    }
    with open(home / "log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensord", "serve", "--cluster", str(cluster)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    return proc, sock


def wait_ready(proc: subprocess.Popen[bytes], sock: Path, home: Path) -> None:
    give_up = time.monotonic() + 60
    with Client(sock) as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{(home / 'log').read_text()[-2000:]}")
            try:
                c.status()
                return
            except DaemonNotRunning:
                if time.monotonic() > give_up:
                    raise RuntimeError("daemon not ready after 60 s") from None
                time.sleep(0.05)  # polling a subprocess's readiness, not synchronisation


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (and its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(size: int, reps: int, profile: str | None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="tdsend-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        secret = root / "secret"
        secret.write_text(os.urandom(32).hex() + "\n")
        ports = {"a": free_port(), "b": free_port()}
        cluster = root / "cluster.json"
        cluster.write_text(
            json.dumps(
                {
                    "name": "bench",
                    "nodes": [{"id": n, "addr": f"127.0.0.1:{p}"} for n, p in ports.items()],
                }
            )
        )
        src = root / "w.npy"
        np.save(src, make_tensor(size))
        a, sock_a = start_daemon(root / "a", "a", ports["a"], cluster, secret)
        procs.append(a)
        b, sock_b = start_daemon(root / "b", "b", ports["b"], cluster, secret)
        procs.append(b)
        wait_ready(a, sock_a, root / "a")
        wait_ready(b, sock_b, root / "b")
        if profile:  # py-spy on the receiving daemon, stopped (SIGINT: it writes) at the end
            py_spy = str(Path(sys.executable).parent / "py-spy")
            spy = [py_spy, "record", "-f", "raw", "-r", "200", "--threads", "-o", profile]
            pid = (a if os.environ.get("PROFILE_NODE") == "a" else b).pid
            procs.insert(0, subprocess.Popen([*spy, "-p", str(pid)], stderr=subprocess.DEVNULL))
        reported: list[float] = []
        cpu_a: list[float] = []
        cpu_b: list[float] = []
        wall: list[float] = []
        with Client(sock_a) as ca, Client(sock_b) as cb:
            ca.send("b", path=src, name="warm")  # dial, handshake, page cache of the file
            cb.delete("warm")
            for i in range(reps):
                before = cpu_seconds(a.pid), cpu_seconds(b.pid)
                (result,) = ca.send("b", path=src, name=f"d{i}")
                reported.append(float(result["seconds"]))
                cpu_a.append(cpu_seconds(a.pid) - before[0])
                cpu_b.append(cpu_seconds(b.pid) - before[1])
                cb.delete(f"d{i}")
                cmd = [sys.executable, "-m", "tensord", "--socket", str(sock_a), "send"]
                t = time.perf_counter()
                subprocess.run(
                    [*cmd, str(src), "--to", "b", "--name", f"c{i}"],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                wall.append(time.perf_counter() - t)
                cb.delete(f"c{i}")
        return {"reported": reported, "wall": wall, "cpu_a": cpu_a, "cpu_b": cpu_b}
    finally:
        if profile and procs:
            procs[0].send_signal(signal.SIGINT)
            procs[0].wait(60)
        for p in procs:
            stop(p)
        shutil.rmtree(root, ignore_errors=True)


def gbps(size: int, seconds: list[float]) -> tuple[float, list[float]]:
    return size / statistics.median(seconds) / 1e9, [size / s / 1e9 for s in seconds]


def disk_write_sync(size: int, reps: int) -> list[float]:
    """Seconds to write ``size`` bytes to a new file where the daemons' state lives (the temp
    directory's file system) and ``fdatasync`` it: the floor of any receive that is durable
    when it is answered, as the store's is. The buffer is written in 8 MiB steps of one resident
    array (no first-touch in the timing)."""
    block = np.ones(8 * MiB, np.uint8)
    times = []
    for _ in range(reps):
        with tempfile.NamedTemporaryFile(prefix="tdsend-disk-") as f:
            began = time.perf_counter()
            left = size
            while left:
                left -= os.write(f.fileno(), memoryview(block)[: min(left, block.nbytes)])
            os.fdatasync(f.fileno())
            times.append(time.perf_counter() - began)
    return times


def main() -> int:
    size = parse_size(os.environ.get("SIZE", "256M"))
    reps = int(os.environ.get("REPS", "5"))
    profile = os.environ.get("PROFILE") or None
    print(f"daemon send: {size / MiB:g} MiB, {reps} reps; load {os.getloadavg()}", flush=True)
    plain = baselines.run_plain(size, reps, 600)
    r = run(size, reps, profile)
    plain += baselines.run_plain(size, reps, 600)
    base, base_reps = gbps(size, plain)
    disk, disk_reps = gbps(size, disk_write_sync(size, 3))
    print(f"  plain socket recv_into             {base:5.2f} GB/s  reps {fmt(base_reps)}")
    print(f"  disk: write + fdatasync            {disk:5.2f} GB/s  reps {fmt(disk_reps)}")
    rows = (("daemon-reported", r["reported"]), ("CLI wall", r["wall"]))
    for what, seconds in rows:
        rate, each = gbps(size, seconds)
        print(
            f"  tensord send, {what:<20} {rate:5.2f} GB/s  {rate / base:4.2f} x plain  "
            f"{rate / min(base, disk):4.2f} x min(plain, disk)  reps {fmt(each)}"
        )
    gb = size / 1e9
    print(
        f"  CPU-seconds per GB (daemon-reported reps): sender daemon "
        f"{statistics.median(r['cpu_a']) / gb:.2f}, receiving daemon "
        f"{statistics.median(r['cpu_b']) / gb:.2f}"
    )
    for what, seconds in rows:
        rate, _ = gbps(size, seconds)
        ok = rate / base >= TARGET
        print(
            f"target: tensord send daemon to daemon ({what}) >= {TARGET} x plain socket "
            f"{rate / base:.2f} x ({rate:.2f} / {base:.2f} GB/s) {'PASS' if ok else 'MISS'}"
        )
    print(f"load at end {os.getloadavg()}")
    return 0


def fmt(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
