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
    # The same for the server->client direction (a download's data), and a stall: stop
    # forwarding downstream after this many bytes but keep the connection open.
    down_cut_after: int | None = None
    down_corrupt_at: int | None = None
    down_stall_after: int | None = None


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
    #: If set, connections after the first wait for it before dialling the target (a test
    #: restarts the target meanwhile).
    hold_later: trio.Event | None = None
    #: Upstream bytes per second, per connection (None: as fast as it goes).
    rate: float | None = None

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
        if index > 0 and self.hold_later is not None:
            await self.hold_later.wait()
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
                        if self.rate is not None:
                            await trio.sleep(len(data) / self.rate)

                async def down() -> None:
                    while True:
                        data = bytearray(await server.receive_some(65536))
                        if not data:
                            await client.send_eof()
                            return
                        start = stats.downstream
                        at = fault.down_corrupt_at
                        if at is not None and start <= at < start + len(data):
                            data[at - start] ^= 0xFF
                            stats.corrupted = True
                        for limit, stall in (
                            (fault.down_cut_after, False),
                            (fault.down_stall_after, True),
                        ):
                            if limit is not None and start + len(data) >= limit:
                                await client.send_all(data[: limit - start])
                                stats.downstream = limit
                                stats.cut = True
                                self.cut_event.set()
                                if stall:
                                    await trio.sleep_forever()
                                nursery.cancel_scope.cancel()
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
async def proxied(
    port: int, faults: dict[int, Fault], rate: float | None = None
) -> AsyncIterator[ChaosProxy]:
    """A running proxy to ``port`` for the duration of the block."""
    async with trio.open_nursery() as nursery:
        proxy = ChaosProxy(port, faults=faults, rate=rate)
        await nursery.start(proxy.run)
        yield proxy
        nursery.cancel_scope.cancel()
