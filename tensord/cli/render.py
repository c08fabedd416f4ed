"""What the client commands print: tables, status, event lines and summaries, as plain text.

Columns are aligned with spaces, never cut or coloured, so that ``grep`` and ``awk`` work on
them; sizes are binary (``MiB``, as memory is counted), rates decimal (``MB/s``, as links are).
``--json`` prints the daemon's own JSON instead (:func:`print_json`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

Json = dict[str, Any]


def print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2))


def human_bytes(n: float) -> str:
    """``256.0 MiB``: binary units, as sizes of memory are counted."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            break
    return f"{n:.1f} {unit}"


def human_rate(bytes_per_second: float) -> str:
    """``516 MB/s``: decimal units, as link speeds are quoted."""
    mb = bytes_per_second / 1e6
    if mb >= 10:
        return f"{mb:.0f} MB/s"
    if mb >= 1:
        return f"{mb:.1f} MB/s"
    return f"{mb:.2f} MB/s"


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f} s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: str = "") -> str:
    """Columns aligned with two spaces between them, ``right`` naming the right-aligned ones
    (by header). Plain text, so that ``grep`` and ``awk`` work on it and nothing is cut."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [
            c.rjust(w) if h in right.split(",") else c.ljust(w)
            for c, w, h in zip(row, widths, headers, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _rtt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f} ms"


def peers_table(peers: Sequence[Json]) -> str:
    rows = [
        [
            p["id"],
            p["addr"],
            p["state"],
            _rtt(p.get("rtt_ms")),
            f"{p['pool']['size']} ({p['pool']['idle']} idle)",
            str(p["failures"]),
            p.get("last_error") or "",
        ]
        for p in peers
    ]
    headers = ["PEER", "ADDR", "STATE", "RTT", "CONNECTIONS", "FAILURES", "LAST ERROR"]
    return table(headers, rows, right="RTT,FAILURES")


def tensors_table(tensors: Sequence[Json]) -> str:
    rows = [
        [
            t["name"],
            t["dtype"],
            _shape(t["shape"]),
            human_bytes(t["nbytes"]),
            t.get("sender") or "-",
            _when(t["stored_at"]),
        ]
        for t in tensors
    ]
    return table(["NAME", "DTYPE", "SHAPE", "SIZE", "FROM", "STORED"], rows, right="SIZE")


def progress_text(t: Json) -> str:
    total = t["bytes_total"]
    pct = f" ({100 * t['bytes_done'] / total:.0f}%)" if total else ""
    return f"{human_bytes(t['bytes_done'])} / {human_bytes(total)}{pct}"


def transfers_table(transfers: Sequence[Json]) -> str:
    rows = [
        [
            t["id"],
            t["direction"],
            t["name"],
            t["peer"],
            t["state"],
            progress_text(t),
            str(t["retries"]),
            t.get("detail") or "",
        ]
        for t in transfers
    ]
    headers = ["ID", "DIRECTION", "NAME", "PEER", "STATE", "PROGRESS", "RETRIES", "DETAIL"]
    return table(headers, rows, right="RETRIES")


def status_text(st: Json) -> str:
    store = st["store"]
    cap = "no cap" if store["max_bytes"] is None else f"cap {human_bytes(store['max_bytes'])}"
    up = sum(1 for p in st["peers"] if p["state"] == "up")
    head = [
        ["node", f"{st['node_id']}  {st['listen']}"],
        ["version", st["version"]],
        ["cluster", st["cluster"]],
        ["uptime", human_duration(st["uptime"])],
        [
            "store",
            f"{store['root']}: {plural(store['tensors'], 'tensor', 'tensors')}, "
            f"{human_bytes(store['used_bytes'])} ({cap})",
        ],
        ["peers", f"{up} of {len(st['peers'])} up"],
        ["transfers", f"{len(st['transfers'])} in flight"],
    ]
    out = "\n".join(f"{k:<10} {v}" for k, v in head)
    if st["peers"]:
        out += "\n\n" + peers_table(st["peers"])
    if st["transfers"]:
        out += "\n\n" + transfers_table(st["transfers"])
    return out


def event_line(ev: Json) -> str:
    """One line per node event, for ``tensord watch``."""
    at = _clock(float(ev.get("at", time.time())))
    kind = ev.get("kind", "?")
    if kind == "transfer":
        way = "to" if ev["direction"] == "send" else "from"
        line = (
            f"{at} {ev['direction']} {ev['state']}: {ev['name']} {way} {ev['peer']}, "
            f"{progress_text(ev)}"
        )
        if ev.get("retries"):
            line += f", {plural(ev['retries'], 'retry', 'retries')}"
        return line + (f" ({ev['detail']})" if ev.get("detail") else "")
    if kind == "peer":
        return f"{at} peer {ev['peer']} {ev['state']}" + (
            f": {ev['detail']}" if ev.get("detail") else ""
        )
    if kind == "arrival":
        return f"{at} arrival: {ev['name']} from {ev['sender']} ({human_bytes(ev['nbytes'])})"
    rest = {k: v for k, v in ev.items() if k not in ("kind", "at")}
    return f"{at} {kind}: {json.dumps(rest)}"


def summary(verb: str, way: str, name: str, peer: str, r: Json, retries: int | None) -> str:
    """``sent w to b: 256.0 MiB in 0.52 s (516 MB/s), 0 retries``."""
    line = (
        f"{verb} {name} {way} {peer}: {human_bytes(r['nbytes'])} in {r['seconds']:.2f} s "
        f"({human_rate(r['rate'])})"
    )
    if retries is not None:
        line += f", {plural(retries, 'retry', 'retries')}"
    return line


def broadcast_lines(r: Json) -> str:
    """A broadcast's outcome: ``broadcast w: 256.0 MiB to 3 peers in 0.80 s``, then a line per
    peer (``stored``, ``direct`` or ``failed``, with what a repair saved and re-sent)."""
    peers = r["peers"]
    lines = [
        f"broadcast {r['name']}: {human_bytes(r['nbytes'])} to "
        f"{plural(len(peers), 'peer', 'peers')} in {r['seconds']:.2f} s"
    ]
    for p in peers:
        line = f"  {p['peer']}: {p['status']}"
        if p["bytes_skipped"]:
            line += f", resumed with {human_bytes(p['bytes_skipped'])} already there"
        if p["bytes_resent"]:
            line += f", {human_bytes(p['bytes_resent'])} re-sent"
        lines.append(line + (f" ({p['detail']})" if p["detail"] else ""))
    return "\n".join(lines)


def source_totals(sources: object) -> dict[str, int]:
    """Bytes by source ("origin" first, then peers by most bytes) from a download event's
    ``sources`` (``[digest, source, bytes]`` rows) or a job's (``{digest: {source: bytes}}``)."""
    totals: dict[str, int] = {}
    rows: list[tuple[str, int]] = []
    if isinstance(sources, dict):
        rows = [(src, int(n)) for by in sources.values() for src, n in by.items()]
    elif isinstance(sources, list | tuple):
        rows = [(str(row[1]), int(row[2])) for row in sources]
    for src, n in rows:
        totals[src] = totals.get(src, 0) + n
    return dict(sorted(totals.items(), key=lambda kv: (kv[0] != "origin", -kv[1], kv[0])))


def sources_text(sources: object) -> str:
    """``origin 12.0 MiB, gpu-2 40.0 MiB``: where a download's bytes came from so far."""
    return ", ".join(f"{src} {human_bytes(n)}" for src, n in source_totals(sources).items() if n)


def sources_summary(sources: object) -> str:
    """The end of a download's summary line: ``12.0 MiB from the origin, 36.0 MiB from peers
    (gpu-2 36.0 MiB)``; empty when nothing was accounted."""
    totals = source_totals(sources)
    origin = totals.pop("origin", 0)
    peers = {src: n for src, n in totals.items() if n}
    if not origin and not peers:
        return ""
    text = f"{human_bytes(origin)} from the origin"
    if peers:
        listed = ", ".join(f"{src} {human_bytes(n)}" for src, n in peers.items())
        text += f", {human_bytes(sum(peers.values()))} from peers ({listed})"
    return text


def pull_on_lines(reply: Json) -> str:
    """``tensord pull-model --on``: a line per node, the job it started or why not."""
    lines = []
    for n in reply.get("nodes", []):
        if "error" in n:
            lines.append(f"{n['node']}: failed: {n['error']['message']}")
        else:
            lines.append(f"{n['node']}: started download {n['id']}")
    return "\n".join(lines)


def short_digest(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def downloads_table(jobs: Sequence[Json]) -> str:
    rows = []
    for j in jobs:
        total = j.get("bytes_total")
        done = human_bytes(j["bytes_done"]) + (f" / {human_bytes(total)}" if total else "")
        what = j["source"] + (f" ({j['error']})" if j.get("error") else "")
        rows.append([j["id"], j["state"], done, str(j.get("connections", 0)), what])
    return table(["ID", "STATE", "BYTES", "CONN", "SOURCE"], rows, right="BYTES CONN")
