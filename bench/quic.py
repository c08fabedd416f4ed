"""tensord over QUIC against tensord over TCP: one run, one table, a verdict.

Usage (from the repository root)::

    .venv/bin/python bench/quic.py              # every row (~5 minutes on a 2-core machine)
    .venv/bin/python bench/quic.py loss proxy   # rows whose section or name contains a word
    QUICK=1 .venv/bin/python bench/quic.py      # small sizes and few reps (~1.5 minutes)

Environment: ``SIZE`` (256 MiB, the throughput tensor), ``CONC_SIZE`` (16 MiB, each of the
``TASKS`` = 16 concurrent tensors), ``LOSS_SIZE`` (32 MiB) and ``LOSS_CONC_SIZE`` (2 MiB), the
same two for the rows with packet loss, ``LOSS`` (0.02), ``REPS`` (3), ``LAT_N`` (500),
``JUMBO`` (8952, the ``max_datagram_size`` of the jumbo-frame row), ``ROW_TIMEOUT`` (300 s),
``QUIET_WAIT`` (0: before each row, wait up to this many seconds for other processes to go
quiet), ``QUICK``, ``VERBOSE`` (children print tracebacks). Sizes accept ``K``/``M``/``G`` suffixes.

The figures are printed as rows while they run, then as a QUIC/TCP table with a verdict; they
are written with a description of the machine to ``bench/results/quic.json``.

Method
------
As in ``bench/run.py``: every row runs in fresh ``spawn`` processes - a receiving
``TensorNode`` and a sending ``TensorNode`` (and, for the proxy rows, a third process running
``tests/support/udp_proxy.py``) - over 127.0.0.1, with default library settings (compression on but
adaptive; the payload is float32 normals, which lz4 cannot shrink). Rows are *pushes* on the
*sender's* clock: from calling ``send_tensor`` until it returns, i.e. until the receiver has
checked and stored the whole tensor and answered ``Stored``. Throughput is the median over
``REPS`` transfers after one warm-up transfer of the same size (which also dials the
connection). The concurrent row issues ``TASKS`` sends at once (the sender's pool is raised to
``TASKS`` connections, so all of them are in flight together; over QUIC they are streams of
one QUIC connection) and reports their total bytes over the time until the last returns,
median over ``REPS`` bursts after one warm-up burst of 1 MiB tensors. Latency is one
``send_tensor`` of a 4 KiB tensor at a time on the warm pooled connection, ``LAT_N`` sends after
50 warm-up sends, median and p99 of the single sends.

The QUIC node is ``Settings.transport = "quic"``: it listens on UDP with the TCP port's number
and dials ad-hoc addresses over QUIC, *falling back to TCP* if QUIC is unreachable. Every send of
a QUIC row checks ``TransferResult.transport == "quic"`` (and TCP rows check ``"tcp"``), so a
silent fallback fails the row instead of faking a figure. The jumbo row sets
``Settings.quic.max_datagram_size`` on both nodes: on loopback any size up to 16000 fits, on a
real network only where the path MTU is 9000.

Packet loss. QUIC rows go through ``tests/support/udp_proxy.py`` (a Trio UDP proxy in its own
process, dropping each datagram with probability ``LOSS`` in both directions, seeded); the
sender dials the proxy. The proxy is Python and touches every datagram, so it costs CPU on a
2-core machine: the row "QUIC, udp_proxy, 0 % loss" shows how much of the loss row's figure is
the proxy itself. With loss it costs more than its CPU (~0.4 cores): QUIC's window is then
loss-limited and moves one window per round trip, and every datagram waits for the proxy's
turn on a core, so the netns row below ("QUIC with the kernel drop", no proxy) reaches 1.5-2x
the proxy row. (The proxy's sockets ask for 4 MiB buffers, as tensord's do: with the
kernel's default 208 KiB, QUIC's loss-free bursts overflowed it - ``RcvbufErrors``, ~0.2 % of
the datagrams, not in its ``dropped`` count.) TCP
cannot go through a UDP proxy, and this machine has neither netem, nft nor iptables; its
kernel does have ``cls_bpf``, so the TCP rows with loss run in a network namespace of their
own (``ip netns add``; never the host's loopback) whose ``lo`` drops each
arriving packet with probability ``LOSS``: a ``tc`` ``clsact`` *ingress* filter running a
4-instruction classic BPF program (``ld rand; jge``). Ingress, because a drop at egress is
reported back to TCP as local congestion (it re-sends at once, no loss recovery); at ingress
the sender has sent the packet and only the missing ACK tells it. That ``lo`` has MTU 1500 and
``gso_max_segs 1``, so every skb is one wire packet - on a 64 KiB loopback "2 %" would drop 2 %
of 64 KiB GSO super-packets, 45 wire packets at a time. The price: the kernel then handles,
wakes and ACKs every 1448-byte segment on its own, which on this VM caps TCP far below what
it does on a real 1500-byte NIC with TSO/GRO; the row "TCP, netns, 0 % loss" measures that cap,
so read TCP's loss figures against it (the table prints the share each transport keeps of its
0 % figure on the same path). The namespace also runs QUIC with the same kernel drop (no proxy
CPU) as a cross-check of the proxy rows. The loss actually applied is measured from the
namespace's ``/proc/net/snmp`` (packets sent minus received) and printed per row. Where the
namespace or the filter cannot be made, those cells say why (``n/a``).

CPU. Each row also reports the CPU the sender, receiver (and proxy) used during the timed part,
in cores (CPU seconds / wall seconds): QUIC is CPU-bound in aioquic's Python packet handling,
and a figure near 1.0 for the sender says so. Other processes' load during a row is flagged
as in ``bench/run.py`` (``^ disturbed``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.support.udp_proxy, also in the spawned children

import trio  # noqa: E402
from harness import (  # noqa: E402
    MP,
    ChildFailed,
    Children,
    KiB,
    MiB,
    OtherLoad,
    Reporter,
    make_tensor,
    stop_on_sigterm,
)
from run import (  # noqa: E402
    DISTURBED,
    RESULTS,
    _percentile,
    describe_load,
    describe_machine,
    machine,
    parse_size,
    wait_for_quiet,
)

from tensord.config import HostPort, Settings  # noqa: E402
from tensord.errors import TensorNotFound  # noqa: E402
from tensord.node import TensorNode, TransferResult  # noqa: E402

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
#: The ``k`` of classic BPF's ``ld rand`` (SKF_AD_OFF + SKF_AD_RANDOM, as an unsigned 32-bit
#: value): a fresh random u32 per packet. The loss filter is ``ld rand; jge #T, +0, +1;
#: ret #0 (TC_ACT_OK); ret #2 (TC_ACT_SHOT)``, which drops with probability T / 2^32.
SKF_AD_RANDOM = (1 << 32) - 0x1000 + 56


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    size: int
    conc_size: int
    loss_size: int
    loss_conc_size: int
    tasks: int
    reps: int
    lat_n: int
    loss: float
    jumbo: int
    row_timeout: float
    quiet_wait: float
    quick: bool
    lat_size: int = 4 * KiB
    lat_warmup: int = 50
    seed: int = 7

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Config:
        quick = env.get("QUICK", "") not in ("", "0")

        def get(name: str, normal: str, smoke: str) -> str:
            return env.get(name) or (smoke if quick else normal)

        return cls(
            size=parse_size(get("SIZE", "256M", "32M")),
            conc_size=parse_size(get("CONC_SIZE", "16M", "2M")),
            loss_size=parse_size(get("LOSS_SIZE", "32M", "8M")),
            loss_conc_size=parse_size(get("LOSS_CONC_SIZE", "2M", "1M")),
            tasks=int(get("TASKS", "16", "16")),
            reps=int(get("REPS", "3", "2")),
            lat_n=int(get("LAT_N", "500", "200")),
            loss=float(get("LOSS", "0.02", "0.02")),
            jumbo=int(get("JUMBO", "8952", "8952")),
            row_timeout=float(get("ROW_TIMEOUT", "300", "120")),
            quiet_wait=float(get("QUIET_WAIT", "0", "0")),
            quick=quick,
        )


# -- the child processes ---------------------------------------------------------------------


def enter_netns(name: str | None) -> None:
    """Move this (still single-threaded) process into the network namespace ``name``."""
    if name is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def node_settings(transport: str, quic: dict[str, Any], pool: int | None = None) -> Settings:
    settings = Settings.for_library(listen=HostPort("127.0.0.1", 0))
    settings = dataclasses.replace(
        settings, transport=transport, quic=dataclasses.replace(settings.quic, **quic)
    )
    return settings.with_pool(max_connections=pool) if pool else settings


def cpu_seconds() -> float:
    return time.process_time()


def receiver(out: Reporter, transport: str, quic: dict[str, Any], netns: str | None) -> None:
    """Serve until terminated: report the port, then consume and drop every arrival."""
    enter_netns(netns)

    async def main() -> None:
        async with TensorNode(node_settings(transport, quic)) as node:
            out.send({"port": node.port, "pid": os.getpid()})
            while True:
                arrival = await node.receive_tensor()
                with contextlib.suppress(TensorNotFound):
                    node.delete_tensor(arrival.name)
                del arrival

    trio.run(main)


def proxy(out: Reporter, target_port: int, loss: float, seed: int, counters: Any) -> None:
    """tests/support/udp_proxy.py in front of the receiver's UDP port. Its counters go to
    ``counters`` (shared memory: forwarded, dropped), every 0.1 s."""
    from tests.support.udp_proxy import UdpProxy

    async def main() -> None:
        p = UdpProxy(("127.0.0.1", target_port), loss=loss, seed=seed)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(p.run)
            out.send({"port": port})
            while True:
                await trio.sleep(0.1)
                counters[0], counters[1] = p.stats.forwarded, p.stats.dropped

    trio.run(main)


def _check(result: TransferResult, transport: str) -> None:
    if result.transport != transport:
        raise RuntimeError(
            f"{result.name} went over {result.transport}, not {transport} (silent fallback)"
        )


def sequential_sender(
    out: Reporter,
    port: int,
    transport: str,
    quic: dict[str, Any],
    netns: str | None,
    nbytes: int,
    n: int,
    warmup: int,
) -> dict[str, Any]:
    """Seconds of each of ``n`` sequential sends of the ``nbytes``-byte tensor on the pooled
    connection, after ``warmup`` untimed ones: the throughput rows (one warm-up, ``REPS``
    sends) and the latency rows (``LAT_N`` small sends)."""
    enter_netns(netns)
    data = make_tensor(nbytes)
    peer = f"127.0.0.1:{port}"

    async def main() -> dict[str, Any]:
        times: list[float] = []
        retries = 0
        async with TensorNode(node_settings(transport, quic)) as node:
            for i in range(warmup):
                _check(await node.send_tensor(peer, f"warm-{i}", data), transport)
            out.send("timing")
            cpu = cpu_seconds()
            for i in range(n):
                t = time.perf_counter()
                result = await node.send_tensor(peer, f"seq-{i}", data)
                times.append(time.perf_counter() - t)
                _check(result, transport)
                retries += result.retries
            cpu = cpu_seconds() - cpu
        return {"seconds": times, "retries": retries, "cpu": cpu}

    return trio.run(main)


def concurrent_sender(
    out: Reporter,
    port: int,
    transport: str,
    quic: dict[str, Any],
    netns: str | None,
    size: int,
    tasks: int,
    reps: int,
) -> dict[str, Any]:
    """``reps`` bursts of ``tasks`` concurrent sends of a ``size``-byte tensor each."""
    enter_netns(netns)
    data = make_tensor(size)
    warm = make_tensor(min(size, MiB))
    peer = f"127.0.0.1:{port}"

    async def main() -> dict[str, Any]:
        times: list[float] = []
        retries = 0

        async def burst(node: TensorNode, prefix: str, array: Any) -> float:
            nonlocal retries

            async def one(i: int) -> None:
                nonlocal retries
                result = await node.send_tensor(peer, f"{prefix}-{i}", array)
                _check(result, transport)
                retries += result.retries

            t = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(tasks):
                    nursery.start_soon(one, i)
            return time.perf_counter() - t

        async with TensorNode(node_settings(transport, quic, pool=tasks)) as node:
            await burst(node, "warm", warm)  # dials the pool's connections (QUIC: streams)
            retries = 0
            out.send("timing")
            cpu = cpu_seconds()
            for r in range(reps):
                times.append(await burst(node, f"conc{r}", data))
            cpu = cpu_seconds() - cpu
        return {"seconds": times, "retries": retries, "cpu": cpu}

    return trio.run(main)


# -- the loss namespace (TCP's packet loss; also QUIC's, as a reference) ----------------------


def _ip(*args: str) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if p.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {(p.stderr or p.stdout).strip()}")


def _tc(ns: str, *args: str) -> None:
    p = subprocess.run(
        ["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True, timeout=10
    )
    if p.returncode != 0:
        raise OSError(f"tc {' '.join(args)}: {(p.stderr or p.stdout).strip()}")


def netns_unavailable() -> str | None:
    """Why a loss namespace can't be made here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root for a network namespace"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no {tool} here"
    return None


def remove_stale_namespaces() -> None:
    """Delete the loss namespaces of earlier runs that were killed before they could."""
    prefix = "tensord-quicbench-"
    with contextlib.suppress(OSError):
        for entry in NETNS_DIR.iterdir():
            pid = entry.name.removeprefix(prefix)
            if (
                entry.name.startswith(prefix)
                and pid.isdigit()
                and not Path(f"/proc/{pid}").exists()
            ):
                subprocess.run(["ip", "netns", "del", entry.name], capture_output=True, check=False)


@contextlib.contextmanager
def loss_namespace(loss: float) -> Iterator[str]:
    """A fresh network namespace whose ``lo`` (MTU 1500, one packet per skb) drops each packet
    with probability ``loss``; deleted on exit. Raises OSError with the reason if it can't."""
    name = f"tensord-quicbench-{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up", "mtu", "1500")
        _ip("-n", name, "link", "set", "lo", "gso_max_segs", "1", "gso_max_size", "1500")
        if loss > 0:
            threshold = min((1 << 32) - 1, round(loss * (1 << 32)))
            prog = f"4,32 0 0 {SKF_AD_RANDOM},53 0 1 {threshold},6 0 0 0,6 0 0 2"
            _tc(name, "qdisc", "add", "dev", "lo", "clsact")
            _tc(name, "filter", "add", "dev", "lo", "ingress", "bpf", "da", "bytecode", prog)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def netns_counters(ns: str) -> dict[str, int]:
    """Packets sent and received in ``ns`` so far (TCP segments + UDP datagrams), and UDP
    datagrams a full socket buffer dropped (counted as received: the filter did not drop them)."""
    p = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    lines = p.stdout.splitlines()
    out = {"sent": 0, "received": 0, "rcvbuf": 0}
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        proto, _, keys = head.partition(":")
        v = {
            k: int(x) for k, x in zip(keys.split(), values.partition(":")[2].split(), strict=False)
        }
        if proto == "Tcp":  # OutSegs counts new segments only, RetransSegs the others
            out["sent"] += v["OutSegs"] + v["RetransSegs"]
            out["received"] += v["InSegs"]
        elif proto == "Udp":  # a datagram dropped by the sender's qdisc counts as SndbufErrors
            out["sent"] += v["OutDatagrams"] + v["SndbufErrors"]
            out["received"] += v["InDatagrams"] + v["InErrors"] + v["NoPorts"]
            out["rcvbuf"] += v["RcvbufErrors"]
    return out


# -- rows ------------------------------------------------------------------------------------


@dataclass
class Figure:
    """What a row measured: a headline value and everything behind it."""

    value: float
    unit: str
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """Where a row's packets go: straight over loopback, through the UDP proxy, or through
    the loss namespace."""

    kind: str  # "loopback" | "proxy" | "netns"
    loss: float = 0.0

    @property
    def label(self) -> str:
        pct = f"{self.loss * 100:g} % loss"
        return {
            "loopback": "loopback",
            "proxy": f"udp_proxy, {pct}",
            "netns": f"netns, {pct}",
        }[self.kind]


@dataclass(frozen=True)
class Row:
    name: str
    section: str
    metric: str  # "throughput" | "latency" | "concurrent"
    transport: str
    route: Route
    size: int
    quic: tuple[tuple[str, Any], ...] = ()
    key: str = ""  # the summary cell this row fills: "<metric>/<column>"


def _cores(cpu: float, wall: float) -> str:
    return f"{cpu / wall:.2f}" if wall > 0 else "?"


def _pid_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a child process has used so far."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    rest = stat[stat.rfind(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def measure(row: Row, cfg: Config, ns: str | None) -> Figure:
    quic = dict(row.quic)
    netns = ns if row.route.kind == "netns" else None
    with Children() as kids:
        rx = kids.start("receiver", receiver, row.transport, quic, netns)
        ready = rx.recv(timeout=30)
        port = ready["port"]
        px = None
        if row.route.kind == "proxy":
            counters = MP.RawArray("q", 2)
            px = kids.start("udp proxy", proxy, port, row.route.loss, cfg.seed, counters)
            port = px.recv(timeout=30)["port"]
        if row.metric == "throughput":
            args: tuple[Any, ...] = (row.size, cfg.reps, 1)
            fn: Callable[..., Any] = sequential_sender
        elif row.metric == "latency":
            args, fn = (row.size, cfg.lat_n, cfg.lat_warmup), sequential_sender
        else:
            args, fn = (row.size, cfg.tasks, cfg.reps), concurrent_sender
        before = netns_counters(ns) if netns else None
        tx = kids.start("sender", fn, port, row.transport, quic, netns, *args)
        if tx.recv(cfg.row_timeout) != "timing":
            raise ChildFailed("sender: unexpected message")
        t0 = time.perf_counter()
        rx0, px0 = _pid_cpu(ready["pid"]), _pid_cpu(px.pid if px else None)
        r: dict[str, Any] = tx.recv(cfg.row_timeout)
        wall = time.perf_counter() - t0
        rx1, px1 = _pid_cpu(ready["pid"]), _pid_cpu(px.pid if px else None)
        cpu = f"cpu: sender {_cores(r['cpu'], wall)}, receiver {_cores(rx1 - rx0, wall)}"
        if px is not None:
            cpu += f", proxy {_cores(px1 - px0, wall)}"
        cpu += " cores"
        loss_note = ""
        data: dict[str, Any] = {
            "retries": r["retries"],
            "cpu_wall_seconds": wall,
            "cpu_seconds": {"sender": r["cpu"], "receiver": rx1 - rx0, "proxy": px1 - px0},
        }
        if px is not None:
            time.sleep(0.2)
            forwarded, dropped = counters[0], counters[1]
            loss_note = f"dropped {dropped}/{forwarded + dropped} datagrams"
            data["proxy"] = {"forwarded": forwarded, "dropped": dropped}
        if before is not None and ns is not None:
            after = netns_counters(ns)
            sent = after["sent"] - before["sent"]
            lost = sent - (after["received"] - before["received"])
            loss_note = f"lost {lost}/{sent} packets ({lost / max(1, sent) * 100:.1f} %)"
            rcvbuf = after["rcvbuf"] - before["rcvbuf"]
            if rcvbuf:
                loss_note += f" + {rcvbuf} to a full socket buffer"
            data["netns"] = {"sent": sent, "lost": lost, "rcvbuf_dropped": rcvbuf}
    notes = f"retries {r['retries']}" + (f", {loss_note}" if loss_note else "") + f"; {cpu}"
    seconds: list[float] = r["seconds"]
    if row.metric == "latency":
        us = sorted(s * 1e6 for s in seconds)
        p50, p99 = _percentile(us, 50), _percentile(us, 99)
        data.update({"n": len(us), "p50_us": p50, "p99_us": p99, "max_us": us[-1]})
        detail = f"p99 {p99:,.0f} us  max {us[-1]:,.0f} us  (n={len(us)}); {notes}"
        return Figure(p50, "us p50", detail, data)
    nbytes = row.size * (cfg.tasks if row.metric == "concurrent" else 1)
    rates = [nbytes / s / 1e6 for s in seconds]
    med = nbytes / statistics.median(seconds) / 1e6
    data.update({"bytes": nbytes, "seconds": seconds, "mbps": rates})
    detail = f"min {min(rates):,.1f}  max {max(rates):,.1f}; {notes}"
    return Figure(med, "MB/s", detail, data)


def _mib(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n // KiB} KiB"


def rows(cfg: Config) -> list[Row]:
    lo, pct = Route("loopback"), f"{cfg.loss * 100:g} %"
    proxy0, proxy_l = Route("proxy", 0.0), Route("proxy", cfg.loss)
    ns0, ns_l = Route("netns", 0.0), Route("netns", cfg.loss)
    reps = f"median of {cfg.reps} after 1 warm-up"
    conc = f"{cfg.tasks} x {_mib(cfg.conc_size)}"
    lconc = f"{cfg.tasks} x {_mib(cfg.loss_conc_size)}"
    s_thr = f"Throughput: {_mib(cfg.size)} float32, {reps}, host loopback"
    s_lat = f"Latency: {_mib(cfg.lat_size)}, {cfg.lat_n} sends on a warm connection, host loopback"
    s_conc = f"Concurrent: {conc} sent at once (aggregate MB/s), {reps}, host loopback"
    s_lthr = f"{pct} loss - throughput: {_mib(cfg.loss_size)}, {reps}"
    s_llat = f"{pct} loss - latency: {_mib(cfg.lat_size)}, {cfg.lat_n} sends"
    s_lconc = f"{pct} loss - concurrent: {lconc} at once, {reps}"
    jumbo = (("max_datagram_size", cfg.jumbo),)
    out = [
        Row("tcp", s_thr, "throughput", "tcp", lo, cfg.size, key="thr/tcp"),
        Row("quic", s_thr, "throughput", "quic", lo, cfg.size, key="thr/quic"),
        Row(
            f"quic, max_datagram_size {cfg.jumbo} (jumbo)",
            s_thr,
            "throughput",
            "quic",
            lo,
            cfg.size,
            jumbo,
            key="thr/jumbo",
        ),
        Row("tcp", s_lat, "latency", "tcp", lo, cfg.lat_size, key="lat/tcp"),
        Row("quic", s_lat, "latency", "quic", lo, cfg.lat_size, key="lat/quic"),
        Row("tcp", s_conc, "concurrent", "tcp", lo, cfg.conc_size, key="conc/tcp"),
        Row("quic", s_conc, "concurrent", "quic", lo, cfg.conc_size, key="conc/quic"),
        Row(
            f"quic, max_datagram_size {cfg.jumbo} (jumbo)",
            s_conc,
            "concurrent",
            "quic",
            lo,
            cfg.conc_size,
            jumbo,
            key="conc/jumbo",
        ),
    ]
    for section, metric, size, k in (
        (s_lthr, "throughput", cfg.loss_size, "lthr"),
        (s_llat, "latency", cfg.lat_size, "llat"),
        (s_lconc, "concurrent", cfg.loss_conc_size, "lconc"),
    ):
        out += [
            Row(f"tcp, {ns0.label} (reference)", section, metric, "tcp", ns0, size, key=f"{k}/t0"),
            Row(f"tcp, {ns_l.label}", section, metric, "tcp", ns_l, size, key=f"{k}/tcp"),
            Row(
                f"quic, {proxy0.label} (reference)",
                section,
                metric,
                "quic",
                proxy0,
                size,
                key=f"{k}/q0",
            ),
            Row(f"quic, {proxy_l.label}", section, metric, "quic", proxy_l, size, key=f"{k}/quic"),
            Row(f"quic, {ns_l.label}", section, metric, "quic", ns_l, size, key=f"{k}/qns"),
        ]
    return out


# -- running ---------------------------------------------------------------------------------


@dataclass
class RowResult:
    name: str
    section: str
    key: str
    figure: Figure | None = None
    error: str | None = None
    wall_seconds: float = 0.0
    other_load: dict[str, Any] = field(default_factory=dict)


def run_row(row: Row, cfg: Config, netns_reason: str | None) -> RowResult:
    result = RowResult(row.name, row.section, row.key)
    if cfg.quiet_wait > 0:
        wait_for_quiet(cfg.quiet_wait)
    load = OtherLoad()
    t = time.perf_counter()
    try:
        if row.route.kind == "netns":
            if netns_reason is not None:
                raise OSError(f"n/a (no packet filter here: {netns_reason})")
            with contextlib.ExitStack() as stack:
                try:
                    ns = stack.enter_context(loss_namespace(row.route.loss))
                except OSError as exc:
                    raise OSError(f"n/a (no packet filter here: {exc})") from None
                result.figure = measure(row, cfg, ns)
        else:
            result.figure = measure(row, cfg, None)
    except Exception as exc:
        if os.environ.get("VERBOSE"):
            traceback.print_exc()
        result.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    result.wall_seconds = time.perf_counter() - t
    result.other_load = load.stop()
    return result


NAME_W = 44


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def format_row(result: RowResult) -> str:
    if result.figure is None:
        error = result.error or "?"
        return (
            f"  {result.name:<{NAME_W}} {error if error.startswith('n/a') else 'failed: ' + error}"
        )
    f = result.figure
    return f"  {result.name:<{NAME_W}} {_num(f.value):>8} {f.unit:<7} {f.detail}"


# -- the summary and the verdict -------------------------------------------------------------


def summary(cfg: Config, done: dict[str, RowResult]) -> tuple[list[str], dict[str, Any]]:
    """The QUIC/TCP table (lines) and the figures behind it."""

    def val(key: str, p99: bool = False) -> float | None:
        r = done.get(key)
        if r is None or r.figure is None:
            return None
        return float(r.figure.data["p99_us"]) if p99 else r.figure.value

    def why(key: str) -> str:
        r = done.get(key)
        if r is None:
            return "not run"
        return "failed" if r.error and not r.error.startswith("n/a") else "n/a"

    def cell(key: str, p99: bool = False) -> str:
        v = val(key, p99)
        return _num(v) if v is not None else why(key)

    def ratio(q: float | None, t: float | None) -> str:
        return f"{q / t:.3g} x" if q is not None and t else "-"

    pct = f"{cfg.loss * 100:g} %"
    lines = [
        f"{'':<46}{'TCP':>12}{'QUIC':>12}{'QUIC/TCP':>11}",
    ]
    table: dict[str, Any] = {}

    def line(label: str, tkey: str, qkey: str, p99: bool = False, note: str = "") -> None:
        t, q = val(tkey, p99), val(qkey, p99)
        cells = (cell(tkey, p99) if tkey else "", cell(qkey, p99), ratio(q, t) if tkey else "")
        lines.append(f"{label:<46}{cells[0]:>12}{cells[1]:>12}{cells[2]:>11}{note}")
        table[label.strip()] = {"tcp": t, "quic": q, "quic_over_tcp": q / t if q and t else None}

    def kept(lossy: str, clean: str) -> str:
        a, b = val(lossy), val(clean)
        return f"{a / b * 100:.0f} %" if a is not None and b else "?"

    line(f"{_mib(cfg.size)} throughput, MB/s", "thr/tcp", "thr/quic")
    line(f"  QUIC max_datagram_size {cfg.jumbo} (jumbo)", "thr/tcp", "thr/jumbo")
    line(f"{_mib(cfg.lat_size)} latency p50, us", "lat/tcp", "lat/quic")
    line(f"{_mib(cfg.lat_size)} latency p99, us", "lat/tcp", "lat/quic", p99=True)
    line(f"{cfg.tasks} x {_mib(cfg.conc_size)} concurrent, MB/s", "conc/tcp", "conc/quic")
    line(f"  QUIC max_datagram_size {cfg.jumbo} (jumbo)", "conc/tcp", "conc/jumbo")
    via = "TCP: netns + tc drop, MTU 1500; QUIC: through tests/support/udp_proxy.py"
    lines.append(f"{pct} loss ({via})")
    for k, label in (
        ("lthr", f"{_mib(cfg.loss_size)} throughput, MB/s"),
        ("lconc", f"{cfg.tasks} x {_mib(cfg.loss_conc_size)} concurrent, MB/s"),
    ):
        tcp_kept, quic_kept = kept(f"{k}/tcp", f"{k}/t0"), kept(f"{k}/quic", f"{k}/q0")
        note = f"   (kept of 0 %: TCP {tcp_kept}, QUIC {quic_kept})"
        line(f"  {label}", f"{k}/tcp", f"{k}/quic", note=note)
        line("    QUIC with the kernel drop (netns, no proxy)", f"{k}/tcp", f"{k}/qns")
        line("    0 % in the same path (reference)", f"{k}/t0", f"{k}/q0")
    line(f"  {_mib(cfg.lat_size)} latency p50, us", "llat/tcp", "llat/quic")
    line(f"  {_mib(cfg.lat_size)} latency p99, us", "llat/tcp", "llat/quic", p99=True)
    line("    p99, QUIC with the kernel drop (netns)", "llat/tcp", "llat/qns", p99=True)
    return lines, table


def cpu_per_gb(done: dict[str, RowResult], key: str) -> float | None:
    """CPU seconds (sender + receiver) a throughput row spent per GB it moved."""
    r = done.get(key)
    if r is None or r.figure is None:
        return None
    d = r.figure.data
    moved = d["bytes"] * len(d["seconds"])
    return (d["cpu_seconds"]["sender"] + d["cpu_seconds"]["receiver"]) / (moved / 1e9)


#: Issue 15's QUIC targets: 256 MiB at 1452-byte datagrams, CPU per GB, 4 KiB p50 against TCP.
TARGET_MBPS = 300.0
TARGET_CPU_PER_GB = 5.0
TARGET_LATENCY_RATIO = 1.5


def targets(cfg: Config, done: dict[str, RowResult]) -> tuple[list[str], dict[str, Any]]:
    """Issue 15's QUIC targets with this run's figures, met or missed (lines, and the same
    for the JSON)."""

    def fig(key: str) -> float | None:
        r = done.get(key)
        return None if r is None or r.figure is None else r.figure.value

    thr, cpu = fig("thr/quic"), cpu_per_gb(done, "thr/quic")
    lat_q, lat_t = fig("lat/quic"), fig("lat/tcp")
    ratio = lat_q / lat_t if lat_q is not None and lat_t else None
    rows: list[tuple[str, float | None, str, float, bool]] = [
        (f"{_mib(cfg.size)} throughput >= {TARGET_MBPS:g} MB/s", thr, "MB/s", TARGET_MBPS, True),
        (f"CPU <= {TARGET_CPU_PER_GB:g} CPU-s per GB", cpu, "CPU-s/GB", TARGET_CPU_PER_GB, False),
        (
            f"{_mib(cfg.lat_size)} p50 <= {TARGET_LATENCY_RATIO:g} x TCP",
            ratio,
            "x TCP",
            TARGET_LATENCY_RATIO,
            False,
        ),
    ]
    lines: list[str] = []
    table: dict[str, Any] = {}
    for label, got, unit, goal, higher in rows:
        if got is None:
            lines.append(f"{label:<40} not measured")
            table[label] = None
            continue
        met = got >= goal if higher else got <= goal
        off = goal / got if higher else got / goal
        said = "met" if met else f"missed ({off:.3g} x off)"
        lines.append(f"{label:<40} {_num(got)} {unit}: {said}")
        table[label] = {"value": got, "target": goal, "met": met}
    if cfg.quick or cfg.size != 256 * MiB:
        lines.append("(not the targets' sizes: QUICK or SIZE changed; read as a smoke test)")
    return lines, table


def verdict(cfg: Config, done: dict[str, RowResult]) -> str:
    """One paragraph, computed from the figures: which transport to default to, and why."""

    def v(key: str, p99: bool = False) -> float | None:
        r = done.get(key)
        if r is None or r.figure is None:
            return None
        return float(r.figure.data["p99_us"]) if p99 else r.figure.value

    # (what, how many times better QUIC did than TCP: > 1 favours QUIC, is_throughput)
    cmp: list[tuple[str, float, bool]] = []
    said: list[str] = []
    pct = f"{cfg.loss * 100:g} %"

    thr_t, thr_q, jumbo = v("thr/tcp"), v("thr/quic"), v("thr/jumbo")
    conc_t, conc_q = v("conc/tcp"), v("conc/quic")
    lat_t, lat_q = v("lat/tcp"), v("lat/quic")
    clean: list[str] = []
    if thr_t and thr_q:
        cmp.append(("throughput", thr_q / thr_t, True))
        clean.append(
            f"QUIC moved {_mib(cfg.size)} at {_num(thr_q)} MB/s against TCP's {_num(thr_t)} "
            f"MB/s ({thr_q / thr_t:.2g} x)"
        )
    if conc_t and conc_q:
        cmp.append(("concurrent transfers", conc_q / conc_t, True))
        clean.append(
            f"{cfg.tasks} concurrent {_mib(cfg.conc_size)} transfers {_num(conc_q)} against "
            f"{_num(conc_t)} MB/s ({conc_q / conc_t:.2g} x)"
        )
    if lat_t and lat_q:
        cmp.append(("small-send latency", lat_t / lat_q, False))
        clean.append(
            f"a {_mib(cfg.lat_size)} send took {_num(lat_q)} us against {_num(lat_t)} us "
            f"({lat_q / lat_t:.2g} x)"
        )
    if clean:
        said.append("Over loopback " + ", ".join(clean[:-1]) + (", and " if clean[1:] else ""))
        said[-1] += clean[-1]
    if jumbo and thr_t:
        said.append(
            f"Raising max_datagram_size to {cfg.jumbo} (jumbo-frame networks only) lifts QUIC "
            f"to {_num(jumbo)} MB/s ({jumbo / thr_t:.2g} x TCP)"
        )
    cpu_t, cpu_q = cpu_per_gb(done, "thr/tcp"), cpu_per_gb(done, "thr/quic")
    if cpu_t and cpu_q:
        said.append(
            f"Per GB moved QUIC spent {cpu_q:.1f} CPU-seconds (sender + receiver) against TCP's "
            f"{cpu_t:.2f} ({cpu_q / cpu_t:.0f} x): it is bound by per-packet CPU work in Python "
            "(aioquic and its Trio driver), not by the network"
        )
    lt, lq, lt0, lq0, lqns = (v(f"lthr/{c}") for c in ("tcp", "quic", "t0", "q0", "qns"))
    if lq:
        text = f"With {pct} loss QUIC reached {_num(lq)} MB/s through the UDP proxy"
        if lq0:
            text += f" ({lq / lq0 * 100:.0f} % of its loss-free figure there)"
        if lqns:
            text += f" and {_num(lqns)} MB/s with the kernel drop"
        if lt:
            cmp.append((f"throughput with {pct} loss", lq / lt, True))
            text += f", TCP {_num(lt)} MB/s ({lq / lt:.2g} x"
            if lt0:
                text += f"; TCP kept {lt / lt0 * 100:.0f} % of its loss-free figure there"
            text += ")"
        else:
            text += "; TCP with loss could not be measured here"
        said.append(text)
    lct, lcq = v("lconc/tcp"), v("lconc/quic")
    if lct and lcq:
        cmp.append((f"concurrent transfers with {pct} loss", lcq / lct, True))
    ll_t, ll_q = v("llat/tcp", p99=True), v("llat/quic", p99=True)
    if ll_t and ll_q:
        cmp.append((f"small-send tail latency with {pct} loss", ll_t / ll_q, False))
        said.append(
            f"With loss the p99 of a {_mib(cfg.lat_size)} send was {_num(ll_q)} us over QUIC "
            f"against {_num(ll_t)} us over TCP"
            + (" (TCP's 200 ms minimum retransmission timeout)" if ll_t > 150_000 else "")
        )
    if not cmp:
        return "No verdict: the rows it needs failed or did not run."
    wins = [what for what, r, _ in cmp if r > 1.1]
    thr_wins = [what for what, r, thr in cmp if thr and r > 1.1]
    thr_all = [what for what, _, thr in cmp if thr]
    if not wins:
        head = "TCP is the better default here, on every figure measured. "
        tail = ""
    elif len(wins) == len(cmp):
        head = "QUIC is the better default here, on every figure measured. "
        tail = ""
    elif thr_all and not thr_wins:
        head = "TCP is the better default here: it moves more bytes in every case measured. "
        tail = (
            f" QUIC does better only on {', '.join(wins)}: worth choosing per peer for "
            "latency-sensitive small messages over a lossy path, or for what TCP cannot do (a "
            "path that passes only UDP, connections that survive address changes)."
        )
    else:
        head = "Neither transport wins everywhere. "
        tail = f" QUIC does better on {', '.join(wins)}; TCP on the rest."
    return head + ". ".join(said) + "." + tail


def wrap(text: str, width: int = 100) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    only = argv
    cfg = Config.from_env(dict(os.environ))
    m = machine()
    print(
        f"tensord QUIC vs TCP bench{' (QUICK: smoke sizes, not comparable)' if cfg.quick else ''}"
    )
    print(f"machine: {describe_machine(m)}")
    tree = m["git"]
    if tree["commit"]:
        dirty = " + uncommitted changes in tensord/" if tree["tensord_dirty"] else ""
        print(f"tree: {tree['commit'][:12]}{dirty}")
    netns_reason = netns_unavailable()
    if netns_reason is None:
        remove_stale_namespaces()
    print(
        "packet loss: QUIC through tests/support/udp_proxy.py; TCP "
        + (f"n/a ({netns_reason})" if netns_reason else "in a network namespace (tc bpf drop)")
    )
    selected = [r for r in rows(cfg) if not only or any(o in f"{r.section} {r.name}" for o in only)]
    if not selected:
        print(f"no row matches {' '.join(only)!r}", file=sys.stderr)
        return 2
    done: dict[str, RowResult] = {}
    section = ""
    started = time.perf_counter()
    for row in selected:
        if row.section != section:
            section = row.section
            print(f"\n{section}")
        result = run_row(row, cfg, netns_reason)
        done[row.key] = result
        print(format_row(result), flush=True)
        if result.other_load["cores"] >= DISTURBED:
            print(f"    ^ disturbed: {describe_load(result.other_load)}", flush=True)
    lines, table = summary(cfg, done)
    print("\nQUIC vs TCP (MB/s: QUIC/TCP < 1 means QUIC is slower; us: > 1 means QUIC is slower)")
    for text in lines:
        print(f"  {text}")
    goal_lines, goals = targets(cfg, done)
    print("\nIssue 15's QUIC targets (1452-byte datagrams; CPU: sender + receiver per GB moved)")
    for text in goal_lines:
        print(f"  {text}")
    words = verdict(cfg, done)
    print(f"\nVerdict\n{wrap(words)}")
    m["loadavg_end"] = list(os.getloadavg())
    m["bench_seconds"] = time.perf_counter() - started
    report = {
        "machine": m,
        "config": asdict(cfg),
        "rows": [asdict(r) for r in done.values()],
        "summary": table,
        "targets": goals,
        "verdict": words,
    }
    with contextlib.suppress(OSError):
        RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "quic.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nmachine: {describe_machine(m)}")
    load = ", ".join(f"{x:.2f}" for x in m["loadavg_end"])
    print(f"load average at end {load}; {m['bench_seconds']:.0f} s; wrote {out}")
    failed = [r for r in done.values() if r.error and not r.error.startswith("n/a")]
    return 1 if failed else 0


if __name__ == "__main__":
    with stop_on_sigterm():
        sys.exit(main(sys.argv[1:]))
