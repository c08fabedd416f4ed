"""The ``tensord`` command. ``tensord serve`` runs a node in the foreground.

Configuration errors print one line and exit with status 78 (EX_CONFIG), which systemd
reports as a configuration problem rather than restarting in a loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from ._version import __version__
from .config import Settings, load_settings
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


async def serve(settings: Settings) -> None:
    """Run a node until SIGINT/SIGTERM, logging every tensor that arrives."""
    from .node import TensorNode

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with TensorNode(settings) as node, trio.open_nursery() as nursery:
            log.info(
                "tensord %s: node %s listening on %s (cluster %r, %d peers)",
                __version__,
                node.node_id,
                node.addr,
                settings.cluster_name,
                len(settings.peers),
            )

            async def log_arrivals() -> None:
                while True:
                    arrival = await node.receive_tensor()
                    log.info(
                        "tensor arrived: %r from %s: dtype %s shape %s (%d bytes)",
                        arrival.name,
                        arrival.sender,
                        arrival.array.dtype,
                        arrival.array.shape,
                        arrival.array.nbytes,
                    )

            nursery.start_soon(log_arrivals)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


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
        trio.run(serve, settings)
    except KeyboardInterrupt:  # a signal before the handler was installed
        log.info("interrupted; shutting down")
    except OSError as exc:
        print(f"tensord: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
