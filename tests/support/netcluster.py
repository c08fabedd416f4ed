"""Separate hosts on one machine: a cluster of real daemons in network namespaces, for the tests
and the bench of issue 14 (see DESIGN.md, "Separate hosts on one machine").

Each host is a network namespace with ``lo`` up and one veth (``eth0``, an address on the private
/24 :data:`SUBNET`) whose other end sits in a bridge of a dedicated bridge namespace, so the root
namespace gets no device, no address and no route. Each host's egress is shaped by ``tbf``. One
more namespace, the registry host, runs the Debian ``docker-registry`` on its own loopback behind
an nginx reverse proxy on its bridge address; nginx's access log records the bytes of every
reply (what the registry served), and the registry host's egress (its "uplink") is shaped more
slowly. A real ``tensord serve`` runs in each host namespace (``ip netns exec``) with a shared
cluster file and the test run's secret; its control socket is a file, so the CLI and the Client
reach it from the root namespace with no address.

Namespace names carry a per-run prefix (``tdn<pid>x<random>-``) so parallel runs never collide;
namespaces of runs whose process is gone (a killed test run) are removed, with what still runs
in them, the next time a cluster is made. Everything a cluster made is removed on exit, whatever
the test did.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import trio

from tensord.control.client import AsyncClient

from .cluster import write_cluster_file
from .counting_proxy import Served, proxy_conf, read_served
from .daemons import Daemon, daemon
from .helpers import require, wait_serving
from .registry import CONFIG as REGISTRY_CONFIG
from .registry import Registry

T = TypeVar("T")

#: Every namespace this module makes is named ``PREFIX<pid>x<hex>-<role>``.
PREFIX = "tdn"
#: The hosts' /24 (the namespaces are private to a run, so every run may use the same one).
SUBNET = "10.77.0"
REGISTRY_ADDR = f"{SUBNET}.2"
REGISTRY_PORT = 5000
PEER_PORT = 7070
DEV = "eth0"
MB = 1_000_000
NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_STALE = re.compile(rf"^{PREFIX}(\d+)x[0-9a-f]+-")

# -- namespaces, links and shaping (also used by the chaos scenario of tests/support/chaos) -----


def netns_unavailable() -> str | None:
    """Why network namespaces with veth pairs and ``tbf`` cannot be set up here (None: they
    can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no {tool} command (iproute2)"
    name = f"{PREFIX}{os.getpid()}x{secrets.token_hex(2)}-probe"
    p = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if p.returncode != 0:
        return f"ip netns add failed: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    return None


def ip(*args: str) -> str:
    """``ip ARGS``, checked; its output."""
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def in_ns(ns: str, *cmd: str) -> str:
    """``CMD`` inside namespace ``ns`` (``ip netns exec``), checked; its output."""
    p = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {ns}: {p.stderr.strip()}")
    return p.stdout


def rate_bytes(rate: int | str) -> int:
    """Bytes per second of ``rate``: an int already is; else tc's spelling ("200mbit")."""
    if isinstance(rate, int):
        return rate
    m = re.fullmatch(r"(\d+)([kmg]?)bit", rate)
    if m is None:
        raise ValueError(f"not a rate: {rate!r}")
    return int(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2)] // 8


def shape(ns: str, dev: str, rate: int | str) -> None:
    """Limit what ``dev`` in ``ns`` sends to ``rate`` (``tbf``; bytes/s or tc's spelling). The
    bucket holds 4 ms at the rate (at least 32 KiB): enough for the timer tick, small enough
    that a measured second is the rate."""
    per_second = rate_bytes(rate)
    burst = max(32 * 1024, per_second // 250)
    in_ns(ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{per_second * 8}bit",
          "burst", str(burst), "latency", "50ms")  # fmt: skip


def qdisc(ns: str, dev: str = DEV) -> str:
    """``tc qdisc show dev DEV`` in ``ns``: the shaping in place."""
    return in_ns(ns, "tc", "qdisc", "show", "dev", dev)


def tx_bytes(ns: str, dev: str = DEV) -> int:
    """Bytes ``dev`` has sent, read from ``/sys/class/net/DEV/statistics`` inside ``ns``."""
    return int(in_ns(ns, "cat", f"/sys/class/net/{dev}/statistics/tx_bytes"))


def run_prefix() -> str:
    """A fresh per-run prefix for namespace names: this process's id and a random tag."""
    return f"{PREFIX}{os.getpid()}x{secrets.token_hex(2)}-"


def delete_namespace(ns: str) -> None:
    """Kill what runs in ``ns`` and remove it (its devices go with it); no error if absent."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def remove_stale_namespaces() -> list[str]:
    """Remove the namespaces of earlier runs whose process is gone; their names."""
    stale = []
    for entry in NETNS_DIR.iterdir() if NETNS_DIR.is_dir() else ():
        m = _STALE.match(entry.name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        delete_namespace(entry.name)
        stale.append(entry.name)
    return stale


@contextlib.contextmanager
def namespaces(*roles: str) -> Iterator[dict[str, str]]:
    """A fresh namespace per role (``lo`` up), named with a per-run prefix: yields role -> name,
    and removes them all (with what runs in them) on exit, whatever happened."""
    remove_stale_namespaces()
    prefix = run_prefix()
    made: dict[str, str] = {}
    try:
        for role in roles:
            made[role] = prefix + role
            ip("netns", "add", made[role])
            ip("-n", made[role], "link", "set", "lo", "up")
        yield made
    finally:
        for ns in made.values():
            delete_namespace(ns)


def link(ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
    """A veth pair from ``dev_a`` in ``ns_a`` to ``dev_b`` in ``ns_b``, both up (no device is
    ever in the root namespace)."""
    ip("link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
    ip("-n", ns_a, "link", "set", dev_a, "up")
    ip("-n", ns_b, "link", "set", dev_b, "up")


def address(ns: str, dev: str, addr: str) -> None:
    ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)


def in_namespace(ns: str, fn: Callable[[], T]) -> T:
    """``fn()`` in a fresh thread that has entered network namespace ``ns`` (sockets it opens
    live there): how the test process talks to the registry host without an address of its
    own. The thread ends with the call, so no thread of this process stays in ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: list[T] = []
    err: list[BaseException] = []

    def body() -> None:
        try:
            with open(NETNS_DIR / ns) as f:
                if libc.setns(f.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            out.append(fn())
        except BaseException as e:  # re-raised in the caller
            err.append(e)

    t = threading.Thread(target=body, name=f"in-{ns}")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


# -- the registry host ------------------------------------------------------------------------


@dataclass
class Model:
    """A model pushed into the registry host: its reference (as the hosts reach it) and blobs."""

    ref: str
    manifest: dict[str, Any]
    blobs: dict[str, bytes]  # digest -> content: the config and the layers

    @property
    def size(self) -> int:
        """Bytes of all its blobs: what one node's pull reads from the registry (manifest aside)."""
        return sum(len(b) for b in self.blobs.values())


@dataclass
class RegistryHost:
    ns: str
    dir: Path
    addr: str = REGISTRY_ADDR
    port: int = REGISTRY_PORT
    upstream: int = REGISTRY_PORT + 1

    @property
    def host(self) -> str:
        """``ADDR:PORT`` as the hosts reach it (through nginx)."""
        return f"{self.addr}:{self.port}"

    def served(self) -> list[Served]:
        """Every request nginx answered, in order."""
        return read_served(self.dir / "nginx" / "access.log")

    def bytes_served(self, blobs_only: bool = False) -> int:
        """Reply body bytes the registry served to the hosts (all requests, or blob GETs)."""
        return sum(s.body for s in self.served() if not blobs_only or "/blobs/" in s.uri)

    def push_model(
        self, repo: str, tag: str, sizes: Sequence[int], seed: int = 0, *, oci: bool = False
    ) -> Model:
        """Push a model of random layers of ``sizes`` bytes (plus a config blob and the
        manifest), straight to the registry on its host's loopback: nothing is logged by nginx
        and nothing crosses the shaped uplink. ``oci``: an OCI manifest (what skopeo copies
        whatever the layers' media types) instead of Docker's v2 schema 2."""
        rng = np.random.default_rng(seed)
        layers = [rng.bytes(size) for size in sizes]
        reg = Registry(self.upstream)
        manifest = in_namespace(self.ns, lambda: reg.push_model(repo, tag, layers, oci=oci))
        config = manifest["config"]
        assert isinstance(config, dict)
        blobs = {"sha256:" + hashlib.sha256(d).hexdigest(): d for d in layers}
        got = in_namespace(self.ns, lambda: _fetch(reg, repo, config["digest"]))
        blobs[config["digest"]] = got
        return Model(f"http://{self.host}/{repo}:{tag}", manifest, blobs)


def _fetch(reg: Registry, repo: str, digest: str) -> bytes:
    with reg.client() as c:
        return c.get(f"/v2/{repo}/blobs/{digest}").content


def _serving(proc: subprocess.Popen[bytes], log: Path, ns: str, url: str) -> None:
    wait_serving(lambda: in_namespace(ns, lambda: httpx.get(url, timeout=1)), proc, log, 20)


@contextlib.contextmanager
def registry_host(ns: str, tmp: Path) -> Iterator[RegistryHost]:
    """``docker-registry`` on ``ns``'s loopback behind nginx on its bridge address."""
    binary = shutil.which("docker-registry")
    require(
        binary is not None, "docker-registry is not installed (apt-get install docker-registry)"
    )
    web = shutil.which("nginx") or "/usr/sbin/nginx"
    require(Path(web).exists(), "nginx is not installed (apt-get install nginx-light)")
    assert binary is not None
    reg = RegistryHost(ns, tmp)
    (tmp / "nginx" / "tmp").mkdir(parents=True)
    conf = REGISTRY_CONFIG.format(root=tmp / "data", port=reg.upstream, auth="")
    (tmp / "config.yml").write_text(conf)
    (tmp / "nginx" / "nginx.conf").write_text(
        proxy_conf(tmp / "nginx", reg.host, f"127.0.0.1:{reg.upstream}")
    )
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(tmp / "log", "wb"))
        for cmd, probe, errlog in (
            ([binary, "serve", str(tmp / "config.yml")], reg.upstream, tmp / "log"),
            (
                [web, "-c", str(tmp / "nginx" / "nginx.conf"), "-e", str(tmp / "nginx/error.log")],
                None,
                tmp / "nginx" / "error.log",
            ),
        ):
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=log, stderr=log)
            stack.callback(_stop, proc)
            where = f"127.0.0.1:{probe}" if probe else reg.host
            _serving(proc, errlog, ns, f"http://{where}/v2/")
        # The readiness probe is not a request a test should count.
        (tmp / "nginx" / "access.log").write_text("")
        yield reg


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the hosts and their daemons --------------------------------------------------------------


@dataclass
class Host:
    """One "machine": a namespace, its address, and the home of its daemon."""

    name: str
    ns: str
    addr: str
    home: Path
    daemon: Daemon | None = None
    _stop: trio.Event = field(default_factory=trio.Event, repr=False)
    _stopped: trio.Event = field(default_factory=trio.Event, repr=False)

    @property
    def socket(self) -> Path:
        """The daemon's control socket (a file: reachable from the root namespace)."""
        return self.home / "control.sock"

    @property
    def peer_addr(self) -> str:
        return f"{self.addr}:{PEER_PORT}"

    def tx_bytes(self) -> int:
        """Bytes this host has sent on its link."""
        return tx_bytes(self.ns)

    def blob_path(self, digest: str) -> Path:
        return self.home / "state" / "models" / "blobs" / digest.replace(":", "-")

    def corrupt_blob(self, digest: str, offset: int) -> None:
        """Flip the byte at ``offset`` of the blob this host stored (a disk going bad under a
        committed blob: what the host then serves its peers is wrong)."""
        with open(self.blob_path(digest), "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))

    def stored_blobs_exact(self) -> dict[str, bool]:
        """Every blob file this host stored: does its content hash to its name?"""
        blobs = self.home / "state" / "models" / "blobs"
        out = {}
        for path in sorted(blobs.iterdir()) if blobs.is_dir() else ():
            if path.name.startswith("sha256-") and path.is_file():
                digest = path.name.replace("-", ":", 1)
                out[digest] = self.blob_sha256(digest) == digest
        return out

    def blob_sha256(self, digest: str) -> str | None:
        """``sha256:HEX`` of the blob this host stored under ``digest`` (None: absent)."""
        path = self.blob_path(digest)
        if not path.exists():
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return "sha256:" + h.hexdigest()


@dataclass
class NetCluster:
    """The hosts, the registry host, and what a test does to their daemons. Start, kill and
    restart daemons from any task: each daemon lives in a task of the cluster's nursery."""

    hosts: list[Host]
    registry: RegistryHost
    bridge_ns: str
    dir: Path
    link_rate: int | str
    uplink_rate: int | str
    sections: dict[str, Any]
    env: dict[str, str]
    _nursery: trio.Nursery = field(repr=False)

    @property
    def cluster_file(self) -> Path:
        return self.dir / "cluster.json"

    def __getitem__(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def write_cluster_file(self, members: Sequence[Host] | None = None) -> Path:
        """The shared cluster file naming ``members`` (default: every host) by address, with
        quick peer checks and retries and the cluster's ``sections``."""
        nodes = {h.name: h.peer_addr for h in (self.hosts if members is None else members)}
        base: dict[str, Any] = {
            "name": "netcluster",
            "transfer": {"peer_check_interval": 0.2},
            "tensor_protocol": {"retry_base_delay": 100, "max_retries": 8},
        }
        return write_cluster_file(self.cluster_file, nodes, **(base | self.sections))

    async def start(self, host: Host, env: Mapping[str, str] | None = None) -> Daemon:
        """Start ``host``'s daemon (in its namespace) and wait for its control socket."""
        assert host.daemon is None, f"{host.name}'s daemon is running"
        full = {
            "TENSORD_NODE_ID": host.name,
            "TENSORD_CLUSTER_FILE": str(self.cluster_file),
            **self.env,
            **(env or {}),
        }
        d: Daemon = await self._nursery.start(self._run, host, full)
        await d.wait_for("control socket")
        return d

    async def _run(
        self, host: Host, env: dict[str, str], task_status: trio.TaskStatus[Daemon]
    ) -> None:
        """A daemon's life, in the cluster's nursery (so any task may start or stop it)."""
        host._stop, host._stopped = trio.Event(), trio.Event()
        try:
            async with daemon(env, home=host.home, wrapper=("ip", "netns", "exec", host.ns)) as d:
                host.daemon = d
                task_status.started(d)
                await host._stop.wait()
        finally:
            host.daemon = None
            host._stopped.set()

    async def stop(self, host: Host) -> None:
        """Stop ``host``'s daemon (SIGTERM; it drains as in production)."""
        if host.daemon is not None:
            host._stop.set()
            await host._stopped.wait()

    async def kill(self, host: Host) -> None:
        """``kill -9`` ``host``'s daemon."""
        d = host.daemon
        assert d is not None, f"{host.name}'s daemon is not running"
        d.terminated = True
        d.proc.kill()
        await d.proc.wait()
        await self.stop(host)

    async def restart(self, host: Host) -> Daemon:
        """``kill -9`` then start again on the same state (a crash and a restart)."""
        await self.kill(host)
        return await self.start(host)

    def reload(self, host: Host) -> None:
        """SIGHUP: the daemon rereads the cluster file."""
        assert host.daemon is not None
        host.daemon.proc.send_signal(signal.SIGHUP)

    async def wait_peers_up(self, host: Host, peers: Sequence[Host] | None = None) -> None:
        """Until ``host``'s daemon reports each of ``peers`` (default: the others) up."""
        want = {p.name for p in (peers if peers is not None else self.hosts) if p is not host}

        async with AsyncClient(host.socket) as client:

            async def all_up() -> bool:
                return want <= {p["id"] for p in await client.peers() if p["state"] == "up"}

            async with client.subscribe() as events:
                if await all_up():
                    return
                async for ev in events:
                    if ev["kind"] == "peer" and await all_up():
                        return
        raise AssertionError(f"{host.name}'s events stream ended")

    async def on_event(
        self,
        host: Host,
        match: Callable[[dict[str, Any]], bool],
        then: Callable[[dict[str, Any]], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Await ``then(ev)`` on the first event of ``host``'s events stream (control API, JSON
        form) that ``match`` accepts. Start it with ``nursery.start``: it is subscribed when
        that returns, so what the caller does next cannot slip by unseen."""
        async with AsyncClient(host.socket) as client, client.subscribe() as events:
            task_status.started()
            async for ev in events:
                if match(ev):
                    await then(ev)
                    return
        raise AssertionError(f"{host.name}'s events stream ended")

    def total_tx(self) -> dict[str, int]:
        """Bytes each host (and the registry host) has sent on its link."""
        out = {h.name: h.tx_bytes() for h in self.hosts}
        out["registry"] = tx_bytes(self.registry.ns)
        return out


@contextlib.asynccontextmanager
async def netcluster(
    tmp: Path,
    hosts: int = 4,
    *,
    link_rate: int | str = 25 * MB,
    uplink_rate: int | str = 10 * MB,
    sections: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    start: bool = True,
) -> AsyncIterator[NetCluster]:
    """``hosts`` hosts (``h0``...) and a registry host on one bridge, each host's egress shaped
    to ``link_rate`` and the registry's to ``uplink_rate`` (bytes/s, or tc's "200mbit"). With
    ``start``, each host's daemon is started (cluster file: every host, plus ``sections``;
    daemon environment plus ``env``) and has seen every peer up. On exit the daemons stop and
    every namespace goes, whatever happened inside."""
    reason = netns_unavailable()
    require(reason is None, reason or "")
    names = [f"h{i}" for i in range(hosts)]
    with namespaces("br", "reg", *names) as ns:
        ip("-n", ns["br"], "link", "add", "br0", "type", "bridge")
        ip("-n", ns["br"], "link", "set", "br0", "up")
        made = []
        for i, role in enumerate(["reg", *names]):
            link(ns[role], DEV, ns["br"], f"p{i}")
            ip("-n", ns["br"], "link", "set", f"p{i}", "master", "br0")
            addr = REGISTRY_ADDR if role == "reg" else f"{SUBNET}.{11 + i}"
            address(ns[role], DEV, addr)
            shape(ns[role], DEV, uplink_rate if role == "reg" else link_rate)
            if role != "reg":
                home = tmp / role
                home.mkdir()
                made.append(Host(role, ns[role], addr, home))
        (tmp / "registry").mkdir()
        with registry_host(ns["reg"], tmp / "registry") as reg:
            async with trio.open_nursery() as nursery:
                c = NetCluster(made, reg, ns["br"], tmp, link_rate, uplink_rate,
                               dict(sections or {}), dict(env or {}), nursery)  # fmt: skip
                c.write_cluster_file()
                try:
                    if start:
                        for h in c.hosts:
                            await c.start(h)
                        with trio.fail_after(60):
                            for h in c.hosts:
                                await c.wait_peers_up(h)
                    yield c
                finally:
                    with trio.CancelScope(shield=True):
                        for h in c.hosts:
                            await c.stop(h)


def shaping(c: NetCluster) -> dict[str, str]:
    """Each namespace's qdisc line (for reports)."""
    out = {h.name: qdisc(h.ns).strip() for h in c.hosts}
    out["registry"] = qdisc(c.registry.ns).strip()
    return out
