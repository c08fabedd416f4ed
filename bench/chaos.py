"""Faults and bad input against real tensord nodes: the runner of the reliability report.

Usage (from the repository root; ``make chaos`` runs the full mode)::

    .venv/bin/python bench/chaos.py                 # every scenario at full size (~10 min)
    .venv/bin/python bench/chaos.py --quick         # the sizes of tests/test_reliability.py
    .venv/bin/python bench/chaos.py --only kills    # some scenarios (the report is not rewritten)

Both modes rewrite ``docs/RELIABILITY.md`` (``--output PATH`` elsewhere, ``--no-write`` not at
all). The exit status is 1 if a row failed (data lost, a duplicate, a check that did not hold, an
error), if a row marked as a known bug passed (fixed? then remove the mark), or if a scenario
was skipped under ``CI=true``.

The scenarios themselves live in ``tests/support/chaos/`` (``scenarios.py`` names them, with
the ``FULL`` sizes run here and the ``QUICK`` ones that ``tests/test_reliability.py`` and
``--quick`` run); this file only runs them, prints their rows and renders the report. It
imports from ``tests.support``, never the other way round.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tensord.config import GiB, KiB  # noqa: E402
from tests.support.chaos.rows import Row, fmt_bytes  # noqa: E402
from tests.support.chaos.scenarios import (  # noqa: E402
    BUG_NAMES,
    FOUND_AND_FIXED,
    FULL,
    QUICK,
    SCENARIOS,
)
from tests.support.helpers import IN_CI  # noqa: E402

DOC = ROOT / "docs" / "RELIABILITY.md"

#: Seconds a scenario may run (full mode; half that in quick mode). The attacks run the stateful
#: fuzzers for long in full mode (the peer fuzzer alone takes ~8 min on 2 cores).
LIMITS = {"kills": 600.0, "load": 300.0, "sender": 300.0, "attacks": 4000.0}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * KiB
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "tensord"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram": ram,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": f"{commit or 'unknown'}{' with uncommitted changes in tensord/' if dirty else ''}",
        "root": os.geteuid() == 0,
        "loadavg": os.getloadavg(),
    }


async def run_all(names: list[str], quick: bool) -> list[Row]:
    rows: list[Row] = []
    params = QUICK if quick else FULL
    for name in names:
        fn = SCENARIOS[name]
        print(f"== {name}: {fn.__name__}({params[name]})", flush=True)
        started = time.perf_counter()
        try:
            with trio.fail_after(LIMITS.get(name, 300.0) * (0.5 if quick else 1.0)):
                got = await fn(**params[name])
        except Exception as exc:  # one scenario's failure is a row; the others still run
            traceback.print_exc()
            got = [
                Row(
                    name,
                    fn.__doc__.strip().splitlines()[0] if fn.__doc__ else name,
                    outcome=f"error: {type(exc).__name__}: {exc}",
                    problems=[f"{type(exc).__name__}: {exc}"],
                    known_bug=BUG_NAMES.get(name, ""),
                )
            ]
        for row in got:
            print(f"   [{row.status}] {row.fault}: {row.tried}: {row.outcome}", flush=True)
            if row.resent != "-":
                print(f"      re-sent: {row.resent}", flush=True)
            if row.figures:
                print(f"      {json.dumps(row.figures, default=_num)}", flush=True)
            for p in row.problems:
                print(f"      problem: {p}", flush=True)
        print(f"   ({time.perf_counter() - started:.1f} s)", flush=True)
        rows.extend(got)
    return rows


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(rows: list[Row], m: dict[str, Any], quick: bool, seconds: float) -> str:
    mode = "quick (shortened: `--quick`)" if quick else "full (`make chaos`)"
    out = [
        "# Reliability: faults and bad input, with nothing lost",
        "",
        "<!-- Generated by bench/chaos.py from the scenarios in tests/support/chaos/; edit those, "
        "not this file. -->",
        "",
        "tensord moves tensors over a chunk protocol with a crc32c per chunk, acknowledgements,",
        "retries with backoff and resume from the last good chunk, also across restarts of the",
        "receiver (its store checkpoints progress to disk). This report is what happens when",
        "things go wrong on purpose: connections cut at random bytes, chunk payloads corrupted, a",
        "receiver killed with SIGKILL again and again, a sender restarted, the disk filling up,",
        "fifty peers at once, hostile and unauthenticated peers, two hosts (network",
        "namespaces) whose link goes down, QUIC paths that lose datagrams, go dark and",
        "rebind, and the attacks of issue 12 (hostile peers, registries, download servers and",
        "local clients: after each the daemon must live on, its peak RSS within 64 MiB of",
        "before, and serve a legitimate peer). Receivers are real `tensord serve` processes; what",
        "they stored is read back from their store and compared by SHA-256 with what was sent,",
        "and duplicates are counted from the arrivals in their logs. **Data lost must be 0.**",
        "",
        "Regenerate with `make chaos` (full sizes, several minutes; `bench/chaos.py --quick` for",
        "the shortened form). CI runs every scenario in the shortened form as",
        "`tests/test_reliability.py`. Faults come from the test-owned proxies "
        "`tests/support/tcp_proxy.py`",
        "(TCP) and `tests/support/udp_proxy.py` (QUIC).",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram'] / GiB:.1f} GiB RAM, {m['kernel']},",
        f"  Python {m['python']}{', as root' if m['root'] else ''}",
        f"- Date: {m['date']}; code: {m['git']}",
        f"- Mode: {mode}; the run took {seconds / 60:.1f} min; load average at the start "
        + ", ".join(f"{x:.2f}" for x in m["loadavg"])
        + " (throughput and timings vary with what else the machine runs)",
        "",
        "## Every fault and bad input tried",
        "",
        "| Scenario | Fault or bad input | Tried | Outcome | Bytes re-sent | Data lost | "
        "Dupl. | Status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        outcome = r.outcome if not r.skipped else f"skipped: {r.skipped}"
        if r.problems and r.status != "known bug":
            outcome += " **Problems:** " + "; ".join(r.problems)
        out.append(
            "| "
            + " | ".join(
                _cell(x)
                for x in (
                    r.scenario,
                    r.fault,
                    r.tried,
                    outcome,
                    r.resent,
                    r.lost,
                    r.duplicates,
                    f"**{r.status}**" if r.status != "pass" else r.status,
                )
            )
            + " |"
        )
    lost = sum(r.lost for r in rows)
    out += ["", f"Data lost over the whole run: **{lost}**.", ""]
    out += ["## Figures", "", *figure_lines(rows), ""]
    out += ["<details><summary>Every row's raw figures and run time</summary>", ""]
    for r in rows:
        line = f"- {r.scenario}, {r.fault} ({r.seconds:.1f} s)"
        if r.notes:
            line += f": {r.notes}"
        if r.figures:
            line += " `" + json.dumps(r.figures, default=_num) + "`"
        out.append(line)
    out += ["", "</details>", ""]
    bugs = [r for r in rows if r.known_bug]
    if bugs:
        out += [
            "",
            "## Known bugs found by this suite",
            "",
            "Each is marked in `BUG_NAMES` (`tests/support/chaos/scenarios.py`): its row is",
            "expected to fail its checks; once the bug is fixed it shows **FIXED?** and the run",
            "fails until the mark is removed.",
            "",
        ]
        for r in bugs:
            out.append(f"- **{r.scenario}** [{r.status}]: {r.known_bug}. Observed: {r.outcome}.")
    out += [
        "",
        "## Bugs this suite found, now fixed",
        "",
        "Each scenario below is an ordinary check now (a row above and a test in",
        "`tests/test_reliability.py`):",
        "",
        *(f"- {bug}." for bug in FOUND_AND_FIXED),
    ]
    out += [
        "",
        "## How each scenario works",
        "",
    ]
    for name, fn in SCENARIOS.items():
        doc = " ".join((fn.__doc__ or "").split())
        out.append(f"- `{fn.__name__}` ({name}): {doc}")
    out.append("")
    return "\n".join(out)


def figure_lines(rows: list[Row]) -> list[str]:
    """The headline figures, readable: bytes re-sent, load throughput and memory."""
    out: list[str] = []

    def find(prefix: str) -> Row | None:
        return next((r for r in rows if r.scenario.startswith(prefix) and r.figures), None)

    if (r := find("1.")) is not None:
        f = r.figures
        extra = f["wire_bytes_upstream"] - f["tensor_bytes"]
        out.append(
            f"- **Bytes re-sent under cuts and corruption**: {fmt_bytes(extra)} through the "
            f"proxy beyond {fmt_bytes(f['tensor_bytes'])} of tensors "
            f"({extra / f['tensor_bytes']:.2%}) for {f['cuts']} cuts and "
            f"{f['chunks_corrupted']} corrupted chunks of {fmt_bytes(f['chunk_size'])}; the "
            f"senders re-sent {fmt_bytes(f['resent_payload_bytes'])} of chunk payload."
        )
    if (r := find("2.")) is not None:
        f = r.figures
        kills = max(1, f["kills"])
        out.append(
            f"- **Bytes re-sent after kill -9**: {fmt_bytes(f['bytes_resent'])} over "
            f"{f['kills']} kills of a {fmt_bytes(f['size'])} transfer "
            f"({fmt_bytes(f['bytes_resent'] / kills)} per kill; the bound - acknowledged but "
            f"not yet checkpointed, plus the window in flight - was "
            f"{fmt_bytes(f['resend_bound'])})."
        )
    if (r := find("3.")) is not None:
        f = r.figures
        out.append(
            f"- **Sender restart**: the abandoned partial held {fmt_bytes(f['partial_bytes'])}; "
            "those bytes were sent again by the restarted sender."
            + (
                f" The running receiver removed it {f['running_expiry_seconds']:.0f} s after "
                "the next receive."
                if "running_expiry_seconds" in f
                else ""
            )
        )
    if (r := find("5.")) is not None:
        f = r.figures
        out.append(
            f"- **Load**: {f['peers']} peers, {f['transfers']} transfers, "
            f"{fmt_bytes(f['bytes'])} in {f['seconds']:.0f} s: "
            f"{f['throughput_bytes_per_s'] / 1e6:.0f} MB/s, "
            f"{f['transfers'] / f['seconds']:.0f} transfers/s, latency p50 "
            f"{f['latency_p50_s'] * 1e3:.0f} ms / p99 {f['latency_p99_s'] * 1e3:.0f} ms, "
            f"{f['retries']} retries. Every receive is committed to disk (fsync) before the "
            "sender hears Stored."
        )
        out.append(
            f"- **Receiver memory under load**: peak RSS (VmHWM) {fmt_bytes(f['rss_peak_vmhwm'])}"
            f", idle {fmt_bytes(f['rss_idle'])}, at the end {fmt_bytes(f['rss_end'])} "
            f"(anonymous {fmt_bytes(f['rss_anon_end'])}; the rest is the store's mapped files)."
        )
    if (r := find("7.")) is not None:
        f = r.figures
        out.append(
            f"- **Separate hosts**: {fmt_bytes(f['size'])} in {f['seconds']:.1f} s "
            f"({f['size'] / f['seconds'] / 1e6:.1f} MB/s including the outage), "
            f"{f['retries']} retries."
        )
    attacked = [r for r in rows if r.scenario.startswith("13.") and "rss_growth" in r.figures]
    if attacked:
        worst = max(attacked, key=lambda r: r.figures["rss_growth"])
        out.append(
            f"- **Daemon memory under the attacks of issue 12**: peak RSS grew by at most "
            f"{fmt_bytes(max(worst.figures['rss_growth'], 0))} during any of {len(attacked)} "
            f"attacks (the limit is 64 MiB; the largest was: {worst.fault}), from "
            f"{fmt_bytes(worst.figures['rss_before'])}."
        )
    return out


def _num(x: Any) -> Any:
    return float(x) if isinstance(x, np.floating | np.integer) else str(x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the shortened sizes of the tests")
    parser.add_argument(
        "--only", default="", help="comma-separated scenarios: " + ", ".join(SCENARIOS)
    )
    parser.add_argument("--output", type=Path, default=DOC, help="the report (docs/RELIABILITY.md)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensord").setLevel(logging.ERROR)  # the faults make senders warn a lot
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}: choose from {', '.join(SCENARIOS)}")
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['kernel']}; {m['date']}", flush=True)
    started = time.perf_counter()
    rows = trio.run(run_all, names, args.quick)
    seconds = time.perf_counter() - started
    if not args.no_write and not args.only:
        args.output.write_text(render(rows, m, args.quick, seconds))
        print(f"wrote {args.output}")
    bad = [r for r in rows if r.status in ("FAIL", "FIXED?") or (r.skipped and IN_CI)]
    print(
        f"{len(rows)} rows in {seconds / 60:.1f} min: "
        + ", ".join(f"{v} {k}" for k, v in Counter(r.status for r in rows).items())
        + f"; data lost: {sum(r.lost for r in rows)}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
