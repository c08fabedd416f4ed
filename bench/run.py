"""tensord side by side with a plain socket, pyzmq and Arrow Flight: one run, one table.

Usage (from the repository root; ``make bench`` installs pyzmq and pyarrow first)::

    .venv/bin/python bench/run.py                 # every row (a few minutes)
    .venv/bin/python bench/run.py plain tensord   # rows whose name contains a word
    .venv/bin/python bench/run.py floor latency "small sends"   # issue 15's small-tensor rows
    QUICK=1 .venv/bin/python bench/run.py         # small sizes and few reps: a smoke run

Environment: ``SIZE`` (default 256 MiB), ``REPS`` (5), ``LAT_N`` (2000), ``SMALL_N`` (1000),
``TASKS`` (16), ``BIG_SIZE`` (1 GiB), ``ROW_TIMEOUT`` (600 s), ``QUIET_WAIT`` (0: before each
row, wait up to this many seconds for other processes to go quiet), ``QUICK``, ``VERBOSE``
(children print tracebacks). Sizes accept ``K``/``M``/``G`` suffixes (powers of two).

The figures are printed as a table and written, with a description of the machine, to
``bench/results/latest.json``.

Method
------
Every row runs in fresh processes of the ``spawn`` context, two per row, over 127.0.0.1; the
payload is ``SIZE`` bytes of float32 normals from ``np.random.default_rng(0)`` (dense weights,
which lz4 cannot shrink). Throughput is the median over ``REPS`` transfers after one warm-up.

*Pull vs push, and whose clock.* The baselines are timed as in ``shared/anchors/loopback_peers.py``:
a *pull* on the *receiver's* clock - the receiver sends a one-byte ``go``, and stops the clock
when the last byte is in a buffer it can use as an array. Nothing is checksummed, nothing is
acknowledged, and the plain-socket receiver reuses one buffer whose pages are already resident.
tensord's rows are *pushes* on the *sender's* clock, as an application calls it: from calling
``send_tensor`` until it returns, which happens only once the receiver replied ``Stored`` - it has
checked every chunk's crc32c and the whole tensor's crc32c and stored the array. So tensord's
time contains work the baselines don't do: the crc32c of every chunk on both sides, the adaptive
compression trials, the acks, the whole-tensor checksum in ``End`` and the ``Stored`` round trip,
and a fresh ``np.empty`` (first-touch page faults) for every tensor received. The one-byte
``go`` of a pull and the ``Stored`` reply of a push each add one loopback round trip (18 us
between blocking sockets, ~100 us between two trio processes on the reference VM) - nothing at
256 MiB, a floor at 4 KiB. The ratio tensord/plain is therefore a
conservative figure for tensord; the reference row "plain socket recv_into, fresh buffer"
shows how much of the gap is the receiving array being new.

The latency and small-send rows run after a warm-up that dials the pooled connection(s) they
then reuse (the concurrent row shares up to ``pool.max_connections`` = 10 among its tasks), on
the sender's clock per ``send_tensor`` call (latency) or for the whole batch (sends/s).

Peak RSS is the receiver's own ``getrusage(RUSAGE_SELF).ru_maxrss`` read after it received one
``BIG_SIZE`` tensor in a fresh process; it includes the interpreter and the imported libraries
(their share is printed as "idle node").

Noise. Both processes of a row compete with whatever else runs on the machine, and with two
cores one busy neighbour is enough to halve a figure. For every row the runner measures the CPU
used by *other* processes while it ran (``/proc/stat`` minus its own and its children's
``getrusage``) and prints ``^ disturbed: ...`` under a row where that exceeded 0.1 cores, naming
the busiest culprits; the JSON keeps the figure for every row. ``QUIET_WAIT=120`` makes the
runner wait (up to 120 s per row) for the machine to go quiet first. On a VM that hands freed
memory back to its host, the first touch of memory costs milliseconds per MiB (the header line
"memory first touch" measures it): rows that receive into a new buffer per transfer vary with
it, the warm-up absorbs it only partly, and the peak-RSS row's send rate is mostly that effect.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import baselines
import tensord_rows
from harness import (
    ChildFailed,
    Children,
    GiB,
    KiB,
    MiB,
    OtherLoad,
    first_touch_rates,
    maxrss_bytes,
    stop_on_sigterm,
)

RESULTS = Path(__file__).resolve().parent / "results"
RSS_MARGIN = 128 * MiB
RATIO_TARGET = 0.85
P50_TARGET_US = 150.0
FLOOR_RATIO_TARGET = 1.5  # the small-tensor p50 against the trio request/response floor
TRIO_FLOOR = "trio request/response floor (1-byte reply)"
DISTURBED = 0.10  # cores used by other processes during a row worth a warning
DISTRIBUTIONS = ("tensord", "numpy", "trio", "msgpack", "crc32c", "lz4", "pyzmq", "pyarrow")


# -- configuration ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``268435456``, ``256M``, ``256MiB``, ``1G``: bytes (suffixes are powers of two)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": KiB, "M": MiB, "G": GiB}
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


@dataclass(frozen=True)
class Config:
    size: int
    reps: int
    lat_n: int
    small_n: int
    tasks: int
    big_size: int
    row_timeout: float
    quiet_wait: float
    quick: bool
    lat_size: int = 4 * KiB
    small_size: int = 1 * KiB

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Config:
        quick = env.get("QUICK", "") not in ("", "0")

        def get(name: str, normal: str, smoke: str) -> str:
            return env.get(name) or (smoke if quick else normal)

        return cls(
            size=parse_size(get("SIZE", "256M", "32M")),
            reps=int(get("REPS", "5", "2")),
            lat_n=int(get("LAT_N", "2000", "200")),
            small_n=int(get("SMALL_N", "1000", "200")),
            tasks=int(get("TASKS", "16", "16")),
            big_size=parse_size(get("BIG_SIZE", "1G", "64M")),
            row_timeout=float(get("ROW_TIMEOUT", "600", "120")),
            quiet_wait=float(get("QUIET_WAIT", "0", "0")),
            quick=quick,
        )

    @property
    def warmup(self) -> int:
        """Warm-up sends before the small-tensor rows (dial, handshake, caches)."""
        return 50 if self.quick else 200


# -- the machine ----------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    ram_kib = next(
        (
            int(line.split()[1])
            for line in _read("/proc/meminfo").splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": ram_kib * KiB,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
        "git": git_state(),
        "versions": {
            d: _version(d)
            for d in ("tensord", "numpy", "trio", "pyzmq", "pyarrow", "crc32c", "lz4")
        },
    }


# -- rows -----------------------------------------------------------------------------------


@dataclass
class Figure:
    """What a row measured: a headline value and everything behind it."""

    value: float
    unit: str
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class RowResult:
    name: str
    section: str
    figure: Figure | None = None
    error: str | None = None
    wall_seconds: float = 0.0
    other_load: dict[str, Any] = field(default_factory=dict)


def _gbps(size: int, seconds: list[float], extra: dict[str, Any] | None = None) -> Figure:
    med = statistics.median(seconds)
    rates = [size / s / 1e9 for s in seconds]
    return Figure(
        size / med / 1e9,
        "GB/s",
        f"min {min(rates):.2f}  max {max(rates):.2f}",
        {"size": size, "seconds": seconds, "gbps": rates, **(extra or {})},
    )


def row_plain(cfg: Config) -> Figure:
    return _gbps(cfg.size, baselines.run_plain(cfg.size, cfg.reps, cfg.row_timeout))


def row_plain_fresh(cfg: Config) -> Figure:
    return _gbps(cfg.size, baselines.run_plain(cfg.size, cfg.reps, cfg.row_timeout, fresh=True))


def row_zmq(cfg: Config) -> Figure:
    return _gbps(cfg.size, baselines.run_zmq(cfg.size, cfg.reps, cfg.row_timeout))


def row_flight(cfg: Config) -> Figure:
    return _gbps(cfg.size, baselines.run_flight(cfg.size, cfg.reps, cfg.row_timeout))


def _row_tensord(cfg: Config, compression: bool) -> Figure:
    r = tensord_rows.run_throughput(cfg.size, cfg.reps, cfg.row_timeout, compression)
    fig = _gbps(cfg.size, r.pop("seconds"), r)
    fig.detail += f"  retries {r['retries']}  compressed chunks {r['chunks_compressed']}"
    return fig


def row_tensord(cfg: Config) -> Figure:
    return _row_tensord(cfg, compression=True)


def row_tensord_raw(cfg: Config) -> Figure:
    return _row_tensord(cfg, compression=False)


def _row_tensord_mode(mode: str) -> Callable[[Config], Figure]:
    """A tensord row whose receiver gets its memory one way (``tensord_rows.MODES``)."""

    def row(cfg: Config) -> Figure:
        r = tensord_rows.run_throughput(cfg.size, cfg.reps, cfg.row_timeout, True, mode)
        return _gbps(cfg.size, r.pop("seconds"), r)

    return row


#: Issue 15, bulk receive: each tensord row against the plain-socket row with the same memory.
BULK_PAIRS = (
    ("tensord into fresh memory, faulted ahead", "plain socket recv_into, fresh buffer (ref.)"),
    ("tensord into reused memory (into=)", "plain socket recv_into"),
    ("tensord send_tensor", "plain socket recv_into"),
)
BULK_MEDIAN, BULK_SLOWEST = 0.9, 0.7


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _latency_figure(times: list[float]) -> Figure:
    us = sorted(t * 1e6 for t in times)
    p50, p90, p99 = (_percentile(us, q) for q in (50, 90, 99))
    return Figure(
        p50,
        "us p50",
        f"p90 {p90:.0f}  p99 {p99:.0f}  max {us[-1]:.0f} us  (n={len(us)})",
        {
            "n": len(us),
            "p50_us": p50,
            "p90_us": p90,
            "p99_us": p99,
            "max_us": us[-1],
            "mean_us": statistics.fmean(us),
        },
    )


def row_trio_floor(cfg: Config) -> Figure:
    return _latency_figure(
        baselines.run_trio_floor(cfg.lat_size, cfg.lat_n, cfg.warmup, cfg.row_timeout)
    )


def row_latency(cfg: Config) -> Figure:
    return _latency_figure(
        tensord_rows.run_latency(cfg.lat_size, cfg.lat_n, cfg.warmup, cfg.row_timeout)
    )


def _row_rate(cfg: Config, tasks: int) -> Figure:
    seconds = tensord_rows.run_rate(cfg.small_size, cfg.small_n, tasks, cfg.warmup, cfg.row_timeout)
    rate = cfg.small_n / seconds
    return Figure(
        rate,
        "sends/s",
        f"{cfg.small_n} sends in {seconds:.3f} s ({seconds / cfg.small_n * 1e6:.0f} us per send)",
        {"n": cfg.small_n, "tasks": tasks, "seconds": seconds, "sends_per_s": rate},
    )


def row_rate_sequential(cfg: Config) -> Figure:
    return _row_rate(cfg, 1)


def row_rate_concurrent(cfg: Config) -> Figure:
    return _row_rate(cfg, cfg.tasks)


def row_peak_rss(cfg: Config) -> Figure:
    r = tensord_rows.run_peak_rss(cfg.big_size, cfg.row_timeout)
    peak, hwm, idle = r["maxrss"], r["hwm"], r["idle_rss"]
    # ru_maxrss of a spawned child starts at its parent's peak RSS; VmHWM does not. The runner
    # stays small so they agree; say so if they ever don't.
    runner = maxrss_bytes()
    caveat = "" if abs(peak - hwm) < 4 * MiB else f" (VmHWM {hwm / MiB:.0f} MiB differs!)"
    return Figure(
        peak / MiB,
        "MiB",
        f"{peak / cfg.big_size:.3f} x tensor{caveat}; idle node {idle / MiB:.0f} MiB;"
        f" peak - idle - tensor {(peak - idle - cfg.big_size) / MiB:+.0f} MiB;"
        f" send {cfg.big_size / r['seconds'] / 1e9:.2f} GB/s (into never-touched memory)",
        {
            "tensor_bytes": cfg.big_size,
            "maxrss_bytes": peak,
            "vmhwm_bytes": hwm,
            "idle_rss_bytes": idle,
            "send_seconds": r["seconds"],
            "runner_maxrss_bytes": runner,
        },
    )


@dataclass(frozen=True)
class Row:
    name: str
    section: str
    run: Callable[[Config], Figure]


def rows(cfg: Config) -> list[Row]:
    size = f"{cfg.size / MiB:g} MiB float32, median of {cfg.reps} after 1 warm-up"
    thr = (
        f"Throughput: {size}\n"
        "  (baselines: pull, receiver clock; tensord: push, sender clock until Stored)"
    )
    lat = (
        f"Latency: {cfg.lat_size // KiB} KiB, sender clock (tensord: a tensor, pooled connection;"
        " floor: two trio processes, request and 1-byte reply)"
    )
    rate = f"Small tensors: {cfg.small_n} sends of {cfg.small_size // KiB} KiB"
    mem = f"Receiver peak RSS: one {cfg.big_size / MiB:g} MiB tensor"
    return [
        Row("plain socket recv_into", thr, row_plain),
        Row("plain socket recv_into, fresh buffer (ref.)", thr, row_plain_fresh),
        Row("pyzmq zero-copy", thr, row_zmq),
        Row("arrow flight do_get", thr, row_flight),
        Row("tensord send_tensor", thr, row_tensord),
        Row("tensord send_tensor, compression off", thr, row_tensord_raw),
        Row("tensord into fresh memory (np.empty)", thr, _row_tensord_mode("fresh")),
        Row("tensord into fresh memory, faulted ahead", thr, _row_tensord_mode("populate")),
        Row("tensord into reused memory (into=)", thr, _row_tensord_mode("into")),
        Row(TRIO_FLOOR, lat, row_trio_floor),
        Row("tensord send_tensor latency", lat, row_latency),
        Row("tensord small sends, sequential", rate, row_rate_sequential),
        Row(f"tensord small sends, {cfg.tasks} tasks", rate, row_rate_concurrent),
        Row("tensord receiver peak RSS", mem, row_peak_rss),
    ]


# -- output ---------------------------------------------------------------------------------

NAME_W = 44


def _ratio_to_plain(result: RowResult, done: dict[str, RowResult]) -> float | None:
    plain = done.get("plain socket recv_into")
    if result.figure is None or result.figure.unit != "GB/s" or result.name.startswith("plain"):
        return None
    if plain is None or plain.figure is None:
        return None
    return result.figure.value / plain.figure.value


def format_row(result: RowResult, done: dict[str, RowResult]) -> str:
    if result.figure is None:
        return f"  {result.name:<{NAME_W}} failed: {result.error}"
    f = result.figure
    value = f"{f.value:,.0f}" if f.value >= 100 else f"{f.value:.2f}"
    line = f"  {result.name:<{NAME_W}} {value:>8} {f.unit:<8}"
    if f.unit == "GB/s":
        ratio = _ratio_to_plain(result, done)
        if ratio is not None:
            f.data["ratio_to_plain"] = ratio
        line += f"{ratio:>5.2f} x plain  " if ratio is not None else " " * 15
    return f"{line}{f.detail}"


@dataclass
class Target:
    name: str
    measured: str
    status: str  # PASS, MISS or n/a
    value: float | None = None
    limit: float | None = None


def targets(cfg: Config, done: dict[str, RowResult]) -> list[Target]:
    def fig(name: str) -> Figure | None:
        r = done.get(name)
        return r.figure if r is not None else None

    out: list[Target] = []
    tensord, plain = fig("tensord send_tensor"), fig("plain socket recv_into")
    name = f"tensord send_tensor >= {RATIO_TARGET} x plain socket"
    if tensord and plain:
        ratio = tensord.value / plain.value
        ok = ratio >= RATIO_TARGET
        text = f"{ratio:.2f} x ({tensord.value:.2f} / {plain.value:.2f} GB/s)"
        out.append(Target(name, text, "PASS" if ok else "MISS", ratio, RATIO_TARGET))
    else:
        out.append(Target(name, "needs both rows", "n/a"))
    lat = fig("tensord send_tensor latency")
    name = f"{cfg.lat_size // KiB} KiB send p50 <= {P50_TARGET_US:.0f} us"
    if lat:
        ok = lat.value <= P50_TARGET_US
        text = f"p50 {lat.value:.0f} us (p99 {lat.data['p99_us']:.0f} us)"
        out.append(Target(name, text, "PASS" if ok else "MISS", lat.value, P50_TARGET_US))
    else:
        out.append(Target(name, "needs the latency row", "n/a"))
    floor = fig(TRIO_FLOOR)
    name = f"{cfg.lat_size // KiB} KiB send p50 <= {FLOOR_RATIO_TARGET} x trio floor"
    if lat and floor:
        ratio = lat.value / floor.value
        ok = ratio <= FLOOR_RATIO_TARGET
        text = f"{ratio:.2f} x (p50 {lat.value:.0f} us / floor p50 {floor.value:.0f} us)"
        out.append(Target(name, text, "PASS" if ok else "MISS", ratio, FLOOR_RATIO_TARGET))
    else:
        out.append(Target(name, "needs the latency and floor rows", "n/a"))
    for row_name, base_name in BULK_PAIRS:
        mine, base = fig(row_name), fig(base_name)
        name = f"{row_name}: median >= {BULK_MEDIAN} x, slowest >= {BULK_SLOWEST} x"
        if mine and base:
            ratio, slowest = mine.value / base.value, min(mine.data["gbps"]) / base.value
            ok = ratio >= BULK_MEDIAN and slowest >= BULK_SLOWEST
            text = f"{ratio:.2f} x, slowest {slowest:.2f} x ({mine.value:.2f} / {base.value:.2f})"
            out.append(Target(name, text, "PASS" if ok else "MISS", ratio, BULK_MEDIAN))
        else:
            out.append(Target(name, f"needs the rows {row_name!r} and {base_name!r}", "n/a"))
    rss = fig("tensord receiver peak RSS")
    name = "receiver peak RSS <= tensor + 128 MiB"
    if rss:
        limit = (cfg.big_size + RSS_MARGIN) / MiB
        ok = rss.value <= limit
        text = f"{rss.value:.0f} MiB, limit {limit:.0f} MiB"
        out.append(Target(name, text, "PASS" if ok else "MISS", rss.value, limit))
    else:
        out.append(Target(name, "needs the RSS row", "n/a"))
    return out


def describe_machine(m: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in m["loadavg_start"])
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / GiB:.1f} GiB RAM, {m['kernel']}, "
        f"{m['python']}, {m['date']}, load average at start {load}"
    )


def describe_load(load: dict[str, Any]) -> str:
    who = ", ".join(f"{p['cmd'][:48]} ({p['cpu_seconds']:.1f} s)" for p in load["top"])
    return f"other processes used {load['cores']:.2f} cores" + (f": {who}" if who else "")


def git_state() -> dict[str, Any]:
    """The commit of the tree being measured, and whether tensord/ differs from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "tensord_dirty": bool(git("status", "--porcelain", "--", "tensord")),
    }


# -- main -----------------------------------------------------------------------------------


def wait_for_quiet(limit: float) -> dict[str, Any] | None:
    """Wait (up to ``limit`` seconds) until other processes use < DISTURBED cores for 1 s."""
    deadline = time.monotonic() + limit
    told = False
    while True:
        probe = OtherLoad()
        time.sleep(1.0)
        load = probe.stop()
        if load["cores"] < DISTURBED:
            return None
        if time.monotonic() >= deadline:
            return load
        if not told:
            print(f"    (waiting for quiet: {describe_load(load)})", flush=True)
            told = True


def run_row(row: Row, cfg: Config) -> RowResult:
    result = RowResult(row.name, row.section)
    if cfg.quiet_wait > 0:
        wait_for_quiet(cfg.quiet_wait)
    load = OtherLoad()
    t = time.perf_counter()
    try:
        result.figure = row.run(cfg)
    except Exception as exc:
        if os.environ.get("VERBOSE"):
            traceback.print_exc()
        result.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    result.wall_seconds = time.perf_counter() - t
    result.other_load = load.stop()
    return result


def main(argv: list[str]) -> int:
    only = argv
    cfg = Config.from_env(dict(os.environ))
    m = machine()
    print(f"tensord bench{' (QUICK: smoke sizes, not comparable)' if cfg.quick else ''}")
    print(f"machine: {describe_machine(m)}")
    try:
        with Children() as kids:
            cold, warm = kids.start("memory probe", first_touch_rates, 256 * MiB).recv(60)
    except ChildFailed as exc:
        print(f"memory first touch: failed: {exc}")
    else:
        m["first_touch_gbps"] = {"never_used": cold, "recycled": warm}
        print(f"memory first touch: never-used {cold:.2f} GB/s, recycled {warm:.1f} GB/s", end="")
        print(" (memory goes back to the host when freed: see README)" if cold < warm / 4 else "")
    tree = m["git"]
    if tree["commit"]:
        dirty = " + uncommitted changes in tensord/" if tree["tensord_dirty"] else ""
        print(f"tree: {tree['commit'][:12]}{dirty}")
    selected = [r for r in rows(cfg) if not only or any(o in r.name for o in only)]
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
        result = run_row(row, cfg)
        done[row.name] = result
        print(format_row(result, done), flush=True)
        if result.other_load["cores"] >= DISTURBED:
            print(f"    ^ disturbed: {describe_load(result.other_load)}", flush=True)
    goals = targets(cfg, done)
    print("\nTargets (project issue)")
    for goal in goals:
        print(f"  {goal.name:<{NAME_W}} {goal.status:<5} {goal.measured}")
    m["loadavg_end"] = list(os.getloadavg())
    m["bench_seconds"] = time.perf_counter() - started
    report = {
        "machine": m,
        "config": asdict(cfg),
        "rows": [asdict(r) for r in done.values()],
        "targets": [asdict(g) for g in goals],
    }
    with contextlib.suppress(OSError):
        RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "latest.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    load = ", ".join(f"{x:.2f}" for x in m["loadavg_end"])
    print(f"\nload average at end {load}; {m['bench_seconds']:.0f} s; wrote {out}")
    return 1 if any(r.error for r in done.values()) else 0


if __name__ == "__main__":
    with stop_on_sigterm():
        sys.exit(main(sys.argv[1:]))
