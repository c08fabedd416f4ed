"""A hand-driven peer: sends whatever bytes a test likes and decodes what comes back."""

from __future__ import annotations

import struct

import msgpack
import trio

from tensord.config import Settings
from tensord.wire import Error, Hello, encode, make_hello
from tensord.wire.frames import FrameDecoder
from tensord.wire.handshake import ALL_FEATURES

from .helpers import fast_settings


def unauthenticated() -> Settings:
    """Hand-written peers do not authenticate: the node under test has no cluster secret."""
    return fast_settings(authenticated=False)


class RawPeer:
    """A hand-driven client: sends whatever bytes a test likes, decodes what comes back."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    @classmethod
    async def connect(cls, port: int, hello: bool = True) -> RawPeer:
        peer = cls(await trio.open_tcp_stream("127.0.0.1", port))
        if hello:
            await peer.stream.send_all(encode(make_hello("raw", ALL_FEATURES, 1 << 26)))
            assert isinstance(await peer.next_message(), Hello)
        return peer

    async def next_message(self) -> object | None:
        """The next message, or None at EOF."""
        while (msg := self.decoder.next_message()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.decoder.feed(data)
        return msg

    async def expect_error_then_close(self, code: str) -> Error:
        with trio.fail_after(5):
            msg = await self.next_message()
            assert isinstance(msg, Error), msg
            assert msg.code == code, msg
            assert await self.stream.receive_some(65536) == b""  # closed by the node
        return msg


def header(h: dict[str, object]) -> bytes:
    body = msgpack.packb(h)
    return struct.pack(">I", len(body)) + body
