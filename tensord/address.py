"""Peer addresses: ``tensord://<node-id>@host:port`` tickets, bare ``host:port``, or a node id
from the cluster file."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import HostPort, Settings, parse_hostport, parse_node_id
from .errors import BadAddress, ConfigError

SCHEME = "tensord://"
_TICKET_RE = re.compile(r"^tensord://([^@/\s]+)@([^/\s]+?)/?$")


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """Where a peer listens, and the node id it is expected to have (if known)."""

    host: str
    port: int
    node_id: str | None = None

    @property
    def hostport(self) -> HostPort:
        return HostPort(self.host, self.port)

    def ticket(self) -> str:
        return f"{SCHEME}{self.node_id or '_'}@{self.hostport}"

    def __str__(self) -> str:
        return self.ticket() if self.node_id else str(self.hostport)


def parse_address(text: object) -> PeerAddress:
    """Parse a ticket (``tensord://id@host:port``) or ``host:port``. Raises :class:`BadAddress`."""
    if not isinstance(text, str) or not text or len(text) > 512:
        raise BadAddress(
            f"bad peer address {str(text)[:80]!r}: expected tensord://<node-id>@"
            "host:port or host:port"
        )
    try:
        if text.startswith(SCHEME):
            m = _TICKET_RE.match(text)
            if not m:
                raise ConfigError("malformed ticket")
            node_id = None if m.group(1) == "_" else parse_node_id("node id", m.group(1))
            hp = parse_hostport("address", m.group(2))
            return PeerAddress(hp.host, hp.port, node_id)
        if "://" in text:
            raise ConfigError("unknown scheme")
        hp = parse_hostport("address", text)
        return PeerAddress(hp.host, hp.port)
    except ConfigError:
        raise BadAddress(
            f"bad peer address {text[:80]!r}: expected tensord://<node-id>@host:port "
            "or host:port (port 1-65535)"
        ) from None


def resolve_peer(settings: Settings, peer: str | PeerAddress) -> PeerAddress:
    """A peer given as a node id of the cluster file, a ticket, or ``host:port``."""
    if isinstance(peer, PeerAddress):
        return peer
    if isinstance(peer, str):
        entry = settings.node(peer)
        if entry is not None:
            return PeerAddress(entry.addr.host, entry.addr.port, entry.id)
        if "@" not in peer and ":" not in peer:
            known = ", ".join(n.id for n in settings.nodes) or "none: no cluster file"
            raise BadAddress(
                f"unknown peer {peer!r}: not a node id of the cluster (known: "
                f"{known}) nor an address"
            )
    return parse_address(peer)
