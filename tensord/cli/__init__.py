"""The ``tensord`` command. ``tensord serve`` runs a node in the foreground; the other commands
(``status``, ``send``, ``pull``, ``watch``, ...) talk to a running one over its control socket.

Configuration errors print one line and exit with status 78 (EX_CONFIG), which systemd
reports as a configuration problem rather than restarting in a loop. A client command that finds
no daemon exits 69 (EX_UNAVAILABLE), any other error 1, Ctrl-C 130 - each with one line on stderr
(none for Ctrl-C). Progress bars go to stderr and only when it is a terminal; results to stdout.

The package: this module wires the parser and runs a command; :mod:`.commands` holds the
client commands (one function each), :mod:`.render` what they print, :mod:`.progress` the live
bars, :mod:`.certs` the ``certs`` commands (which need neither trio nor a daemon).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ..errors import ConfigError, DaemonNotRunning, ProtocolError, TensorError
from ..limits import check_name
from . import certs
from .commands import COMMANDS

EX_UNAVAILABLE = 69  # sysexits.h: the daemon is not running
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


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
    certs.add_commands(sub)
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
    send = add("send", "send a .npy or .safetensors file's tensors to a peer", as_json)
    send.add_argument("file", metavar="FILE", help=".npy or .safetensors file (read by the daemon)")
    send.add_argument(
        "--to",
        metavar="PEER",
        required=True,
        help="node id, ticket or host:port; b,c,d or all: a pipelined broadcast down that chain",
    )
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
    model.add_argument(
        "--on",
        metavar="all|b,c,...",
        help="ask these nodes of the cluster file (all: every node, this one too) to pull it; "
        "they share the pieces. This node's own pull is followed; the others' are shown as "
        "started (their job ids: see `tensord downloads` there). Exit status 1 if any node "
        "could not start it",
    )
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
        return certs.run(args)
    if command != "serve":
        return run_client_command(command, args)
    # Only here: a client command needs neither the settings' specs nor logging.
    import logging

    from ..config import load_settings
    from ..logs import setup_logging

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
        import trio

        from ..daemon import serve

        return trio.run(serve, settings, os.environ)
    except KeyboardInterrupt:  # a signal before the handler was installed
        logging.getLogger("tensord").info("interrupted; shutting down")
    except OSError as exc:
        print(f"tensord: cannot start: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found while starting (e.g. the gateway's API keys)
        print(f"tensord: configuration error: {exc}", file=sys.stderr)
        return ConfigError.exit_code
    return 0


# --------------------------------------------------------------------------------------------
# Running a client command


def run_client_command(command: str, args: argparse.Namespace) -> int:
    """Run one client command (blocking: no trio, whose import alone costs a quarter of a
    second of CPU); turn its errors into one line and an exit status."""
    try:
        return COMMANDS[command](args)
    except BaseException as exc:
        return _exit_status(exc)


def _exit_status(e: BaseException) -> int:
    """One line on stderr for an error we expect (none for Ctrl-C); a bug keeps its traceback."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(e, BrokenPipeError):
        # `tensord ls | head`: the reader went away. Quietly, and without Python's complaint
        # about flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    if isinstance(e, ConfigError):
        print(f"tensord: configuration error: {e}", file=sys.stderr)
        return ConfigError.exit_code
    if isinstance(e, DaemonNotRunning):
        print(f"{e}" if str(e).startswith("tensord ") else f"tensord: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    if isinstance(e, TensorError | OSError):
        print(f"tensord: {_error_text(e)}", file=sys.stderr)
        return 1
    raise e


def _error_text(e: BaseException) -> str:
    """An error's text, never empty nor ending in a colon: what its causes say is added."""
    text = str(e).strip()
    cause = e.__cause__ or e.__context__
    if (not text or text.endswith(":")) and cause is not None and cause is not e:
        more = _error_text(cause)
        text = f"{text} {more}" if text else more
    return text or f"{type(e).__name__} (no detail given)"


__all__ = ["EXIT_INTERRUPTED", "EX_UNAVAILABLE", "main", "run_client_command"]
