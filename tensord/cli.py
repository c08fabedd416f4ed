"""The ``tensord`` command. ``tensord serve`` runs a node in the foreground.

Configuration errors print one line and exit with status 78 (EX_CONFIG), which systemd
reports as a configuration problem rather than restarting in a loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import trio

from ._version import __version__
from .config import load_settings
from .errors import ConfigError
from .logs import setup_logging

log = logging.getLogger("tensord")


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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    if command == "version":
        print(f"tensord {__version__}")
        return 0
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
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
