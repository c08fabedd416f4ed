"""The ``tensord`` command. ``tensord serve`` runs a node in the foreground; the other commands
(``status``, ``send``, ``pull``, ``watch``, ...) talk to a running one over its control socket.

Configuration errors print one line and exit with status 78 (EX_CONFIG), which systemd
reports as a configuration problem rather than restarting in a loop. A client command that finds
no daemon exits 69 (EX_UNAVAILABLE), any other error 1, Ctrl-C 130 - each with one line on stderr
(none for Ctrl-C). Progress bars go to stderr and only when it is a terminal; results to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from . import cli_certs
from ._version import __version__
from .config import load_settings
from .errors import ConfigError, ProtocolError, TensorError
from .limits import check_name
from .logs import setup_logging
from .transfers import FINAL_STATES

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from .control.client import AsyncClient, ControlError

log = logging.getLogger("tensord")

EX_UNAVAILABLE = 69  # sysexits.h: the daemon is not running
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

Json = dict[str, Any]
T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tensord", description="Move tensors between the nodes of an LLM cluster."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the node in the foreground")
    serve.add_argument("--cluster", metavar="FILE", help="cluster file (TENSORD_CLUSTER_FILE)")
    serve.add_argument("--node-id", metavar="ID", help="this node's id (TENSORD_NODE_ID)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="peer listener (TENSORD_LISTEN)")
    serve.add_argument(
        "--log-level", metavar="LEVEL", help="debug, info, warning or error (TENSORD_LOG_LEVEL)"
    )
    sub.add_parser("version", help="print the version")
    cli_certs.add_commands(sub)
    _client_commands(p, sub)
    return p


def _client_commands(p: argparse.ArgumentParser, sub: Any) -> None:
    """The commands that talk to a running daemon over its control socket."""
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's control socket (default: found as the daemon finds it)",
    )
    # Also accepted after the command; SUPPRESS so that it does not reset the global one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket", metavar="PATH", default=argparse.SUPPRESS, help="the daemon's control socket"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for programs")

    def add(name: str, what: str, *extra: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=what, parents=[common, *extra])
        return parser

    add("status", "the node: peers, store, transfers in flight", as_json)
    add("peers", "the configured peers: state, round-trip time, connections", as_json)
    add("ls", "the tensors in the store", as_json)
    send = add("send", "send a .npy or .safetensors file's tensors to a peer")
    send.add_argument("file", metavar="FILE", help=".npy or .safetensors file (read by the daemon)")
    send.add_argument("--to", metavar="PEER", required=True, help="node id, ticket or host:port")
    send.add_argument(
        "--name", metavar="N", help="remote name (.npy; default: the file's stem) or prefix"
    )
    pull = add("pull", "fetch a tensor from a peer into the store")
    pull.add_argument("peer", metavar="PEER", help="node id, ticket or host:port")
    pull.add_argument(
        "name", metavar="NAME", type=_tensor_name, help="the tensor's name on the peer"
    )
    pull.add_argument("-o", "--output", metavar="FILE", help="also write it to FILE (.npy)")
    pull.add_argument(
        "--as", dest="as_name", metavar="LOCAL", type=_tensor_name, help="store it as LOCAL"
    )
    get = add("get", "write a stored tensor to a .npy file")
    get.add_argument("name", metavar="NAME", type=_tensor_name)
    get.add_argument("-o", "--output", metavar="FILE", required=True, help="the .npy to write")
    rm = add("rm", "delete a stored tensor")
    rm.add_argument("name", metavar="NAME", type=_tensor_name)
    add("watch", "print the node's events as they happen, until Ctrl-C", as_json)
    add("reload", "re-read the cluster file (as SIGHUP does)")
    add("transfers", "transfers in flight, then the last finished ones", as_json)
    detach = argparse.ArgumentParser(add_help=False)
    detach.add_argument(
        "--detach", action="store_true", help="start it and return; it runs in the background"
    )
    model = add("pull-model", "download a model's layers from a registry", detach)
    model.add_argument("reference", metavar="REGISTRY/NAME:TAG", help="e.g. llama3:8b")
    url = add("download", "download a URL into the blob store, checking its sha256", detach)
    url.add_argument("url", metavar="URL")
    url.add_argument("--sha256", metavar="HEX", required=True, help="the expected SHA-256")
    downloads = add("downloads", "background downloads: running, queued, finished", as_json)
    downloads.add_argument("--cancel", metavar="ID", help="cancel download ID")


def _tensor_name(text: str) -> str:
    """A tensor name on the command line, checked by the validator the wire and the control
    API use, so that a bad one is refused here with the same words."""
    try:
        return check_name(text)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    if command == "version":
        print(f"tensord {__version__}")
        return 0
    if command == "certs":
        return cli_certs.run(args)
    if command != "serve":
        return run_client_command(command, args)
    try:
        settings = load_settings(
            os.environ,
            cluster_file=getattr(args, "cluster", None),
            node_id=getattr(args, "node_id", None),
            listen=getattr(args, "listen", None),
            log_level=getattr(args, "log_level", None),
        )
    except ConfigError as exc:
        print(f"tensord: configuration error: {exc}", file=sys.stderr)
        return ConfigError.exit_code
    setup_logging(settings.log_level, os.environ)
    try:
        from .daemon import serve

        return trio.run(serve, settings, os.environ)
    except KeyboardInterrupt:  # a signal before the handler was installed
        log.info("interrupted; shutting down")
    except OSError as exc:
        print(f"tensord: cannot start: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found while starting (e.g. the gateway's API keys)
        print(f"tensord: configuration error: {exc}", file=sys.stderr)
        return ConfigError.exit_code
    return 0


# --------------------------------------------------------------------------------------------
# Client commands


def run_client_command(command: str, args: argparse.Namespace) -> int:
    """Run one client command under trio; turn its errors into one line and an exit status."""
    try:
        return trio.run(_COMMANDS[command], args)
    except BaseException as exc:
        return _exit_status(exc)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _exit_status(exc: BaseException) -> int:
    """One line on stderr for an error we expect (none for Ctrl-C); a bug keeps its traceback."""
    from .control.client import DaemonNotRunning

    leaves = _leaves(exc)
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        return EXIT_INTERRUPTED
    if any(isinstance(e, BrokenPipeError) for e in leaves):
        # `tensord ls | head`: the reader went away. Quietly, and without Python's complaint
        # about flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    for e in leaves:
        if isinstance(e, ConfigError):
            print(f"tensord: configuration error: {e}", file=sys.stderr)
            return ConfigError.exit_code
        if isinstance(e, DaemonNotRunning):
            print(f"{e}" if str(e).startswith("tensord ") else f"tensord: {e}", file=sys.stderr)
            return EX_UNAVAILABLE
        if isinstance(e, TensorError | OSError):
            print(f"tensord: {_error_text(e)}", file=sys.stderr)
            return 1
    raise exc


def _error_text(e: BaseException) -> str:
    """An error's text, never empty nor ending in a colon: what its causes say is added."""
    text = str(e).strip()
    cause = e.__cause__ or e.__context__
    if (not text or text.endswith(":")) and cause is not None and cause is not e:
        more = _error_text(cause)
        text = f"{text} {more}" if text else more
    return text or f"{type(e).__name__} (no detail given)"


def _client(args: argparse.Namespace) -> AsyncClient:
    from .control.client import AsyncClient

    return AsyncClient(args.socket)


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2))


# -- formatting


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


def _plural(n: int, one: str, many: str) -> str:
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


def _progress_text(t: Json) -> str:
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
            _progress_text(t),
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
            f"{store['root']}: {_plural(store['tensors'], 'tensor', 'tensors')}, "
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
            f"{_progress_text(ev)}"
        )
        if ev.get("retries"):
            line += f", {_plural(ev['retries'], 'retry', 'retries')}"
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
        line += f", {_plural(retries, 'retry', 'retries')}"
    return line


# -- progress


class Bars(AbstractContextManager["Bars"]):
    """One live progress bar per transfer on stderr, fed by transfer events; drawn only when
    stderr is a terminal (tests and pipes get the summary lines and nothing else)."""

    def __init__(self, console: Console | None = None, *, drop_finished: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = console if console is not None else Console(stderr=True)
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self.progress: Progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[retries]} retries"),
            console=self.console,
            disable=not self.live,
            # Results go to stdout, which may be a pipe: do not route it through the bars.
            redirect_stdout=False,
            redirect_stderr=False,
        )
        #: ``watch`` runs for days: a finished transfer's bar goes (its line stays).
        self._drop_finished = drop_finished
        self._tasks: dict[tuple[str, str], TaskID] = {}
        #: The last event of each transfer seen, by (direction, id).
        self.last: dict[tuple[str, str], Json] = {}

    def __enter__(self) -> Bars:
        self.progress.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def update(self, ev: Json) -> None:
        key = (ev["direction"], ev["id"])
        self.last[key] = ev
        total = ev["bytes_total"] or None
        task = self._tasks.get(key)
        if task is None:
            arrow = "->" if ev["direction"] == "send" else "<-"
            task = self.progress.add_task(
                f"{ev['name']} {arrow} {ev['peer']}", total=total, retries=ev["retries"]
            )
            self._tasks[key] = task
        done = ev["bytes_done"]
        if ev["state"] == "done":
            done = ev["bytes_total"]
        self.progress.update(task, completed=done, total=total, retries=ev["retries"])
        if ev["state"] in FINAL_STATES and self._drop_finished:
            self.progress.remove_task(self._tasks.pop(key))
        elif ev["state"] in ("failed", "interrupted"):
            self.progress.update(task, description=f"{ev['name']} {ev['state']}")
            self.progress.stop_task(task)

    def finish(self) -> None:
        """The call succeeded: its transfers are done even if their last events were not read
        yet (the reply and the events stream race)."""
        for key, task in self._tasks.items():
            last = self.last[key]
            if last["state"] not in ("failed", "interrupted"):
                self.progress.update(task, completed=last["bytes_total"])

    def print(self, line: str) -> None:
        """A line of output: above the bars when stdout is the bars' terminal, else to stdout."""
        if self.live and sys.stdout.isatty():
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    def retries(self, match: Callable[[Json], bool]) -> int | None:
        """The most retries a matching transfer reported (``None``: none was seen)."""
        seen = [ev["retries"] for ev in self.last.values() if match(ev)]
        return max(seen) if seen else None


def _peer_matches(given: str, event_peer: str) -> bool:
    """Events name peers by node id; the user may have given a ticket or ``host:port``."""
    if given == event_peer or given.startswith(f"tensord://{event_peer}@"):
        return True
    return ":" in given and not given.startswith("tensord://")  # host:port: any id


async def _following(
    client: AsyncClient, bars: Bars, match: Callable[[Json], bool], call: Callable[[], Awaitable[T]]
) -> T:
    """``await call()`` while the transfers it causes feed ``bars``. Subscribed before the call
    is posted, so even its first event is seen."""
    from .control.client import ControlError

    results: list[T] = []
    failure: list[BaseException] = []
    async with client.subscribe() as events, trio.open_nursery() as nursery:

        async def follow() -> None:
            try:
                async for ev in events:
                    if ev.get("kind") == "transfer" and match(ev):
                        bars.update(ev)
            except ControlError:
                pass  # bars are a nicety: the call's own reply is the result

        nursery.start_soon(follow)
        try:
            results.append(await call())
        except Exception as exc:  # raised below as itself, not in an ExceptionGroup
            failure.append(exc)
        finally:
            nursery.cancel_scope.cancel()
    if failure:
        raise failure[0]
    bars.finish()
    return results[0]


# -- commands


async def cmd_status(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        st = await client.status()
    if args.json:
        _print_json(st)
    else:
        print(status_text(st))
    return 0


def _show(args: argparse.Namespace, rows: list[Json], render: Callable[[list[Json]], str],
          empty: str | None = None) -> int:  # fmt: skip
    """A listing command's output: JSON with ``--json``, else a table (or ``empty``)."""
    if args.json:
        _print_json(rows)
    elif rows:
        print(render(rows))
    elif empty is not None:
        print(empty)
    return 0


async def cmd_peers(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        peers = await client.peers()
    return _show(
        args,
        peers,
        peers_table,
        "no peers configured (the cluster file lists none besides this node)",
    )


async def cmd_ls(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        return _show(args, await client.tensors(), tensors_table)


async def cmd_transfers(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        return _show(args, await client.transfers(), transfers_table)


async def cmd_send(args: argparse.Namespace) -> int:
    from .control.client import ControlError

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

    async with _client(args) as client:
        with Bars() as bars:
            try:
                results = await _following(
                    client, bars, match, lambda: client.send(args.to, path=path, name=args.name)
                )
            except ControlError as exc:
                if not (_hidden_from_daemon(exc, path) and path.suffix == ".npy"):
                    raise _unseen_file(exc, path) from None
                # The daemon cannot open it (PrivateTmp=, ProtectHome=, another user's home):
                # stream it into the daemon's store, then send it from there.
                stored = args.name or path.stem
                await client.upload(stored, path)
                results = await _following(
                    client, bars, match, lambda: client.send(args.to, name=stored)
                )
    for r in results:
        print(summary("sent", "to", r["name"], r.get("peer") or args.to, r, r["retries"]))
    return 0


def _hidden_from_daemon(exc: ControlError, path: Path) -> bool:
    text = str(exc)
    return (
        exc.code == "bad_request"
        and ("no such file" in text or "permission denied" in text)
        and os.access(path, os.R_OK)
    )


def _unseen_file(exc: ControlError, path: Path) -> ControlError:
    """The daemon opens the file itself: one it cannot find but we can is hidden from it."""
    from .control.client import ControlError

    if exc.code == "bad_request" and "no such file" in str(exc) and path.exists():
        return ControlError(
            f"{exc}; it exists here, so the daemon cannot see it (under systemd, PrivateTmp= "
            "and ProtectHome= hide /tmp and /home from it): move it where the daemon can read it",
            code=exc.code,
            status=exc.status,
        )
    return exc


async def cmd_pull(args: argparse.Namespace) -> int:
    def match(ev: Json) -> bool:
        return (
            ev["direction"] == "receive"
            and ev["name"] == args.name
            and _peer_matches(args.peer, ev["peer"])
        )

    async with _client(args) as client:
        with Bars() as bars:
            reply = await _following(
                client, bars, match, lambda: client.pull(args.peer, args.name, as_name=args.as_name)
            )
        stored = reply["tensor"]["name"]
        name = args.name if stored == args.name else f"{args.name} as {stored}"
        print(summary("pulled", "from", name, args.peer, reply["transfer"], bars.retries(match)))
        if args.output:
            info = await client.download(stored, args.output)
            print(f"wrote {stored} to {info['path']} ({human_bytes(info['file_bytes'])})")
    return 0


async def cmd_get(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        info = await client.download(args.name, args.output)
    print(f"wrote {args.name} to {info['path']} ({human_bytes(info['file_bytes'])})")
    return 0


async def cmd_rm(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        await client.delete(args.name)
    print(f"deleted {args.name}")
    return 0


async def cmd_reload(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        reply = await client.reload()
    print(f"reloaded the configuration: {_plural(reply['peers'], 'peer', 'peers')}")
    return 0


async def cmd_watch(args: argparse.Namespace) -> int:
    from .control.client import ControlError

    async with _client(args) as client, client.subscribe() as events:
        # On stderr, so that stdout is only events; also tells a script the watch is live.
        print(f"watching {client.socket} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        with Bars(drop_finished=True) as bars:
            async for ev in events:
                if args.json:
                    print(json.dumps(ev), flush=True)
                    continue
                if ev.get("kind") == "transfer":
                    bars.update(ev)
                    if bars.live and ev["state"] == "progress":
                        continue  # the bar shows it
                bars.print(event_line(ev))
    raise ControlError("the daemon closed the events stream (did it stop?)")


# -- downloads


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def downloads_table(jobs: Sequence[Json]) -> str:
    rows = []
    for j in jobs:
        total = j.get("bytes_total")
        done = human_bytes(j["bytes_done"]) + (f" / {human_bytes(total)}" if total else "")
        what = j["source"] + (f" ({j['error']})" if j.get("error") else "")
        rows.append([j["id"], j["state"], done, str(j.get("connections", 0)), what])
    return table(["ID", "STATE", "BYTES", "CONN", "SOURCE"], rows, right="BYTES CONN")


class DownloadBars(AbstractContextManager["DownloadBars"]):
    """A total bar and one bar per layer, with the connections in use, from download events."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        console = Console(stderr=True)
        self.live = console.is_terminal and not console.is_dumb_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=not self.live,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._total: TaskID | None = None
        self._layers: dict[str, TaskID] = {}
        self.max_connections = 0

    def __enter__(self) -> DownloadBars:
        self.progress.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def update(self, ev: Json) -> None:
        self.max_connections = max(self.max_connections, int(ev.get("connections") or 0))
        info = f"{ev.get('connections', 0)} connections, {ev.get('retries', 0)} retries"
        if self._total is None:
            self._total = self.progress.add_task("total", total=ev.get("bytes_total"), info=info)
        self.progress.update(
            self._total, completed=ev["bytes_done"], total=ev.get("bytes_total"), info=info
        )
        for digest, done, total in ev.get("layers") or []:
            task = self._layers.get(digest)
            if task is None:
                task = self.progress.add_task(f"  {_short(digest)}", total=total, info="")
                self._layers[digest] = task
            self.progress.update(task, completed=done, total=total or None)


async def _follow_download(
    args: argparse.Namespace, start: Callable[[AsyncClient], Awaitable[Json]]
) -> int:
    from .control.client import ControlError

    async with _client(args) as client:
        if args.detach:
            job = await start(client)
            print(f"download {job['id']}: {job['source']} ({job['state']}); "
                  f"see `tensord downloads`")  # fmt: skip
            return 0
        started = time.perf_counter()
        connections = 0
        async with client.subscribe() as events:
            job = await start(client)
            if job["state"] in ("done", "failed", "cancelled"):
                last: Json = job
            else:
                last = job
                with DownloadBars() as bars:
                    async for ev in events:
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
                final = await client.download_job(job["id"])
                connections = max(connections, int(final.get("peak_connections") or 0))
    if last["state"] == "failed":
        raise ControlError(last.get("detail") or last.get("error") or "the download failed")
    if last["state"] == "cancelled":
        raise ControlError(f"download {job['id']} was cancelled")
    seconds = time.perf_counter() - started
    size = int(last.get("bytes_total") or last.get("bytes_done") or 0)
    line = f"downloaded {job['source']}: {human_bytes(size)} in {seconds:.2f} s"
    if seconds > 0 and job["state"] != "done" and connections > 0:
        used = _plural(connections, "connection", "connections")
        line += f" ({human_rate(size / seconds)}, up to {used}"
        line += f", {_plural(int(last.get('retries') or 0), 'retry', 'retries')})"
    print(line)
    return 0


async def cmd_pull_model(args: argparse.Namespace) -> int:
    return await _follow_download(args, lambda c: c.pull_model(args.reference))


async def cmd_download(args: argparse.Namespace) -> int:
    return await _follow_download(args, lambda c: c.download_url(args.url, args.sha256))


async def cmd_downloads(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.cancel:
            job = await client.cancel_download(args.cancel)
            print(f"download {job['id']}: {job['state']}")
            return 0
        return _show(args, await client.downloads(), downloads_table)


_COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
