"""Scenario 13 of the reliability report: the attacks of issue 12 against real ``tensord serve``
daemons, each a row of docs/RELIABILITY.md saying what the attacker gets now. The daemon under
attack and the checks every row ends with are in ``attacks_target.py``, the attacks on the peer
port in ``attacks_peer.py``, those on downloads, the control socket and the gateway in
``attacks_services.py``; this module runs them in order.

Every row attacks a real daemon subprocess (``tests/support/daemons.py``) and then checks the three
things the issue promises: the daemon is still alive, its peak RSS grew by less than 64 MiB
during the attack (the kernel's peak is reset first, ``/proc/PID/clear_refs``, so VmHWM is the
attack's own peak), and a legitimate peer still sends a tensor and pulls it back. The attacks
come from the suite's own hostile clients: ``RawPeer`` (tests/support/raw_peer.py) for frames,
aioquic's raw client (tests/support/quic_client.py) for QUIC, the lying HTTP server
(tests/support/lying_http.py) for downloads and registries, and the control client run as
another uid (tests/support/caller.py). With ``fuzz`` (the full mode), the stateful
fuzzers of issue 12 run again for longer (``TENSORD_FUZZ_LONG=1``), one row per file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from tensord.config import KiB, MiB

from ..cluster import write_cluster_file
from ..daemons import daemon, free_port
from ..helpers import IN_CI, fast_settings
from .attacks_peer import (
    bad_names,
    idle_strangers,
    off_loopback,
    one_byte_chunks,
    quic_strangers,
)
from .attacks_services import (
    confused_deputy,
    fifo_flood,
    lying_downloads,
    redirected_credentials,
    slow_bodies,
)
from .attacks_target import (
    DEPUTY,
    FIFO,
    IDLE,
    LIES,
    MC,
    NAMES,
    OFF_LOOPBACK,
    QUIC_CAP,
    QUIC_PUSH,
    REDIRECT,
    SCENARIO,
    SLOW,
    Target,
    attempt,
    legit_round_trip,
    target,
)
from .common import (
    ROOT,
)
from .rows import Row, junit_counts

# -- the stateful fuzzers, run longer --------------------------------------------------------


def fuzz_files() -> list[str]:
    """The stateful hostile fuzzers that exist in tests/ (each file holds a state machine)."""
    out = []
    for path in sorted((ROOT / "tests").glob("test_*hostile*.py")):
        if "RuleBasedStateMachine" in path.read_text():
            out.append(str(path.relative_to(ROOT)))
    return out


async def fuzz_row(row: Row, path: str, limit: float) -> None:
    """Run one fuzzer file under pytest with ``TENSORD_FUZZ_LONG=1``; count its tests and, from
    hypothesis's observations (one JSON line per example run), its examples."""
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
        env = {
            **os.environ,
            "TENSORD_FUZZ_LONG": "1",
            # Examples are counted from hypothesis's observations, kept apart from the
            # repository's .hypothesis (without the coverage tracing they could bring).
            "HYPOTHESIS_STORAGE_DIRECTORY": str(Path(tmp) / "hypothesis"),
            "HYPOTHESIS_EXPERIMENTAL_OBSERVABILITY_NOCOVER": "1",
        }
        with trio.move_on_after(limit) as scope:
            proc = await trio.run_process(
                [*cmd, f"--junitxml={xml}"],
                cwd=ROOT,
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        if scope.cancelled_caught:
            row.check(False, f"pytest ran past {limit:g} s and was stopped")
            row.outcome = f"stopped after {limit:g} s"
            return
        counts = junit_counts(xml)
        examples: Counter[str] = Counter()
        for observed in (Path(tmp) / "hypothesis" / "observed").glob("*testcases.jsonl"):
            for line in observed.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if doc.get("type") == "test_case":
                        examples[str(doc.get("status"))] += 1
    out = proc.stdout.decode(errors="replace").strip()
    row.check(proc.returncode == 0, f"pytest exited {proc.returncode}: {out.splitlines()[-1:]}")
    row.check(counts["passed"] > 0, "no test passed")
    row.check(not examples["failed"], f"{examples['failed']} failing examples")
    if counts["skipped"] and IN_CI:
        row.check(False, f"{counts['skipped']} skipped under CI")
    row.tried = f"{sum(counts.values())} tests, {sum(examples.values())} examples"
    row.outcome = (
        ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + "; examples: "
        + ", ".join(f"{v} {k}" for k, v in sorted(examples.items()))
    )
    row.figures.update(examples=dict(examples), tests=dict(counts))


# -- the scenario ----------------------------------------------------------------------------


async def attacks(
    *,
    name_rounds: int = 20,
    mc_attempts: int = 5,
    tensor: int = 4 * MiB,
    strangers: int = 64,
    max_connections: int = 48,
    max_unauthenticated: int = 16,
    quic_clients: int = 3,
    quic_streams: int = 64,
    quic_per_stream: int = 512 * KiB,
    quic_limit: int = 8,
    quic_more: int = 12,
    lie_bytes: int = 40 * MiB,
    fifo_requests: int = 64,
    slow_bodies_n: int = 24,
    read_timeout: float = 1.0,
    fuzz: bool = False,
    fuzz_limit: float = 1800.0,
) -> list[Row]:
    """Issue 12's attacks, each against a real ``tensord serve``, and what the attacker gets
    now: requests for bad names, a one-byte max chunk, idle strangers holding every slot,
    unauthenticated QUIC connections pushing data, downloads and registries that lie (40 MiB
    for a 1000-byte layer, a redirect asking for credentials), control requests naming a
    FIFO, a group member asking for a root-only file, slow bodies, a listener off loopback
    without a secret. After each the daemon must be alive, its peak RSS within 64 MiB of
    before, and a legitimate peer served. With ``fuzz``, the stateful hostile fuzzers run
    with ``TENSORD_FUZZ_LONG=1``."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="tensord-attacks-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # the group member of row h reaches its daemon's socket

        def home(name: str) -> Path:
            path = root / name
            path.mkdir(mode=0o755)
            return path

        async def open_node() -> None:
            async with target(home("open"), secret=False) as t:
                await attempt(rows, NAMES, lambda row: bad_names(row, t, name_rounds))
                await attempt(rows, MC, lambda row: one_byte_chunks(row, t, mc_attempts, tensor))

        async def idle() -> None:
            caps = {
                "max_connections": max_connections,
                "max_unauthenticated": max_unauthenticated,
                "handshake_timeout": 60.0,
            }
            async with target(home("idle"), cluster={"transfer": caps}) as t:
                await attempt(
                    rows,
                    IDLE,
                    lambda row: idle_strangers(
                        row, t, strangers, max_connections, max_unauthenticated
                    ),
                )

        async def quic() -> None:
            await quic_strangers(
                rows,
                home("quic"),
                quic_clients,
                quic_streams,
                quic_per_stream,
                quic_limit,
                quic_more,
            )

        async def downloads() -> None:
            dl = home("downloads")
            creds = dl / "credentials.json"
            creds.write_text('{"registries": {}}')
            async with target(
                dl,
                cluster={"downloads": {"credentials_file": str(creds)}},
                env={"TENSORD_DOWNLOAD_MAX_BYTES": str(MiB)},
            ) as t:
                await attempt(rows, LIES, lambda row: lying_downloads(row, t, lie_bytes, MiB))
                await attempt(rows, REDIRECT, lambda row: redirected_credentials(row, t, creds))

        async def fifo() -> None:
            async with target(home("fifo")) as t:
                await attempt(rows, FIFO, lambda row: fifo_flood(row, t, fifo_requests))

        async def deputy() -> None:
            if os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK):
                reason = "needs root (a client run as uid 65534) and /usr/bin/python3"
                rows.append(Row(SCENARIO, DEPUTY, skipped=reason))
                return
            async with target(home("deputy")) as t:
                await attempt(rows, DEPUTY, lambda row: confused_deputy(row, t))

        async def slow() -> None:
            from ..ollama_backend import BackendConfig, ollama_backend

            async with ollama_backend(BackendConfig(models=["tiny:latest"], interval=0.0)) as b:
                port = free_port()
                cluster = {
                    "nodes": {
                        "victim": port,
                        "gpu": {"addr": f"127.0.0.1:{free_port()}", "ollama": b.url},
                    },
                    "transfer": {"peer_check_interval": 60},
                    "control": {"read_timeout": read_timeout, "max_connections": 4},
                    "gateway": {"read_timeout": read_timeout, "max_connections": 4},
                }
                async with _gateway_target(home("slow"), port, cluster) as (t, url):
                    await attempt(
                        rows,
                        SLOW,
                        lambda row: slow_bodies(row, t, url, slow_bodies_n, read_timeout),
                    )

        async def exposed() -> None:
            await attempt(rows, OFF_LOOPBACK, off_loopback)

        await guarded(rows, [NAMES, MC], open_node)
        await guarded(rows, [IDLE], idle)
        await guarded(rows, [QUIC_PUSH, QUIC_CAP], quic)
        await guarded(rows, [LIES, REDIRECT], downloads)
        await guarded(rows, [FIFO], fifo)
        await guarded(rows, [DEPUTY], deputy)
        await guarded(rows, [SLOW], slow)
        await guarded(rows, [OFF_LOOPBACK], exposed)
    if fuzz:
        for path in fuzz_files():
            await attempt(
                rows,
                f"{path}: the stateful fuzzer, run longer (TENSORD_FUZZ_LONG=1)",
                lambda row, path=path: fuzz_row(row, path, fuzz_limit),  # type: ignore[misc]
            )
    return rows


async def guarded(rows: list[Row], faults: list[str], group: Callable[[], Awaitable[None]]) -> None:
    """Run a group of rows sharing a daemon; if the group itself fails (the daemon did not
    start, say), each of its rows that did not report is a failed row - the next group runs."""
    first = len(rows)
    try:
        await group()
    except Exception as exc:
        traceback.print_exc()
        done = {r.fault for r in rows[first:]}
        why = f"{type(exc).__name__}: {exc}"
        for fault in faults:
            if fault not in done:
                rows.append(Row(SCENARIO, fault, outcome=f"error: {why}", problems=[why]))


@asynccontextmanager
async def _gateway_target(
    home: Path, port: int, cluster: dict[str, Any]
) -> AsyncIterator[tuple[Target, str]]:
    """A daemon of a two-node cluster file whose second node is an Ollama backend: it runs
    the gateway too. Yields it and the gateway's URL."""
    path = write_cluster_file(home / "cluster.json", **cluster)
    async with daemon({"TENSORD_NODE_ID": "victim"}, "--cluster", str(path), home=home) as d:
        end = await d.wait_for("gateway on http://")
        await d.wait_for("control socket")
        url = d.text[end - len("http://") :].split(",")[0].strip()
        t = Target(d, port, fast_settings(max_retries=10), home)
        problem = await legit_round_trip(t, "warm-up")
        if problem:
            raise RuntimeError(f"the daemon under attack did not serve a peer at all: {problem}")
        yield t, url
