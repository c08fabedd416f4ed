"""The client commands of ``tensord``, one function each: talk to the daemon over its control
socket, print the result (:mod:`.render`), with live progress where a command waits for
transfers or downloads (:mod:`.progress`).

Every command uses the blocking :class:`~tensord.control.blocking.Client` and runs without
trio, httpx or numpy, whose imports were most of a command's start-up (~0.3 s of CPU). Those
that start transfers and follow them (``send``, ``pull``) make the request on the main thread
while a worker thread reads the events stream (:func:`.progress.following`); those that follow
a download read its events after posting it, from one thread.

Each returns the exit status; errors are raised and turned into one line and a status by
:func:`tensord.cli.run_client_command`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ControlError
from .progress import Bars, DownloadBars, following
from .render import (
    broadcast_lines,
    downloads_table,
    event_line,
    human_bytes,
    human_rate,
    peers_table,
    plural,
    print_json,
    pull_on_lines,
    sources_summary,
    status_text,
    summary,
    tensors_table,
    transfers_table,
)

if TYPE_CHECKING:
    from ..control.blocking import Client

Json = dict[str, Any]


def _client(args: argparse.Namespace) -> Client:
    from ..control.blocking import Client

    return Client(args.socket)


def _peer_matches(given: str, event_peer: str) -> bool:
    """Events name peers by node id; the user may have given a ticket or ``host:port``."""
    if given == event_peer or given.startswith(f"tensord://{event_peer}@"):
        return True
    return ":" in given and not given.startswith("tensord://")  # host:port: any id


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        st = client.status()
    if args.json:
        print_json(st)
    else:
        print(status_text(st))
    return 0


def _show(args: argparse.Namespace, rows: list[Json], render: Callable[[list[Json]], str],
          empty: str | None = None) -> int:  # fmt: skip
    """A listing command's output: JSON with ``--json``, else a table (or ``empty``)."""
    if args.json:
        print_json(rows)
    elif rows:
        print(render(rows))
    elif empty is not None:
        print(empty)
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    with _client(args) as client:
        peers = client.peers()
    return _show(
        args,
        peers,
        peers_table,
        "no peers configured (the cluster file lists none besides this node)",
    )


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _show(args, client.tensors(), tensors_table)


def cmd_transfers(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _show(args, client.transfers(), transfers_table)


def _chain_of(to: str) -> list[str] | str | None:
    """``--to b,c,d`` or ``--to all``: a broadcast's peers; one peer: ``None`` (a send)."""
    if to == "all":
        return "all"
    peers = [p.strip() for p in to.split(",") if p.strip()]
    return peers if len(peers) > 1 else None


def cmd_send(args: argparse.Namespace) -> int:
    chain = _chain_of(args.to)
    if chain is not None:
        return _broadcast(args, chain)
    path = Path(args.file)
    prefix: str | None = None
    if path.suffix == ".safetensors":
        prefix = None if args.name is None else f"{args.name}/"
        names: set[str] | None = None
    else:
        names = {args.name or path.stem}

    def match(ev: Json) -> bool:
        if ev["direction"] != "send" or not _peer_matches(args.to, ev["peer"]):
            return False
        if names is not None:
            return ev["name"] in names
        return prefix is None or str(ev["name"]).startswith(prefix)

    with _client(args) as client, Bars() as bars:
        try:
            results = following(
                client, bars, match, lambda: client.send(args.to, path=path, name=args.name)
            )
        except ControlError as exc:
            if not (_hidden_from_daemon(exc, path) and path.suffix == ".npy"):
                raise _unseen_file(exc, path) from None
            # The daemon cannot open it (PrivateTmp=, ProtectHome=, another user's home):
            # stream it into the daemon's store, then send it from there.
            stored = args.name or path.stem
            client.upload(stored, path)
            results = following(client, bars, match, lambda: client.send(args.to, name=stored))
    if args.json:
        print_json(results)
        return 0
    for r in results:
        print(summary("sent", "to", r["name"], r.get("peer") or args.to, r, r["retries"]))
    return 0


def _broadcast(args: argparse.Namespace, chain: list[str] | str) -> int:
    """``tensord send FILE --to b,c,d``: down a chain, each peer forwarding as chunks land;
    a line per peer, exit status 1 if any failed."""
    path = Path(args.file)

    def match(ev: Json) -> bool:
        return ev["direction"] == "send" and (
            chain == "all" or any(_peer_matches(p, ev["peer"]) for p in chain)
        )

    with _client(args) as client, Bars() as bars:
        try:
            results = following(
                client, bars, match, lambda: client.send(to=chain, path=path, name=args.name)
            )
        except ControlError as exc:
            raise _unseen_file(exc, path) from None
    if args.json:
        print_json(results)
    else:
        for r in results:
            print(broadcast_lines(r))
    return 0 if all(r["ok"] for r in results) else 1


def _hidden_from_daemon(exc: ControlError, path: Path) -> bool:
    text = str(exc)
    return (
        exc.code == "bad_request"
        and ("no such file" in text or "permission denied" in text)
        and os.access(path, os.R_OK)
    )


def _unseen_file(exc: ControlError, path: Path) -> ControlError:
    """The daemon opens the file itself: one it cannot find but we can is hidden from it."""
    if exc.code == "bad_request" and "no such file" in str(exc) and path.exists():
        return ControlError(
            f"{exc}; it exists here, so the daemon cannot see it (under systemd, PrivateTmp= "
            "and ProtectHome= hide /tmp and /home from it): move it where the daemon can read it",
            code=exc.code,
            status=exc.status,
        )
    return exc


def cmd_pull(args: argparse.Namespace) -> int:
    def match(ev: Json) -> bool:
        return (
            ev["direction"] == "receive"
            and ev["name"] == args.name
            and _peer_matches(args.peer, ev["peer"])
        )

    with _client(args) as client:
        with Bars() as bars:
            reply = following(
                client, bars, match, lambda: client.pull(args.peer, args.name, as_name=args.as_name)
            )
        stored = reply["tensor"]["name"]
        name = args.name if stored == args.name else f"{args.name} as {stored}"
        print(summary("pulled", "from", name, args.peer, reply["transfer"], bars.retries(match)))
        if args.output:  # written as the daemon sends it (a .npy): numpy is not needed
            info = client.get(stored, args.output)
            print(f"wrote {stored} to {info['path']} ({human_bytes(info['file_bytes'])})")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.get(args.name, args.output)
    print(f"wrote {args.name} to {info['path']} ({human_bytes(info['file_bytes'])})")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.name)
    print(f"deleted {args.name}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.reload()
    print(f"reloaded the configuration: {plural(reply['peers'], 'peer', 'peers')}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as client, client.events() as events:
        # On stderr, so that stdout is only events; also tells a script the watch is live.
        print(f"watching {client.socket} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        with Bars(drop_finished=True) as bars:
            for ev in events:
                if args.json:
                    print(json.dumps(ev), flush=True)
                    continue
                if ev.get("kind") == "transfer":
                    bars.update(ev)
                    if bars.live and ev["state"] == "progress":
                        continue  # the bar shows it
                bars.print(event_line(ev))
    raise ControlError("the daemon closed the events stream (did it stop?)")


def _follow_download(args: argparse.Namespace, start: Callable[[Client], Json | None]) -> int:
    """Start a download and follow it to its end (or only start it, ``--detach``). ``start``
    returning ``None``: no job on this node to follow (``pull-model --on`` other nodes)."""
    with _client(args) as client:
        if args.detach:
            job = start(client)
            if job is not None:
                print(f"download {job['id']}: {job['source']} ({job['state']}); "
                      f"see `tensord downloads`")  # fmt: skip
            return 0
        started = time.perf_counter()
        connections = 0
        final: Json = {}
        with client.events() as events:
            job = start(client)
            if job is None:
                return 0
            last = job
            if job["state"] not in ("done", "failed", "cancelled"):
                with DownloadBars() as bars:
                    for ev in events:
                        if ev.get("kind") != "download" or ev.get("id") != job["id"]:
                            continue
                        bars.update(ev)
                        last = ev
                        if ev["state"] in ("done", "failed", "cancelled"):
                            break
                connections = bars.max_connections
            if last["state"] == "done":
                # Progress events are rate-limited (a fast pull may publish none with
                # connections open) and the final one has none: the job knows its peak.
                final = client.download_job(job["id"])
                connections = max(connections, int(final.get("peak_connections") or 0))
    return _download_summary(job, last, final, connections, started)


def _download_summary(job: Json, last: Json, final: Json, connections: int, started: float) -> int:
    """How a followed download ended: one line, or the error it ended with."""
    if last["state"] == "failed":
        raise ControlError(last.get("detail") or last.get("error") or "the download failed")
    if last["state"] == "cancelled":
        raise ControlError(f"download {job['id']} was cancelled")
    seconds = time.perf_counter() - started
    size = int(last.get("bytes_total") or last.get("bytes_done") or 0)
    line = f"downloaded {job['source']}: {human_bytes(size)} in {seconds:.2f} s"
    if seconds > 0 and job["state"] != "done" and connections > 0:
        used = plural(connections, "connection", "connections")
        line += f" ({human_rate(size / seconds)}, up to {used}"
        line += f", {plural(int(last.get('retries') or 0), 'retry', 'retries')})"
    sources = sources_summary(final.get("sources") or last.get("sources"))
    print(f"{line}; {sources}" if sources else line)
    return 0


def cmd_pull_model(args: argparse.Namespace) -> int:
    if not args.on:
        return _follow_download(args, lambda c: c.pull_model(args.reference))
    on = "all" if args.on == "all" else [n.strip() for n in args.on.split(",") if n.strip()]
    reply: Json = {}

    def start(client: Client) -> Json | None:
        reply.update(client.pull_model(args.reference, on=on))
        print(pull_on_lines(reply), flush=True)
        job: Json | None = reply.get("job")
        return job

    status = _follow_download(args, start)
    failed = any("error" in n for n in reply.get("nodes", []))
    return 1 if failed else status


def cmd_download(args: argparse.Namespace) -> int:
    """Issue 15 times this one from the shell against aria2c: see the module's docstring for
    why every command starts without trio and httpx."""
    return _follow_download(args, lambda c: c.download_url(args.url, args.sha256))


def cmd_downloads(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.cancel:
            job = client.cancel_download(args.cancel)
            print(f"download {job['id']}: {job['state']}")
            return 0
        return _show(args, client.downloads(), downloads_table)


#: Every client command: blocking, without trio or httpx.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": cmd_status,
    "peers": cmd_peers,
    "ls": cmd_ls,
    "send": cmd_send,
    "pull": cmd_pull,
    "get": cmd_get,
    "rm": cmd_rm,
    "watch": cmd_watch,
    "reload": cmd_reload,
    "transfers": cmd_transfers,
    "pull-model": cmd_pull_model,
    "download": cmd_download,
    "downloads": cmd_downloads,
}
