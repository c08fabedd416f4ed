"""Frames: a 4-byte big-endian header length, a msgpack header, then an optional raw payload.

The payload never goes through msgpack: the sender hands the header bytes and a memoryview of the
array to one ``sendmsg`` call, and the receiver's I/O layer asks this decoder how many payload
bytes it already buffered (copying at most a few KiB of read-ahead) and ``recv_into``-s the rest
straight into the destination. This module is sans-I/O: bytes in, messages out.

The decoder checks limits *before* allocating: a header longer than ``max_header`` or a payload
longer than ``max_payload`` is a :class:`ProtocolError`, so a hostile length prefix can't make us
allocate gigabytes, and a truncated frame just waits for more bytes. Containers inside a header
nest at most ``MAX_HEADER_DEPTH`` deep (msgpack itself allows 1024), so no code that looks at a
peer's header - an error message's ``repr`` included - can hit Python's recursion limit.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import partial
from typing import Any

import msgpack

from ..errors import ProtocolError
from .messages import Chunk, Legacy, Message, PieceChunk, from_header, to_header

PREFIX = struct.Struct(">I")
DEFAULT_MAX_HEADER = 64 * 1024
#: The deepest a header's containers may nest; the protocol's own go three deep (header map,
#: ``meta`` map, ``shape`` list).
MAX_HEADER_DEPTH = 8


def _check_depth(header: object) -> None:
    """Raise ProtocolError if ``header``'s lists and maps nest deeper than MAX_HEADER_DEPTH."""
    if not _nests_within(header, MAX_HEADER_DEPTH - 1):
        raise ProtocolError(f"frame header nests deeper than {MAX_HEADER_DEPTH} levels")


def _nests_within(obj: object, levels: int) -> bool:
    """Whether the lists and maps inside ``obj`` nest at most ``levels`` deep (the recursion is
    bounded by MAX_HEADER_DEPTH, whatever the header; a flat map costs one loop)."""
    if type(obj) is dict:
        values: Any = obj.values()
    elif type(obj) is list:
        values = obj
    else:
        return True
    for v in values:
        if (type(v) is dict or type(v) is list) and (
            not levels or not _nests_within(v, levels - 1)
        ):
            return False
    return True


#: One packer for every frame: ``msgpack.packb`` builds (and frees) a packer and its buffer
#: per call. The C packer runs without releasing the GIL and calls no Python code for the
#: plain types of a header, so a call cannot interleave with another thread's; the pure-Python
#: fallback could, so it keeps ``packb``.
if msgpack.Packer.__module__ == "msgpack._cmsgpack":
    _pack: Callable[[object], bytes] = msgpack.Packer(use_bin_type=True).pack
else:  # pragma: no cover - msgpack without its C extension
    _pack = partial(msgpack.packb, use_bin_type=True)


def encode(msg: Message) -> bytes:
    """The prefix and header of ``msg``. The caller sends its payload (if any) right after."""
    header = _pack(to_header(msg))
    return PREFIX.pack(len(header)) + header


def encode_many(*msgs: Message) -> bytes:
    """Several payload-less frames in one buffer (one write)."""
    return b"".join(encode(m) for m in msgs)


class FrameDecoder:
    """Incremental frame decoder.

    Feed bytes with :meth:`feed`; :meth:`next_message` returns the next header's message or
    ``None`` if more bytes are needed. After a message with a payload, the payload must be taken
    (:meth:`take_payload_into` for what is buffered, then :meth:`payload_received` for bytes the
    caller read directly) before the next message can be decoded.
    """

    def __init__(
        self,
        max_header: int = DEFAULT_MAX_HEADER,
        max_payload: int = 64 << 20,
        max_tensor_bytes: int = 1 << 40,
    ) -> None:
        self.max_header = max_header
        self.max_payload = max_payload
        self.max_tensor_bytes = max_tensor_bytes
        self._buf = bytearray()
        self._pos = 0
        self.payload_pending = 0
        self._unpackb: Callable[[memoryview], Any] = partial(
            msgpack.unpackb,
            raw=False,
            strict_map_key=True,
            max_bin_len=64,  # handshake nonces and proofs; payloads never go through msgpack
            max_ext_len=0,
            max_str_len=max_header,
            max_array_len=max_header,
            max_map_len=64,
        )

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet consumed."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_message(self) -> Message | None:
        if self.payload_pending:
            raise RuntimeError("the previous frame's payload has not been consumed")
        avail = len(self._buf) - self._pos
        if avail < PREFIX.size:
            return None
        (hlen,) = PREFIX.unpack_from(self._buf, self._pos)
        if hlen == 0 or hlen > self.max_header:
            raise ProtocolError(
                f"frame header of {hlen} bytes is outside 1..{self.max_header}", code="too_large"
            )
        if avail < PREFIX.size + hlen:
            return None
        start = self._pos + PREFIX.size
        try:
            raw = self._unpackb(memoryview(self._buf)[start : start + hlen])
        except ProtocolError:
            raise
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            raise ProtocolError(f"frame header is not valid msgpack: {exc}") from None
        # (A flat map - chunk, end, ack, stored - is checked here without a call.)
        if type(raw) is dict:
            for v in raw.values():
                if type(v) is dict or type(v) is list:
                    _check_depth(raw)
                    break
        else:
            _check_depth(raw)
        msg = from_header(raw, self.max_tensor_bytes)
        n = msg.wire_len if isinstance(msg, Chunk | Legacy | PieceChunk) else 0  # payload_len
        if n > self.max_payload:
            raise ProtocolError(
                f"frame payload of {n} bytes exceeds the limit of {self.max_payload}",
                code="too_large",
            )
        self._pos = start + hlen
        self.payload_pending = n
        return msg

    def take_payload_into(self, dest: memoryview) -> int:
        """Copy buffered payload bytes into ``dest``; returns how many (maybe 0)."""
        n = min(len(dest), self.payload_pending, len(self._buf) - self._pos)
        if n:
            dest[:n] = memoryview(self._buf)[self._pos : self._pos + n]
            self._pos += n
            self.payload_pending -= n
        return n

    def take_payload(self, limit: int | None = None) -> bytes:
        """Buffered payload bytes as a new ``bytes`` (tests and small payloads)."""
        n = min(self.payload_pending, len(self._buf) - self._pos)
        if limit is not None:
            n = min(n, limit)
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        self.payload_pending -= n
        return out

    def payload_received(self, n: int) -> None:
        """The caller read ``n`` payload bytes itself, past this decoder's buffer."""
        if n > self.payload_pending:
            raise RuntimeError("more payload bytes received than the frame holds")
        self.payload_pending -= n
