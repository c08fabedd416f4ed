"""``tensord certs``: the two commands that set up mutual TLS for a cluster.

``tensord certs init-ca`` once, on an operator's machine (the CA key should stay there), then
``tensord certs issue NODE_ID`` for each node; each prints the files it wrote and the cluster-file
snippet that points a node at them. Kept apart from the client commands so that it needs neither
trio nor a daemon: it only writes files. :mod:`tensord.certs` (and so ``cryptography``) is
imported only when a ``certs`` command runs, so that adding these commands costs the other
``tensord`` commands no start-up time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DEFAULT_CA_DIR = Path("tensord-ca")


def add_commands(sub: Any) -> None:
    """Add ``certs init-ca`` and ``certs issue`` to ``sub``, an argparse subparsers object."""
    certs = sub.add_parser("certs", help="create the cluster CA and node certificates (TLS)")
    certs_sub = certs.add_subparsers(dest="certs_command", metavar="{init-ca,issue}", required=True)

    init = certs_sub.add_parser(
        "init-ca",
        help="create the cluster CA (ca.crt and ca.key)",
        description="Create the cluster CA that signs every node's certificate. Keep ca.key on "
        "this machine; copy ca.crt to every node.",
    )
    init.add_argument(
        "--dir",
        metavar="DIR",
        type=Path,
        default=DEFAULT_CA_DIR,
        help=f"where to write ca.crt and ca.key (default: ./{DEFAULT_CA_DIR})",
    )
    init.add_argument(
        "--days", metavar="N", type=int, default=3650, help="validity in days (default: 3650)"
    )

    node = certs_sub.add_parser(
        "issue",
        help="issue a node its key and certificate, signed by the cluster CA",
        description="Write NODE_ID.crt and NODE_ID.key, signed by the cluster CA. Issuing "
        "again for the same node replaces them (that is how a certificate is renewed).",
    )
    node.add_argument("node_id", metavar="NODE_ID", help="the node's id, as in the cluster file")
    node.add_argument(
        "--ca-dir",
        metavar="DIR",
        type=Path,
        default=DEFAULT_CA_DIR,
        help=f"the cluster CA made by init-ca (default: ./{DEFAULT_CA_DIR})",
    )
    node.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=Path(),
        help="where to write the node's files (default: the current directory)",
    )
    node.add_argument(
        "--host",
        metavar="HOST",
        action="append",
        dest="hosts",
        default=None,
        help="a hostname or IP address to add to the certificate (repeatable); "
        "tensord checks the node id, this is for other tools",
    )
    node.add_argument(
        "--days", metavar="N", type=int, default=825, help="validity in days (default: 825)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the ``certs`` command in ``args``; a ``ConfigError`` is one line and status 78."""
    try:
        if args.certs_command == "init-ca":
            return _init_ca(args)
        return _issue(args)
    except ConfigError as exc:
        print(f"tensord: {exc}", file=sys.stderr)
        return ConfigError.exit_code


def _shown(path: Path) -> str:
    """Absolute, so that the snippet still means the same file when read elsewhere."""
    return os.path.abspath(path)


def _init_ca(args: argparse.Namespace) -> int:
    from ..certs import init_ca

    cert, key = init_ca(args.dir, days=args.days)
    print(f"wrote {_shown(cert)} (the cluster CA certificate: copy it to every node)")
    print(f"wrote {_shown(key)} (the CA's private key: keep it here, off the nodes)")
    print(f"next, for each node: tensord certs issue NODE_ID --ca-dir {_shown(args.dir)}")
    return 0


def _issue(args: argparse.Namespace) -> int:
    from ..certs import CA_CERT_NAME, issue

    node_id: str = args.node_id
    cert, key = issue(args.ca_dir, node_id, args.out, days=args.days, hosts=args.hosts or ())
    print(f"wrote {_shown(cert)} (node {node_id}'s certificate)")
    print(f"wrote {_shown(key)} (node {node_id}'s private key: only {node_id} needs it)")
    ca = args.ca_dir / CA_CERT_NAME
    tls = {"ca": _shown(ca), "cert": _shown(cert), "key": _shown(key)}
    print(
        f"copy {ca.name}, {cert.name} and {key.name} to node {node_id}, "
        "and point its cluster file at them (adjust the paths to where they are there):"
    )
    print(f'  "security": {json.dumps({"tls": tls})}')
    shared = {
        "ca": "/etc/tensord/tls/ca.crt",
        "cert": "/etc/tensord/tls/{node}.crt",
        "key": "/etc/tensord/tls/{node}.key",
    }
    print("or, in a cluster file shared by every node ({node} is each node's own id):")
    print(f'  "security": {json.dumps({"tls": shared})}')
    return 0


__all__ = ["DEFAULT_CA_DIR", "add_commands", "run"]
