"""The protocol's messages: frozen dataclasses, and their strict (de)serialisation to header maps.

A frame's header is a msgpack map whose ``t`` key names the message; ``n``, when present, is the
length of the raw payload that follows the header. Decoding validates every field's type and range
and raises :class:`ProtocolError` - a peer's bytes never reach the state machines unchecked.

(Over ~800 lines on purpose: every message and the bounds its fields are checked against sit
side by side, so a reviewer reads what the wire may carry in one place; the two hottest
headers, ``Chunk`` and ``End``, also have typed fast paths here, property-tested against the
general decoder.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ProtocolError
from ..limits import MAX_CHUNK, MIN_CHUNK, check_name
from .meta import TensorMeta

PROTOCOL_NAME = "tensord"
_ID_RE = re.compile(r"^[0-9a-f]{8,64}\Z")  # \Z: "$" lets "x\n" through
Ranges = tuple[tuple[int, int], ...]  # half-open [start, end) ranges of chunk indices

NONCE_LEN = 32  # bytes of a handshake challenge
PROOF_LEN = 32  # bytes of an HMAC-SHA256 proof
MAX_RANGES = 4096
MAX_MESSAGE_LEN = 1024
#: Peers one chain broadcast may name (``Begin.chain``, ``Stored.outcomes``).
MAX_CHAIN = 64
CHAIN_STATUSES = frozenset({"stored", "failed", "fallback"})
#: A chain entry: a ticket ``tensord://<node-id or _>@host:port`` (the relay dials it).
_CHAIN_PEER_RE = re.compile(
    r"tensord://(_|[A-Za-z0-9][A-Za-z0-9._-]{0,62})@"
    r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):[0-9]{1,5}\Z"
)

#: A blob's name on the wire: its content digest (the one form a path is ever built from).
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
#: Digests one ``Query`` may name (and entries one ``Have`` may carry).
MAX_QUERY_DIGESTS = 256
#: Bounds of a blob's piece size, and of one ``PieceRequest``'s length (at most one piece).
MIN_PIECE = MIN_CHUNK
MAX_PIECE = MAX_CHUNK
#: The largest blob a peer may describe (4 TiB: beyond any model layer).
MAX_BLOB_BYTES = 1 << 42
#: A model reference a peer may ask this node to pull (``PullModel``): bounded in length and
#: to the characters of ``[http://]REGISTRY/NAME:TAG@sha256:...`` (``[::1]:5000`` included);
#: the download manager parses it further, as it does the control API's.
MAX_MODEL_REF = 512
MODEL_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@\[\]+-]{0,511}\Z")


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame each way. The listener's reply lists exactly the version and features agreed."""

    proto: str
    versions: tuple[int, ...]
    node: str
    features: frozenset[str]
    max_chunk: int
    #: A fresh random challenge, sent when this side authenticates with the cluster secret.
    nonce: bytes | None = None
    #: The listener's proof (HMAC over both hellos) that it knows the cluster secret.
    proof: bytes | None = None


@dataclass(frozen=True, slots=True)
class Auth:
    """The dialer's proof that it knows the cluster secret: its third handshake message."""

    proof: bytes


@dataclass(frozen=True, slots=True)
class Begin:
    """A sender starts (or, with ``resume``, continues) transfer ``id`` of a tensor."""

    id: str
    meta: TensorMeta
    chunk_size: int
    window: int  # chunks the sender may have unacknowledged
    resume: bool = False
    #: A chain broadcast (feature ``chain``): the peers the receiver forwards the tensor to,
    #: in order (the first one gets the rest). ``()``: the chain's tail; ``None``: no chain.
    chain: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Accept:
    """Reply to a resuming ``Begin``: the chunks the receiver already has."""

    id: str
    have: Ranges


@dataclass(frozen=True, slots=True)
class Chunk:
    """Header of one chunk; ``wire_len`` payload bytes follow (lz4 block if ``compressed``)."""

    id: str
    index: int
    offset: int
    raw_len: int
    wire_len: int
    crc: int | None  # crc32c of the payload as sent; None if crc32c was not negotiated
    compressed: bool = False


@dataclass(frozen=True, slots=True)
class Ack:
    """Cumulative + selective: all chunks below ``upto``, plus ``ranges``, are stored."""

    id: str
    upto: int
    ranges: Ranges = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """Chunk ``index`` arrived damaged; send it again."""

    id: str
    index: int


@dataclass(frozen=True, slots=True)
class End:
    """All chunks have been sent; ``crc`` is the crc32c of the whole tensor's bytes."""

    id: str
    crc: int | None


@dataclass(frozen=True, slots=True)
class ChainOutcome:
    """What became of one peer of a chain broadcast (not a message: ``Stored`` carries it).

    ``peer`` is the chain entry as the ``Begin`` named it; ``status`` one of
    :data:`CHAIN_STATUSES`: ``stored``, ``failed``, or ``fallback`` (not reached: a peer before
    it lacks the ``chain`` feature, so the origin sends to it directly). The byte counts are of
    the link that delivered it: ``sent`` on the wire, ``resent`` of those twice, ``skipped``
    already held when the link resumed (after a repair).
    """

    peer: str
    status: str
    detail: str = ""
    sent: int = 0
    resent: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class Stored:
    """The receiver verified the whole tensor and holds it. In a chain broadcast it answers
    only once the rest of the chain has answered, with ``outcomes`` for each peer after it."""

    id: str
    outcomes: tuple[ChainOutcome, ...] = ()


@dataclass(frozen=True, slots=True)
class Error:
    """A refusal or failure. ``id`` names the transfer, if the error is about one."""

    code: str
    message: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """Pull: ask the peer to send its tensor ``name`` on this connection. ``resume`` names the
    transfer of an interrupted pull: the peer sends it again under that id with ``Begin(resume)``
    so that only the chunks we lack cross the wire (a peer that ignores it starts over)."""

    name: str
    resume: str | None = None


@dataclass(frozen=True, slots=True)
class Legacy:
    """Legacy mode: the whole tensor in one frame; ``wire_len`` == ``meta.nbytes`` bytes follow."""

    meta: TensorMeta
    crc: int | None
    wire_len: int


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """What a node holds of one blob (not a message: ``Have`` and ``Announce`` carry it).

    ``pieces`` are the piece indices held, as sorted disjoint half-open ranges of pieces of
    ``piece_size`` bytes (the last one may be shorter); a ``complete`` blob holds all of them.
    ``fetching`` says the node is downloading the blob now: more pieces will land.
    """

    digest: str
    size: int
    piece_size: int
    complete: bool
    pieces: Ranges = ()
    fetching: bool = False

    @property
    def npieces(self) -> int:
        return -(-self.size // self.piece_size)

    @classmethod
    def whole(cls, digest: str, size: int, piece_size: int) -> BlobEntry:
        """A complete blob: every piece held."""
        n = -(-size // piece_size)
        return cls(digest, size, piece_size, True, ((0, n),) if n else ())


@dataclass(frozen=True, slots=True)
class Query:
    """Pieces: which of these blobs does the peer hold? Answered by ``Have``."""

    digests: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Have:
    """Reply to ``Query``: an entry per blob asked about that the node holds, complete or
    arriving (blobs it knows nothing of are left out)."""

    entries: tuple[BlobEntry, ...]


@dataclass(frozen=True, slots=True)
class Announce:
    """Pieces: "I hold (or am fetching) this blob", pushed to a peer; answered by ``Noted``.
    Nodes that start the same pull at the same moment learn of each other this way."""

    entry: BlobEntry


@dataclass(frozen=True, slots=True)
class Noted:
    """Reply to ``Announce``."""

    digest: str


@dataclass(frozen=True, slots=True)
class PieceRequest:
    """Pieces: send bytes ``[offset, offset + length)`` of blob ``digest``. Answered by
    ``PieceChunk`` frames covering the range in order, or by an ``Error`` (``not_found``,
    ``not_yet``: the range did not land within the server's wait, ``bad_range``)."""

    digest: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class PieceChunk:
    """Header of part of a requested range: ``wire_len`` raw bytes at blob offset ``offset``
    follow, with their crc32c (always: a piece is verified per chunk, the blob by SHA-256)."""

    offset: int
    wire_len: int
    crc: int


@dataclass(frozen=True, slots=True)
class PullModel:
    """Remote pull (``remote_pull``): start a background pull of model ``ref`` on the peer (which
    shares its pieces with the others that pull it). Answered by ``PullStarted`` or an
    ``Error`` (``unsupported``: the peer takes no pull requests; ``download``: a bad reference)."""

    ref: str


@dataclass(frozen=True, slots=True)
class PullStarted:
    """Reply to ``PullModel``: the id of the download job the peer started (or already runs)."""

    job: str


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int


@dataclass(frozen=True, slots=True)
class Pong:
    seq: int


Message = (
    Hello
    | Auth
    | Begin
    | Accept
    | Chunk
    | Ack
    | Nack
    | End
    | Stored
    | Error
    | Request
    | Legacy
    | Ping
    | Pong
    | Query
    | Have
    | Announce
    | Noted
    | PieceRequest
    | PieceChunk
    | PullModel
    | PullStarted
)


def payload_len(msg: Message) -> int:
    """Length of the raw payload that follows this message's header."""
    if isinstance(msg, Chunk | Legacy | PieceChunk):
        return msg.wire_len
    return 0


# ---------------------------------------------------------------------------------------------
# Encoding: message -> header map.


def _ranges(r: Ranges) -> list[list[int]]:
    return [[a, b] for a, b in r]


def _entry(e: BlobEntry) -> dict[str, Any]:
    h: dict[str, Any] = {"d": e.digest, "s": e.size, "ps": e.piece_size}
    if e.complete:
        h["c"] = True  # every piece: the list is implied
    else:
        h["p"] = _ranges(e.pieces)
    if e.fetching:
        h["f"] = True
    return h


def _chunk_header(msg: Chunk) -> dict[str, Any]:
    h: dict[str, Any] = {
        "t": "chunk",
        "id": msg.id,
        "i": msg.index,
        "o": msg.offset,
        "r": msg.raw_len,
        "n": msg.wire_len,
    }
    if msg.crc is not None:
        h["c"] = msg.crc
    if msg.compressed:
        h["z"] = True
    return h


def _end_header(msg: End) -> dict[str, Any]:
    return {"t": "end", "id": msg.id, "c": msg.crc}


def _stored_header(msg: Stored) -> dict[str, Any]:
    if msg.outcomes:
        return _to_header(msg)
    return {"t": "stored", "id": msg.id}


#: The messages of every transfer, mapped by type straight to their header (the ``match`` of
#: :func:`_to_header` tries the cases in turn): the same maps, built with fewer steps.
_HOT_HEADERS: dict[type, Callable[[Any], dict[str, Any]]] = {
    Chunk: _chunk_header,
    End: _end_header,
    Stored: _stored_header,
}


def to_header(msg: Message) -> dict[str, Any]:
    """The header map of a message (msgpack-ready)."""
    hot = _HOT_HEADERS.get(type(msg))
    return hot(msg) if hot is not None else _to_header(msg)


def _to_header(msg: Message) -> dict[str, Any]:
    match msg:
        case Chunk(id, index, offset, raw_len, wire_len, crc, compressed):
            h: dict[str, Any] = {
                "t": "chunk",
                "id": id,
                "i": index,
                "o": offset,
                "r": raw_len,
                "n": wire_len,
            }
            if crc is not None:
                h["c"] = crc
            if compressed:
                h["z"] = True
            return h
        case Ack(id, upto, ranges):
            h = {"t": "ack", "id": id, "u": upto}
            if ranges:
                h["r"] = _ranges(ranges)
            return h
        case Hello(proto, versions, node, features, max_chunk, nonce, proof):
            h = {
                "t": "hello",
                "proto": proto,
                "v": list(versions),
                "node": node,
                "f": sorted(features),
                "mc": max_chunk,
            }
            if nonce is not None:
                h["nc"] = nonce
            if proof is not None:
                h["pf"] = proof
            return h
        case Auth(proof):
            return {"t": "auth", "pf": proof}
        case Begin(id, meta, chunk_size, window, resume, chain):
            h = {
                "t": "begin",
                "id": id,
                "meta": meta.to_wire(),
                "cs": chunk_size,
                "w": window,
                "resume": resume,
            }
            if chain is not None:
                h["chain"] = list(chain)
            return h
        case Accept(id, have):
            return {"t": "accept", "id": id, "have": _ranges(have)}
        case Nack(id, index):
            return {"t": "nack", "id": id, "i": index}
        case End(id, crc):
            return {"t": "end", "id": id, "c": crc}
        case Stored(id, outcomes):
            h = {"t": "stored", "id": id}
            if outcomes:
                h["out"] = [
                    {
                        "p": o.peer,
                        "s": o.status,
                        "d": o.detail[:MAX_MESSAGE_LEN],
                        "n": o.sent,
                        "r": o.resent,
                        "k": o.skipped,
                    }
                    for o in outcomes
                ]
            return h
        case Error(code, message, id):
            return {"t": "error", "code": code, "msg": message[:MAX_MESSAGE_LEN], "id": id}
        case Request(name, resume):
            h = {"t": "request", "name": name}
            if resume is not None:
                h["id"] = resume
            return h
        case Legacy(meta, crc, wire_len):
            return {"t": "tensor", "meta": meta.to_wire(), "c": crc, "n": wire_len}
        case Ping(seq):
            return {"t": "ping", "s": seq}
        case Pong(seq):
            return {"t": "pong", "s": seq}
        case Query(digests):
            return {"t": "query", "d": list(digests)}
        case Have(entries):
            return {"t": "have", "b": [_entry(e) for e in entries]}
        case Announce(entry):
            return {"t": "announce", "b": _entry(entry)}
        case Noted(digest):
            return {"t": "noted", "d": digest}
        case PieceRequest(digest, offset, length):
            return {"t": "piece", "d": digest, "o": offset, "l": length}
        case PieceChunk(offset, wire_len, crc):
            return {"t": "pchunk", "o": offset, "n": wire_len, "c": crc}
        case PullModel(ref):
            return {"t": "pullmodel", "m": ref}
        case PullStarted(job):
            return {"t": "pullstarted", "j": job}
    raise TypeError(f"not a message: {msg!r}")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# Decoding: header map -> message, validating every field.


class _Fields:
    """Typed accessors over a header map that raise ProtocolError naming the message and field."""

    __slots__ = ("h", "t")

    def __init__(self, h: dict[Any, Any], t: str) -> None:
        self.h = h
        self.t = t

    def _bad(self, key: str, what: str) -> ProtocolError:
        return ProtocolError(f"{self.t!r} frame: field {key!r} must be {what}")

    def int_(self, key: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
        v = self.h.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self._bad(key, f"an integer in {lo}..{hi}")
        return v

    def opt_crc(self, key: str) -> int | None:
        if self.h.get(key) is None:
            return None
        return self.int_(key, 0, 0xFFFFFFFF)

    def str_(self, key: str, max_len: int = 256) -> str:
        v = self.h.get(key)
        if not isinstance(v, str) or len(v) > max_len:
            raise self._bad(key, f"a string of at most {max_len} characters")
        return v

    def name(self, key: str = "name") -> str:
        """A tensor name, checked by the one validator every entry uses (``bad_name``)."""
        return check_name(self.h.get(key))

    def id(self, key: str = "id") -> str:
        v = self.h.get(key)
        if not isinstance(v, str) or not _ID_RE.match(v):
            raise self._bad(key, "a transfer id (8-64 lowercase hex digits)")
        return v

    def opt_bytes(self, key: str, size: int) -> bytes | None:
        v = self.h.get(key)
        if v is None:
            return None
        if not isinstance(v, bytes) or len(v) != size:
            raise self._bad(key, f"{size} bytes")
        return v

    def digest(self, key: str = "d") -> str:
        v = self.h.get(key)
        if not isinstance(v, str) or not DIGEST_RE.match(v):
            raise self._bad(key, "a blob digest: sha256:<64 lowercase hex digits>")
        return v

    def bool_(self, key: str, default: bool = False) -> bool:
        v = self.h.get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, "a boolean")
        return v

    def ranges(self, key: str) -> Ranges:
        v = self.h.get(key, [])
        if not isinstance(v, list) or len(v) > MAX_RANGES:
            raise self._bad(key, f"a list of at most {MAX_RANGES} [start, end) ranges")
        out = []
        for r in v:
            if (
                not isinstance(r, list)
                or len(r) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                or not 0 <= r[0] < r[1] < 1 << 40
            ):
                raise self._bad(key, "a list of [start, end) ranges with 0 <= start < end")
            out.append((r[0], r[1]))
        return tuple(out)


def from_header(h: object, max_tensor_bytes: int) -> Message:
    """Decode and validate a header map. Raises :class:`ProtocolError` on anything unexpected."""
    if not isinstance(h, dict):
        raise ProtocolError("frame header is not a map")
    t = h.get("t")
    decoder = _DECODERS.get(t) if isinstance(t, str) else None
    if decoder is None:
        # Never str() a peer's value: a deeply nested list would raise RecursionError.
        shown = repr(t[:40]) if isinstance(t, str) else f"<{type(t).__name__}>"
        raise ProtocolError(f"unknown message type {shown}", code="unknown_message")
    return decoder(_Fields(h, t), max_tensor_bytes)  # type: ignore[arg-type]


def _hello(f: _Fields, _: int) -> Hello:
    versions = f.h.get("v")
    features = f.h.get("f")
    if (
        not isinstance(versions, list)
        or not 1 <= len(versions) <= 16
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 16 for v in versions
        )
    ):
        raise f._bad("v", "a list of 1-16 protocol versions")
    if (
        not isinstance(features, list)
        or len(features) > 64
        or not all(isinstance(x, str) and len(x) <= 32 for x in features)
    ):
        raise f._bad("f", "a list of at most 64 feature names")
    return Hello(
        f.str_("proto", 32),
        tuple(versions),
        _node_id(f),
        frozenset(features),
        f.int_("mc", MIN_CHUNK),  # a peer's max chunk sizes our chunking of what we send it
        f.opt_bytes("nc", NONCE_LEN),
        f.opt_bytes("pf", PROOF_LEN),
    )


_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _node_id(f: _Fields) -> str:
    """A node id as the cluster file allows them (it goes into logs and events)."""
    node = f.str_("node", 63)
    if not _NODE_ID_RE.fullmatch(node):
        raise f._bad("node", "a node id: 1-63 letters, digits, '.', '_' or '-'")
    return node


def _auth(f: _Fields, _: int) -> Auth:
    proof = f.opt_bytes("pf", PROOF_LEN)
    if proof is None:
        raise f._bad("pf", f"{PROOF_LEN} bytes")
    return Auth(proof)


def _begin(f: _Fields, max_bytes: int) -> Begin:
    return Begin(
        f.id(),
        TensorMeta.from_wire(f.h.get("meta"), max_bytes),
        f.int_("cs", 1),
        f.int_("w", 1, 1 << 20),
        f.bool_("resume"),
        _chain(f) if f.h.get("chain") is not None else None,
    )


def _chain_peer(f: _Fields, v: object, key: str) -> str:
    if not isinstance(v, str) or len(v) > 512 or not _CHAIN_PEER_RE.match(v):
        raise f._bad(key, "peer tickets tensord://<node-id>@host:port")
    port = int(v.rsplit(":", 1)[1])
    if not 0 < port < 1 << 16:
        raise f._bad(key, "peer tickets with a port in 1..65535")
    return v


def _chain(f: _Fields) -> tuple[str, ...]:
    """``Begin.chain``: at most ``MAX_CHAIN`` distinct peer tickets."""
    v = f.h.get("chain")
    if not isinstance(v, list) or len(v) > MAX_CHAIN:
        raise f._bad("chain", f"a list of at most {MAX_CHAIN} peer tickets")
    chain = tuple(_chain_peer(f, p, "chain") for p in v)
    if len(set(chain)) != len(chain):
        raise f._bad("chain", "a list of distinct peer tickets")
    return chain


def _stored(f: _Fields, _: int) -> Stored:
    if "out" not in f.h:  # not in a chain: no outcomes (the common case)
        return Stored(f.id())
    v = f.h["out"]
    if not isinstance(v, list) or len(v) > MAX_CHAIN:
        raise f._bad("out", f"a list of at most {MAX_CHAIN} chain outcomes")
    outcomes = []
    for raw in v:
        if not isinstance(raw, dict):
            raise f._bad("out", "a list of chain outcome maps")
        o = _Fields(raw, f.t)
        status = o.str_("s", 16)
        if status not in CHAIN_STATUSES:
            raise o._bad("s", f"one of {', '.join(sorted(CHAIN_STATUSES))}")
        outcomes.append(
            ChainOutcome(
                _chain_peer(o, raw.get("p"), "p"),
                status,
                _printable(o.str_("d", MAX_MESSAGE_LEN)),
                o.int_("n", 0, 1 << 50),
                o.int_("r", 0, 1 << 50),
                o.int_("k", 0, 1 << 50),
            )
        )
    return Stored(f.id(), tuple(outcomes))


_INT_MAX = (1 << 63) - 1
_CRC_MAX = 0xFFFFFFFF


def _chunk(f: _Fields, _: int) -> Chunk:
    # The hot message: every field checked inline first (the same bounds as the accessors),
    # and only a header that fails is walked again through them, for the precise error.
    h = f.h
    xid, i, o, r, n = h.get("id"), h.get("i"), h.get("o"), h.get("r"), h.get("n")
    c, z = h.get("c"), h.get("z", False)
    if (
        type(i) is int
        and type(o) is int
        and type(r) is int
        and type(n) is int
        and 0 <= i <= _INT_MAX
        and 0 <= o <= _INT_MAX
        and 0 <= r <= _INT_MAX
        and 0 <= n <= _INT_MAX
        and (c is None or (type(c) is int and 0 <= c <= _CRC_MAX))
        and (z is True or z is False)
        and type(xid) is str
        and _ID_RE.match(xid)
    ):
        return Chunk(xid, i, o, r, n, c, z)
    return Chunk(
        f.id(), f.int_("i"), f.int_("o"), f.int_("r"), f.int_("n"), f.opt_crc("c"), f.bool_("z")
    )


def _end(f: _Fields, _: int) -> End:
    h = f.h
    xid, c = h.get("id"), h.get("c")
    if (
        (c is None or (type(c) is int and 0 <= c <= _CRC_MAX))
        and type(xid) is str
        and _ID_RE.match(xid)
    ):
        return End(xid, c)
    return End(f.id(), f.opt_crc("c"))


def _error(f: _Fields, _: int) -> Error:
    xid = f.id() if f.h.get("id") is not None else None
    return Error(_printable(f.str_("code", 64)), _printable(f.str_("msg", MAX_MESSAGE_LEN)), xid)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """A peer's free text goes into our logs: no control characters or terminal escapes."""
    return _CONTROL.sub("?", text)


def _legacy(f: _Fields, max_bytes: int) -> Legacy:
    meta = TensorMeta.from_wire(f.h.get("meta"), max_bytes)
    n = f.int_("n")
    if n != meta.nbytes:
        raise f._bad("n", f"the tensor's nbytes ({meta.nbytes})")
    return Legacy(meta, f.opt_crc("c"), n)


def _blob_entry(raw: object, t: str, key: str) -> BlobEntry:
    """One ``BlobEntry`` map: every number bounded, the piece ranges sorted, disjoint and
    within the blob's piece count."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"{t!r} frame: field {key!r} must be a map of a blob's holdings")
    f = _Fields(raw, t)
    digest = f.digest("d")
    size = f.int_("s", 0, MAX_BLOB_BYTES)
    piece_size = f.int_("ps", MIN_PIECE, MAX_PIECE)
    complete = f.bool_("c")
    fetching = f.bool_("f")
    if complete:
        return replace(BlobEntry.whole(digest, size, piece_size), fetching=fetching)
    pieces = f.ranges("p")
    n = -(-size // piece_size)
    end = 0
    for a, b in pieces:
        if a < end or b > n:
            raise f._bad("p", f"sorted disjoint ranges of piece indices below {n}")
        end = b
    return BlobEntry(digest, size, piece_size, False, pieces, fetching)


def _query(f: _Fields, _: int) -> Query:
    v = f.h.get("d")
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_QUERY_DIGESTS:
        raise f._bad("d", f"a list of 1-{MAX_QUERY_DIGESTS} blob digests")
    return Query(tuple(_Fields({"d": d}, f.t).digest("d") for d in v))


def _have(f: _Fields, _: int) -> Have:
    v = f.h.get("b")
    if not isinstance(v, list) or len(v) > MAX_QUERY_DIGESTS:
        raise f._bad("b", f"a list of at most {MAX_QUERY_DIGESTS} blob entries")
    return Have(tuple(_blob_entry(e, f.t, "b") for e in v))


def _piece_request(f: _Fields, _: int) -> PieceRequest:
    digest = f.digest()
    offset = f.int_("o", 0, MAX_BLOB_BYTES - 1)
    length = f.int_("l", 1, MAX_PIECE)
    if offset + length > MAX_BLOB_BYTES:
        raise f._bad("l", f"a length that ends the range within {MAX_BLOB_BYTES} bytes")
    return PieceRequest(digest, offset, length)


def _piece_chunk(f: _Fields, _: int) -> PieceChunk:
    return PieceChunk(
        f.int_("o", 0, MAX_BLOB_BYTES - 1), f.int_("n", 1, MAX_PIECE), f.int_("c", 0, 0xFFFFFFFF)
    )


def _pull_model(f: _Fields, _: int) -> PullModel:
    ref = f.str_("m", MAX_MODEL_REF)
    if not MODEL_REF_RE.match(ref):
        raise f._bad("m", "a model reference ([REGISTRY/]NAME[:TAG][@sha256:DIGEST])")
    return PullModel(ref)


_DECODERS: dict[str, Callable[[_Fields, int], Message]] = {
    "hello": _hello,
    "auth": _auth,
    "begin": _begin,
    "accept": lambda f, _: Accept(f.id(), f.ranges("have")),
    "chunk": _chunk,
    "ack": lambda f, _: Ack(f.id(), f.int_("u"), f.ranges("r")),
    "nack": lambda f, _: Nack(f.id(), f.int_("i")),
    "end": _end,
    "stored": _stored,
    "error": _error,
    "request": lambda f, _: Request(f.name(), f.id() if "id" in f.h else None),
    "tensor": _legacy,
    "ping": lambda f, _: Ping(f.int_("s")),
    "pong": lambda f, _: Pong(f.int_("s")),
    "query": _query,
    "have": _have,
    "announce": lambda f, _: Announce(_blob_entry(f.h.get("b"), f.t, "b")),
    "noted": lambda f, _: Noted(f.digest()),
    "piece": _piece_request,
    "pchunk": _piece_chunk,
    "pullmodel": _pull_model,
    "pullstarted": lambda f, _: PullStarted(f.id("j")),
}
