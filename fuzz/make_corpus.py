"""Write the seed corpora under fuzz/corpus/ and the libFuzzer dictionary fuzz/wire.dict.

Run it again after a message changes (``.venv/bin/python fuzz/make_corpus.py``); the output is
deterministic, and tests/test_wire_fuzz.py checks that the committed files are what it writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgpack

from tensord.wire.compress import AdaptiveCompressor
from tensord.wire.frames import encode
from tensord.wire.messages import (
    Accept,
    Ack,
    Auth,
    Begin,
    Chunk,
    End,
    Error,
    Hello,
    Legacy,
    Message,
    Nack,
    Ping,
    Pong,
    Request,
    Stored,
)
from tensord.wire.meta import TensorMeta
from tensord.wire.transfer import SendTransfer

HERE = Path(__file__).resolve().parent
XID = "0123456789abcdef"

# flag bits, as in fuzz_frames.py and fuzz_transfer.py
DIRECT, SMALL = 1, 2
CRC, SENDER, COMPRESS = 1, 2, 4


def frame(msg: Message, payload: bytes = b"") -> bytes:
    return encode(msg) + payload


FRAMES: dict[str, bytes] = {
    "hello": frame(Hello("tensord", (1,), "gpu-1", frozenset({"chunked", "lz4"}), 1 << 20)),
    "hello-auth": frame(
        Hello("tensord", (1, 2), "gpu-2", frozenset({"crc32c"}), 4096, b"n" * 32, b"p" * 32)
    ),
    "auth": frame(Auth(b"\x01" * 32)),
    "begin": frame(Begin(XID, TensorMeta("w", "<f4", (2, 2), 16), 4096, 8, True)),
    "accept": frame(Accept(XID, ((0, 3), (5, 9)))),
    "chunk": frame(Chunk(XID, 2, 8192, 4096, 5, 123, True), b"hello"),
    "ack": frame(Ack(XID, 4, ((6, 8),))),
    "nack": frame(Nack(XID, 3)),
    "end": frame(End(XID, None)),
    "stored": frame(Stored(XID)),
    "error": frame(Error("checksum", "bad", XID)),
    "request": frame(Request("model.layers.0.attn.q_proj.weight")),
    "tensor": frame(Legacy(TensorMeta("x", "|u1", (3,), 3), 7, 3), b"abc"),
    "ping": frame(Ping(1)),
    "pong": frame(Pong((1 << 63) - 1)),
}


def frames_corpus() -> dict[str, bytes]:
    out = {f"{name}.bin": bytes([0, 0]) + data for name, data in FRAMES.items()}
    stream = b"".join(FRAMES.values())
    out["all-direct-7.bin"] = bytes([DIRECT, 7]) + stream
    out["all-small-1.bin"] = bytes([SMALL, 1]) + stream
    out["all-small-direct-64.bin"] = bytes([SMALL | DIRECT, 64]) + stream
    return out


def _transfer(
    data: bytes, *, crc: bool, compress: bool = False, cut_after: int | None = None
) -> bytes:
    """Begin, every chunk and End as a sender emits them (a resumed Begin after ``cut_after``)."""
    meta = TensorMeta("model.w", "|u1", (len(data),), len(data))
    comp = AdaptiveCompressor() if compress else None
    tx = SendTransfer(
        XID, meta, memoryview(data), chunk_size=4096, window=64, crc=crc, compressor=comp
    )
    out = [frame(tx.begin())]
    sent = 0
    while (chunk := tx.next_chunk()) is not None:
        out.append(frame(chunk.header, bytes(chunk.payload)))
        sent += 1
        if sent == cut_after:
            out.append(frame(tx.begin(resume=True)))
    out.append(frame(tx.end()))
    return b"".join(out)


def transfer_corpus() -> dict[str, bytes]:
    dense = bytes(range(256)) * 50 + b"tail"
    zeros = bytes(5 * 4096 + 10)
    out = {
        "receive-crc.bin": bytes([CRC, 0]) + _transfer(dense, crc=True),
        "receive-nocrc.bin": bytes([0, 0]) + _transfer(dense, crc=False),
        "receive-lz4.bin": bytes([CRC, 0]) + _transfer(zeros, crc=True, compress=True),
        "receive-empty.bin": bytes([CRC, 0]) + _transfer(b"", crc=True),
        "receive-resume.bin": bytes([CRC, 0]) + _transfer(dense, crc=True, cut_after=2),
    }
    # a duplicate and a damaged chunk (nack, then the good one)
    meta = TensorMeta("model.w", "|u1", (len(dense),), len(dense))
    tx = SendTransfer(XID, meta, memoryview(dense), chunk_size=4096, window=64)
    parts = [frame(tx.begin())]
    chunks = list(iter(tx.next_chunk, None))
    first = frame(chunks[0].header, bytes(chunks[0].payload))
    damaged = bytearray(chunks[1].payload)
    damaged[0] ^= 1
    parts += [first, first, frame(chunks[1].header, bytes(damaged))]
    parts += [frame(c.header, bytes(c.payload)) for c in chunks[1:]]
    parts.append(frame(tx.end()))
    out["receive-dup-nack.bin"] = bytes([CRC, 0]) + b"".join(parts)
    # sender: a tensor of 20 * 1000 bytes (5 chunks), window 1 + 20 % 7 = 7
    replies = [Ack(XID, 2), Nack(XID, 3), Ack(XID, 3, ((4, 5),)), Ack(XID, 5)]
    out["send-acks.bin"] = bytes([CRC | SENDER, 20]) + b"".join(frame(m) for m in replies)
    out["send-stored.bin"] = bytes([CRC | SENDER, 20]) + frame(Stored(XID))
    resume = [Ack(XID, 1), Ping(0), Accept(XID, ((0, 2), (3, 4))), Ack(XID, 5), Stored(XID)]
    out["send-resume.bin"] = bytes([CRC | SENDER | COMPRESS, 20]) + b"".join(
        frame(m) for m in resume
    )
    out["send-error.bin"] = bytes([SENDER, 9]) + frame(Error("checksum", "whole", XID))
    return out


def dictionary() -> str:
    """msgpack spellings of the protocol's keys and names, and of edge-case numbers."""
    words = sorted(
        {"t", "id", "i", "o", "r", "n", "c", "z", "u", "v", "f", "mc", "nc", "pf", "node"}
        | {"proto", "meta", "cs", "w", "resume", "have", "code", "msg", "name", "s"}
        | {"dtype", "shape", "nbytes", "grad", "tensord", "<f4", "|u1", "bfloat16"}
        | {"hello", "auth", "begin", "accept", "chunk", "ack", "nack", "end", "stored"}
        | {"error", "request", "tensor", "ping", "pong"}
    )
    tokens = [msgpack.packb(w) for w in words]
    tokens += [msgpack.packb(n) for n in (0, 4096, (1 << 32) - 1, (1 << 63) - 1, (1 << 64) - 1)]
    tokens += [msgpack.packb(n) for n in (-1, -(1 << 63))]
    tokens += [b"\xc3", b"\xc2", b"\xc0", b"\xdc\xff\xff", b"\xde\x00\x41", b"\xdb\xff\xff\xff\xff"]
    lines = ['"' + "".join(f"\\x{b:02x}" for b in tok) + '"' for tok in tokens]
    return (
        "# msgpack tokens of the tensord wire protocol (written by make_corpus.py)\n"
        + "\n".join(lines)
        + "\n"
    )


def outputs() -> dict[Path, bytes]:
    files = {HERE / "corpus" / "frames" / k: v for k, v in frames_corpus().items()}
    files |= {HERE / "corpus" / "transfer" / k: v for k, v in transfer_corpus().items()}
    files[HERE / "wire.dict"] = dictionary().encode()
    return files


def main() -> int:
    for path, data in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
            print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
