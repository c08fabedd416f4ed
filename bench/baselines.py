"""The baselines, as in ``shared/anchors/loopback_peers.py``: what the hardware and the common
libraries do with the same tensor, measured the same way on every run.

All three are *pull* rows timed on the *receiver's* clock: the receiver sends ``go`` (1 byte),
the sender writes the whole tensor, and the receiver stops the clock when the last byte is in a
buffer it can use as a numpy array. No checksum, no acknowledgement, no framing beyond what the
library itself does. One warm-up pull, then ``reps`` timed pulls.

- plain socket: blocking ``recv_into`` (4 MiB at a time) into one ``np.empty`` reused by every
  pull, so after the warm-up its pages are resident: the upper bound for a Python receiver.
  ``fresh=True`` allocates a new ``np.empty`` per pull instead (what any receiver that hands out
  a new array per tensor pays: page faults on first touch); a reference row, not a target.
- pyzmq: a PAIR socket, ``send(copy=False)`` / ``recv(copy=False)`` and ``np.frombuffer``.
- Arrow Flight: ``do_get`` of 1 MiB record batches, ``read_all()`` (batches not concatenated).

One more baseline is a latency floor, not a throughput row: two trio processes on one TCP
connection, the client sends a 4 KiB request with ``send_all`` and waits for a 1-byte reply
(``receive_some``), on the client's clock - what a small-tensor send, which also ends in one
reply, is measured against (issue 15: p50 within 1.5x of it).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np
from harness import Children, Reporter, make_tensor

STEP = 4 << 20  # bytes per recv_into call, as in the anchor


# -- plain socket ----------------------------------------------------------------------------


def plain_receiver(out: Reporter, size: int, reps: int, fresh: bool) -> list[float]:
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        out.send(ls.getsockname()[1])
        conn, _ = ls.accept()
    times: list[float] = []
    with conn:
        buf = np.empty(size, np.uint8)
        for _ in range(reps + 1):
            if fresh:
                buf = np.empty(size, np.uint8)
            mv = buf.data
            t = time.perf_counter()
            conn.send(b"g")
            got = 0
            while got < size:
                n = conn.recv_into(mv[got:], min(size - got, STEP))
                if not n:
                    raise ConnectionError("sender closed the connection")
                got += n
            times.append(time.perf_counter() - t)
    return times[1:]


def plain_sender(out: Reporter, port: int, size: int) -> None:
    data = make_tensor(size).data.cast("B")
    with socket.create_connection(("127.0.0.1", port)) as s:
        while s.recv(1):
            s.sendall(data)


def run_plain(size: int, reps: int, timeout: float, fresh: bool = False) -> list[float]:
    with Children() as kids:
        rx = kids.start("plain receiver", plain_receiver, size, reps, fresh)
        port = rx.recv(timeout=30)
        kids.start("plain sender", plain_sender, port, size)
        times: list[float] = rx.recv(timeout)
        return times


# -- trio request/response floor -------------------------------------------------------------


def trio_echo_server(out: Reporter, nbytes: int) -> None:
    """Answer every complete ``nbytes`` request with one byte, until the client hangs up."""
    import trio

    async def handle(stream: trio.SocketStream) -> None:
        got = 0
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            got += len(data)
            while got >= nbytes:
                got -= nbytes
                await stream.send_all(b"k")

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        out.send(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners)

    trio.run(main)


def trio_echo_client(out: Reporter, port: int, nbytes: int, n: int, warmup: int) -> list[float]:
    """``warmup`` + ``n`` request/response round trips; the seconds of the last ``n``."""
    import trio

    request = make_tensor(nbytes).tobytes()

    async def main() -> list[float]:
        times: list[float] = []
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            for i in range(warmup + n):
                t = time.perf_counter()
                await stream.send_all(request)
                if not await stream.receive_some(1):
                    raise ConnectionError("the server closed the connection")
                if i >= warmup:
                    times.append(time.perf_counter() - t)
        return times

    return trio.run(main)


def run_trio_floor(nbytes: int, n: int, warmup: int, timeout: float) -> list[float]:
    with Children() as kids:
        server = kids.start("trio echo server", trio_echo_server, nbytes)
        port = server.recv(timeout=30)
        client = kids.start("trio echo client", trio_echo_client, port, nbytes, n, warmup)
        times: list[float] = client.recv(timeout)
        return times


# -- pyzmq -----------------------------------------------------------------------------------


def zmq_receiver(out: Reporter, size: int, reps: int) -> list[float]:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.setsockopt(zmq.LINGER, 0)
    s.bind("tcp://127.0.0.1:*")
    out.send(int(s.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]))
    times: list[float] = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        s.send(b"g")
        msg: Any = s.recv(copy=False)
        a = np.frombuffer(msg.buffer, np.uint8)
        times.append(time.perf_counter() - t)
        if a.nbytes != size:
            raise ValueError(f"got {a.nbytes} bytes, expected {size}")
        del a, msg
    s.send(b"q")
    s.close()
    ctx.term()
    return times[1:]


def zmq_sender(out: Reporter, port: int, size: int) -> None:
    import zmq

    data = make_tensor(size)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    while s.recv() == b"g":
        s.send(data.data, copy=False)
    s.close()
    ctx.term()


def run_zmq(size: int, reps: int, timeout: float) -> list[float]:
    with Children() as kids:
        rx = kids.start("zmq receiver", zmq_receiver, size, reps)
        port = rx.recv(timeout=30)
        kids.start("zmq sender", zmq_sender, port, size)
        times: list[float] = rx.recv(timeout)
        return times


# -- Arrow Flight ----------------------------------------------------------------------------


def flight_server(out: Reporter, size: int) -> None:
    import pyarrow as pa
    import pyarrow.flight as fl

    data = make_tensor(size)
    arr = pa.array(data)
    rows = (1 << 20) // 4
    schema = pa.schema([("x", pa.float32())])

    class Server(fl.FlightServerBase):  # type: ignore[misc]
        def do_get(self, context: Any, ticket: Any) -> Any:
            batches = (
                pa.record_batch([arr.slice(o, rows)], schema=schema)
                for o in range(0, len(data), rows)
            )
            return fl.GeneratorStream(schema, batches)

    server = Server("grpc://127.0.0.1:0")
    out.send(server.port)
    server.serve()


def flight_client(out: Reporter, port: int, size: int, reps: int) -> list[float]:
    import pyarrow.flight as fl

    client = fl.connect(f"grpc://127.0.0.1:{port}")
    client.wait_for_available(timeout=30)
    times: list[float] = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        table = client.do_get(fl.Ticket(b"t")).read_all()
        chunks = table.column(0).chunks  # 1 MiB record batches, not concatenated
        times.append(time.perf_counter() - t)
        got = sum(c.nbytes for c in chunks)
        if got != size:
            raise ValueError(f"got {got} bytes, expected {size}")
        del table, chunks
    client.close()
    return times[1:]


def run_flight(size: int, reps: int, timeout: float) -> list[float]:
    with Children() as kids:
        server = kids.start("flight server", flight_server, size)
        port = server.recv(timeout=60)
        client = kids.start("flight client", flight_client, port, size, reps)
        times: list[float] = client.recv(timeout)
        return times
