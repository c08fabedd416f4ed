"""The protocol's messages: frozen dataclasses, and their strict (de)serialisation to header maps.

A frame's header is a msgpack map whose ``t`` key names the message; ``n``, when present, is the
length of the raw payload that follows the header. Decoding validates every field's type and range
and raises :class:`ProtocolError` - a peer's bytes never reach the state machines unchecked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ProtocolError
from ..limits import MIN_CHUNK, check_name
from .meta import TensorMeta

PROTOCOL_NAME = "tensord"
_ID_RE = re.compile(r"^[0-9a-f]{8,64}\Z")  # \Z: "$" lets "x\n" through
Ranges = tuple[tuple[int, int], ...]  # half-open [start, end) ranges of chunk indices

NONCE_LEN = 32  # bytes of a handshake challenge
PROOF_LEN = 32  # bytes of an HMAC-SHA256 proof
MAX_RANGES = 4096
MAX_MESSAGE_LEN = 1024


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
class Stored:
    """The receiver verified the whole tensor and holds it."""

    id: str


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
)


def payload_len(msg: Message) -> int:
    """Length of the raw payload that follows this message's header."""
    if isinstance(msg, Chunk | Legacy):
        return msg.wire_len
    return 0


# ---------------------------------------------------------------------------------------------
# Encoding: message -> header map.


def _ranges(r: Ranges) -> list[list[int]]:
    return [[a, b] for a, b in r]


def to_header(msg: Message) -> dict[str, Any]:
    """The header map of a message (msgpack-ready)."""
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
        case Begin(id, meta, chunk_size, window, resume):
            return {
                "t": "begin",
                "id": id,
                "meta": meta.to_wire(),
                "cs": chunk_size,
                "w": window,
                "resume": resume,
            }
        case Accept(id, have):
            return {"t": "accept", "id": id, "have": _ranges(have)}
        case Nack(id, index):
            return {"t": "nack", "id": id, "i": index}
        case End(id, crc):
            return {"t": "end", "id": id, "c": crc}
        case Stored(id):
            return {"t": "stored", "id": id}
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
    )


def _chunk(f: _Fields, _: int) -> Chunk:
    return Chunk(
        f.id(), f.int_("i"), f.int_("o"), f.int_("r"), f.int_("n"), f.opt_crc("c"), f.bool_("z")
    )


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


_DECODERS: dict[str, Callable[[_Fields, int], Message]] = {
    "hello": _hello,
    "auth": _auth,
    "begin": _begin,
    "accept": lambda f, _: Accept(f.id(), f.ranges("have")),
    "chunk": _chunk,
    "ack": lambda f, _: Ack(f.id(), f.int_("u"), f.ranges("r")),
    "nack": lambda f, _: Nack(f.id(), f.int_("i")),
    "end": lambda f, _: End(f.id(), f.opt_crc("c")),
    "stored": lambda f, _: Stored(f.id()),
    "error": _error,
    "request": lambda f, _: Request(f.name(), f.id() if "id" in f.h else None),
    "tensor": _legacy,
    "ping": lambda f, _: Ping(f.int_("s")),
    "pong": lambda f, _: Pong(f.int_("s")),
}
