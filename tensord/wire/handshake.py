"""Hello and capability negotiation.

The dialer sends ``Hello`` with every version and feature it supports; the listener replies with
``Hello`` carrying the one version and the features both sides have (or ``Error`` and a close).
What one side lacks is never used: a peer without ``chunked`` - an older peer, or one configured
with ``use_streaming_protocol=false`` - gets legacy mode, the whole tensor in one frame; without
``lz4`` nothing is compressed; without ``crc32c`` no checksums are sent or checked; without
``pieces`` no blob holdings are asked for or announced and no piece is requested of the peer;
without ``chain`` a broadcast sends to the peer directly instead of asking it to forward;
without ``remote_pull`` the peer is never asked to pull a model (``pull-model --on``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ProtocolError
from .messages import PROTOCOL_NAME, Hello

VERSIONS: tuple[int, ...] = (1,)
ALL_FEATURES: frozenset[str] = frozenset(
    {"chunked", "lz4", "crc32c", "resume", "pull", "pieces", "chain", "remote_pull"}
)


@dataclass(frozen=True, slots=True)
class Agreement:
    """What two peers agreed on for one connection."""

    version: int
    peer_id: str
    features: frozenset[str]
    peer_max_chunk: int

    @property
    def chunked(self) -> bool:
        return "chunked" in self.features

    @property
    def crc(self) -> bool:
        return "crc32c" in self.features

    @property
    def lz4(self) -> bool:
        return "lz4" in self.features

    @property
    def pieces(self) -> bool:
        return "pieces" in self.features

    @property
    def remote_pull(self) -> bool:
        return "remote_pull" in self.features

    @property
    def resume(self) -> bool:
        return "resume" in self.features and self.chunked


def local_features(*, streaming: bool, compression: bool) -> frozenset[str]:
    """The features this node offers, given its settings."""
    out = set(ALL_FEATURES)
    if not streaming:
        out -= {"chunked", "resume", "chain"}  # a chain relays chunks
    if not compression:
        out.discard("lz4")
    return frozenset(out)


def make_hello(
    node_id: str, features: frozenset[str], max_chunk: int, versions: tuple[int, ...] = VERSIONS
) -> Hello:
    return Hello(PROTOCOL_NAME, versions, node_id, features, max_chunk)


def answer_hello(local: Hello, remote: Hello) -> tuple[Hello, Agreement]:
    """Listener side: the reply to send and the agreement, or :class:`ProtocolError`."""
    if remote.proto != PROTOCOL_NAME:
        raise ProtocolError(
            f"peer speaks {remote.proto!r}, not {PROTOCOL_NAME!r}", code="bad_protocol"
        )
    common = set(local.versions) & set(remote.versions)
    if not common:
        raise ProtocolError(
            f"no common protocol version: ours {list(local.versions)}, the peer's "
            f"{list(remote.versions)}",
            code="version",
        )
    version = max(common)
    features = local.features & remote.features
    reply = Hello(PROTOCOL_NAME, (version,), local.node, features, local.max_chunk)
    return reply, Agreement(version, remote.node, features, remote.max_chunk)


def accept_reply(local: Hello, reply: Hello) -> Agreement:
    """Dialer side: check the listener's reply against what we offered."""
    if reply.proto != PROTOCOL_NAME:
        raise ProtocolError(
            f"peer speaks {reply.proto!r}, not {PROTOCOL_NAME!r}", code="bad_protocol"
        )
    if len(reply.versions) != 1 or reply.versions[0] not in local.versions:
        raise ProtocolError(
            f"peer chose version {list(reply.versions)}, we offered {list(local.versions)}",
            code="version",
        )
    if not reply.features <= local.features:
        extra = ", ".join(sorted(reply.features - local.features))
        raise ProtocolError(f"peer agreed to features we did not offer: {extra}")
    return Agreement(reply.versions[0], reply.node, reply.features, reply.max_chunk)
