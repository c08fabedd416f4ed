"""A structure-aware libFuzzer mutator for streams of tensord frames.

Byte-level mutations rarely get past msgpack and the field checks in one step, and never build a
header nested a thousand deep. One time in four this mutator instead decodes the frames of an
input (the two flag bytes, then length prefix, msgpack header and payload, again and again),
picks one header and changes it the way a hostile peer would - a field of the wrong type, a huge
or negative integer, a value wrapped in hundreds of lists, a key left out, a non-string key - and
encodes the stream again with the length prefix fixed up. The rest of the time, or when the input
does not parse, it leaves the job to libFuzzer's own mutations (``fallback``).
"""

from __future__ import annotations

import random
import struct
import sys
from collections.abc import Callable
from typing import Any

import msgpack

PREFIX = struct.Struct(">I")

JUNK: list[object] = [
    None, True, False, 0, -1, 1.5, float("nan"), "", "x" * 40, b"", b"\x00" * 32, [], {},
    (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -(1 << 63), 4096, 1 << 40, [[0, 1]], [0, (1 << 40) - 1],
    {"name": "w", "dtype": "<f4", "shape": [0], "nbytes": 0}, "chunk", "begin", "0123456789abcdef",
]  # fmt: skip
DEPTHS = [2, 8, 9, 32, 500, 900, 990, 1000, 1010, 1023, 1030]


def parse(stream: bytes) -> list[tuple[Any, bytes]] | None:
    """The (header, payload) frames of ``stream``, or None if it is not a clean frame stream."""
    out: list[tuple[Any, bytes]] = []
    pos = 0
    while pos < len(stream):
        if pos + PREFIX.size > len(stream):
            return None
        (hlen,) = PREFIX.unpack_from(stream, pos)
        start = pos + PREFIX.size
        try:
            header = msgpack.unpackb(stream[start : start + hlen], raw=False, strict_map_key=False)
        except Exception:  # any malformed header: not ours to restructure
            return None
        n = header.get("n", 0) if isinstance(header, dict) else 0
        n = n if isinstance(n, int) and 0 <= n <= len(stream) else 0
        pos = start + hlen + n
        out.append((header, stream[start + hlen : pos]))
    return out


def _containers(node: Any, depth: int = 0) -> list[Any]:
    """Every map and list in a header, shallow first (not into huge nests)."""
    found = [node]
    if depth < 6:
        values = node.values() if isinstance(node, dict) else node
        for v in values:
            if isinstance(v, dict | list):
                found += _containers(v, depth + 1)
    return found


#: Stands in for a deeply nested value while the header is packed (msgpack's packer refuses to
#: nest more than 511 deep; the unpacker takes 1024), replaced in the packed bytes afterwards.
_MARK = "\x00nest\x00"


def mutate_header(header: Any, rng: random.Random) -> tuple[Any, bytes | None]:
    """The header, changed in place where it can be, and the packed value that replaces
    ``_MARK`` (if the change is a deep nest)."""
    if not isinstance(header, dict | list) or not header:
        return rng.choice(JUNK), None
    node = rng.choice([c for c in _containers(header) if c])
    keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
    key = rng.choice(keys)
    match rng.randrange(7):
        case 0 | 1:
            node[key] = rng.choice(JUNK)
        case 2:
            nested = b"\x91" * (rng.choice(DEPTHS) - 1) + msgpack.packb(node[key])
            node[key] = _MARK
            return header, nested
        case 3:
            v = node[key]
            if isinstance(v, int) and not isinstance(v, bool):
                node[key] = rng.choice([v - 1, v + 1, -v, v << 20, v ^ (1 << rng.randrange(64))])
        case 4 if isinstance(node, dict):
            del node[key]
        case 5 if isinstance(node, dict):
            node[rng.choice([0, -1, 1.5, None, True, b"t", "t", "zz"])] = rng.choice(JUNK)
        case _:
            if isinstance(node, list):
                node.append(rng.choice(JUNK))
            else:
                node[key] = [node[key]] * rng.choice([0, 2, 4097])
    return header, None


def mutate_frames(
    data: bytes, max_size: int, seed: int, fallback: Callable[[bytes, int], bytes]
) -> bytes:
    rng = random.Random(seed)
    if len(data) < 2 or rng.random() < 0.75:
        return fallback(data, max_size)
    frames = parse(data[2:])
    if not frames:
        return fallback(data, max_size)
    k = rng.randrange(len(frames))
    header, payload = frames[k]
    try:
        mutated, nested = mutate_header(header, rng)
        body = msgpack.packb(mutated, use_bin_type=True)
        if nested is not None:
            body = body.replace(msgpack.packb(_MARK), nested, 1)
    except (ValueError, OverflowError, TypeError):  # e.g. an int out of msgpack's range
        return fallback(data, max_size)
    frames[k] = (None, PREFIX.pack(len(body)) + body + payload)
    out = bytearray(data[:2])
    for h, p in frames:
        if h is None:
            out += p
        else:
            b = msgpack.packb(h, use_bin_type=True)
            out += PREFIX.pack(len(b)) + b + p
    if len(out) > max_size:
        return fallback(data, max_size)
    return bytes(out)


def run_fuzzer(check: Callable[[bytes], object]) -> None:
    """A harness's ``main``: fuzz ``check`` with atheris (its arguments from ``sys.argv``) and
    this mutator. atheris is imported only here: the test suite imports the harnesses' checks
    without it installed."""
    import atheris

    def one_input(data: bytes) -> None:
        check(data)

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        return mutate_frames(data, max_size, seed, atheris.Mutate)

    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input, custom_mutator=mutate)
    atheris.Fuzz()
