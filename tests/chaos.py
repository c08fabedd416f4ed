"""A test-owned TCP proxy that injects faults between two peers.

Faults apply to the client->server direction of chosen connections (numbered from 0 in accept
order): cut the connection after N bytes, or flip one byte at offset N. Bytes forwarded are
counted per connection and direction so tests can assert how much was re-sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio


@dataclass
class Fault:
    cut_after: int | None = None  # close both sides once this many bytes went upstream
    corrupt_at: int | None = None  # XOR 0xFF into the upstream byte at this offset


@dataclass
class ConnStats:
    upstream: int = 0
    downstream: int = 0
    cut: bool = False
    corrupted: bool = False


@dataclass
class ChaosProxy:
    target_port: int
    target_host: str = "127.0.0.1"
    faults: dict[int, Fault] = field(default_factory=dict)
    conns: list[ConnStats] = field(default_factory=list)
    port: int = 0
    cut_event: trio.Event = field(default_factory=trio.Event)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        index = len(self.conns)
        stats = ConnStats()
        self.conns.append(stats)
        fault = self.faults.get(index, Fault())
        try:
            server = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            await client.aclose()
            return
        try:
            async with client, server, trio.open_nursery() as nursery:

                async def up() -> None:
                    while True:
                        data = bytearray(await client.receive_some(65536))
                        if not data:
                            await server.send_eof()
                            return
                        start = stats.upstream
                        if fault.corrupt_at is not None and start <= fault.corrupt_at < start + len(
                            data
                        ):
                            data[fault.corrupt_at - start] ^= 0xFF
                            stats.corrupted = True
                        if fault.cut_after is not None and start + len(data) >= fault.cut_after:
                            await server.send_all(data[: fault.cut_after - start])
                            stats.upstream = fault.cut_after
                            stats.cut = True
                            self.cut_event.set()
                            nursery.cancel_scope.cancel()
                            return
                        await server.send_all(data)
                        stats.upstream += len(data)

                async def down() -> None:
                    while True:
                        data = await server.receive_some(65536)
                        if not data:
                            await client.send_eof()
                            return
                        await client.send_all(data)
                        stats.downstream += len(data)

                nursery.start_soon(up)
                nursery.start_soon(down)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # one side went away: the other side sees the close

    @property
    def bytes_upstream(self) -> int:
        return sum(c.upstream for c in self.conns)


@asynccontextmanager
async def proxied(port: int, faults: dict[int, Fault]) -> AsyncIterator[ChaosProxy]:
    """A running proxy to ``port`` for the duration of the block."""
    async with trio.open_nursery() as nursery:
        proxy = ChaosProxy(port, faults=faults)
        await nursery.start(proxy.run)
        yield proxy
        nursery.cancel_scope.cancel()
