"""TensorNode over QUIC: resume after the path goes dark, tuning from the settings, fallback."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio

from tensord.config import QuicSettings, Settings
from tensord.events import TransferEvent

from .support.cluster import write_cluster_file
from .support.helpers import fast_settings, running
from .support.udp_proxy import UdpFault, UdpProxy

MiB = 1 << 20


def quic(**quic: object) -> Settings:
    base = replace(fast_settings(), transport="quic")
    return replace(base, quic=replace(base.quic, **quic))  # type: ignore[arg-type]


async def test_a_transfer_resumes_over_quic_after_the_path_went_dark() -> None:
    """Mid-transfer every datagram is dropped: the attempt times out, the QUIC connection dies
    (idle timeout), the sender dials a new one and resumes from what the receiver holds."""
    size = 24 * MiB
    array = np.random.default_rng(2).integers(0, 255, size, dtype=np.uint8)
    sender = quic(idle_timeout=1.0).with_transfer(io_timeout=1.0, window_bytes=4 * MiB)
    async with running(sender) as a, running(quic()) as b, trio.open_nursery() as nursery:
        proxy = UdpProxy(("127.0.0.1", b.port))
        port = await nursery.start(proxy.run)
        results = []
        #: What b held as each attempt's receive started; set once b's receive is done.
        starts: list[int] = []
        received = trio.Event()

        async def watch_receiver(task_status: trio.TaskStatus[None]) -> None:
            async with b.events.subscribe() as b_events:
                task_status.started()
                async for ev in b_events:
                    if isinstance(ev, TransferEvent) and ev.direction == "receive":
                        if ev.state == "started":
                            starts.append(ev.bytes_done)
                        elif ev.state == "done":
                            received.set()
                            return

        await nursery.start(watch_receiver)

        async def send() -> None:
            results.append(
                await a.send_tensor(f"tensord://{b.node_id}@127.0.0.1:{port}", "w", array)
            )

        dark = False
        async with a.events.subscribe() as events:
            nursery.start_soon(send)
            with trio.fail_after(60):
                async for ev in events:
                    if not isinstance(ev, TransferEvent):
                        continue
                    if ev.state == "progress" and ev.bytes_done >= 8 * MiB and not dark:
                        proxy.blackhole = dark = True  # once
                    elif ev.state == "retry":
                        proxy.blackhole = False  # the path is back for the next attempt
                    elif ev.state in ("done", "failed"):
                        break
        got = await b.receive_tensor()
        assert np.array_equal(got.array, array)
        with trio.fail_after(10):
            await received.wait()
        (result,) = results
        assert result.transport == "quic" and result.retries >= 1
        # Only what was in flight when an attempt broke travelled twice: at most a window (and
        # the chunks around its edges) per retry. On a loaded machine a resumed attempt can miss
        # the 1 s io_timeout too, so the bound is per retry, not one window in all.
        assert result.bytes_resent <= result.retries * (4 * MiB + 2 * MiB), result
        # Never from the start: every later attempt resumed from what b held, which only grew
        # (under load an attempt may also time out before the path goes dark).
        assert len(starts) >= 2 and starts[0] == 0, starts
        assert all(held > 0 for held in starts[1:]) and starts == sorted(starts), starts
        assert starts[-1] >= 8 * MiB, starts
        nursery.cancel_scope.cancel()


async def test_jumbo_datagrams_from_the_settings() -> None:
    array = np.random.default_rng(3).standard_normal(1 << 20).astype(np.float32)
    async with (
        running(quic(max_datagram_size=8952)) as a,
        running(quic(max_datagram_size=8952)) as b,
    ):
        result = await a.send_tensor(b.addr, "w", array)
        assert result.transport == "quic"
        assert np.array_equal((await b.receive_tensor()).array, array)


async def test_a_peer_without_quic_is_reached_over_tcp() -> None:
    array = np.arange(10_000, dtype=np.int64)
    async with running(quic()) as a, running(fast_settings()) as b:  # b listens on TCP only
        result = await a.send_tensor(b.addr, "w", array)
        assert result.transport == "tcp"
        assert np.array_equal((await b.receive_tensor()).array, array)


def test_the_quic_section_of_the_cluster_file(tmp_path: object) -> None:
    from pathlib import Path

    import pytest

    from tensord.config import load_settings
    from tensord.errors import ConfigError

    path = write_cluster_file(
        Path(str(tmp_path)) / "c.json",
        quic={"max_datagram_size": 8952, "congestion_control": "cubic"},
    )
    s = load_settings({}, cluster_file=path, library=True)
    assert s.quic == QuicSettings(max_datagram_size=8952, congestion_control="cubic")
    for bad in (
        {"congestion_control": "bbr"},
        {"max_datagram_size": 65000},
        {"stream_window": 1 << 30, "connection_window": 1 << 20},
    ):
        write_cluster_file(path, quic=bad)
        with pytest.raises(ConfigError, match="quic"):
            load_settings({}, cluster_file=path, library=True)


async def test_a_quic_receiver_killed_mid_transfer_is_resumed_after_its_restart(
    tmp_path: Path,
) -> None:
    """The receiver daemon is SIGKILLed mid-transfer - no CONNECTION_CLOSE, only silence - and
    restarted on the same port: the attempt ends at io_timeout, the retry's dial replaces the
    silent QUIC connection (the idle timeout is 30 s away), and the transfer resumes from what
    the restarted receiver found on disk."""
    from .support.chaos.common import Watermark, digest, receiver, stored_digests, watch_receives
    from .support.chaos.transfers import ON_DISK
    from .support.daemons import free_port

    size, window = 96 * MiB, 4 * MiB
    data = np.random.default_rng(4).integers(0, 255, size, dtype=np.uint8)
    # Retries enough to outlast a daemon restart on a loaded machine (~40 s of backoff): what is
    # tested is where the transfer resumes, not how fast the receiver comes back.
    sender = (
        quic()
        .with_protocol(max_retries=12, retry_base_delay=200)
        .with_transfer(io_timeout=1.5, connect_timeout=1.0, window_bytes=window)
    )
    port = free_port()
    saved = Watermark()
    results = []
    with trio.fail_after(90):
        async with running(sender) as a, trio.open_nursery() as nursery:
            async with (
                receiver(tmp_path, port, TENSORD_TRANSPORT="quic") as d,
                trio.open_nursery() as watch,
            ):
                await watch.start(watch_receives, d.socket, saved)

                async def send() -> None:
                    addr = f"tensord://r@127.0.0.1:{port}"
                    results.append(await a.send_tensor(addr, "big", data))

                nursery.start_soon(send)
                await saved.wait_for(16 * MiB)  # a checkpoint is on disk: kill now
                at_kill = saved.value
                d.proc.kill()
                await d.proc.wait()
                watch.cancel_scope.cancel()
            async with receiver(tmp_path, port, TENSORD_TRANSPORT="quic") as d:
                await d.wait_for("tensor arrived: 'big'")
                found = ON_DISK.search(d.text)
            nursery.cancel_scope.cancel()
    (result,) = results
    assert result.transport == "quic" and result.retries >= 1, result
    assert at_kill < size  # killed mid-transfer, after a checkpoint
    assert stored_digests(tmp_path / "state", ["big"])["big"] == digest(data)
    assert found is not None
    on_disk = int(found.group(1))
    assert on_disk >= at_kill  # the restart found the checkpoint...
    # ...and the retry resumed from it: starting over would re-send at least that much again.
    assert result.bytes_resent < on_disk, (result, on_disk)


async def test_a_restarted_receiver_resets_the_connection_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9, then the receiver is back on the same port: the sender's pooled QUIC connection
    is dead but nothing told it (the UDP proxy in between keeps the kernel's ICMP "port
    unreachable" from the sender, as a router or NAT may). Its next packet reaches the new
    process, which answers with a stateless reset (a token derived from the cluster secret and
    the node id, so the new process knows the old one's tokens): the sender drops the connection
    at once and the send goes over a new one - no io_timeout, no idle timeout."""
    from .support.chaos.common import receiver
    from .support.daemons import free_port

    caplog.set_level(logging.INFO, logger="tensord.net")
    sender = quic().with_transfer(io_timeout=60.0, connect_timeout=10.0)
    port = free_port()
    with trio.fail_after(30):
        async with running(sender) as a, trio.open_nursery() as nursery:
            proxy = UdpProxy(("127.0.0.1", port))
            await nursery.start(proxy.run)
            addr = f"tensord://r@{proxy.addr}"
            async with receiver(tmp_path, port, TENSORD_TRANSPORT="quic") as d:
                first = await a.send_tensor(addr, "one", np.arange(1000))
                d.proc.kill()
                await d.proc.wait()
            async with receiver(tmp_path, port, TENSORD_TRANSPORT="quic") as d:
                with trio.fail_after(10):  # far less than io_timeout or the idle timeout
                    second = await a.send_tensor(addr, "two", np.arange(2000))
                await d.wait_for("tensor arrived: 'two'")
            nursery.cancel_scope.cancel()
    assert first.transport == second.transport == "quic"
    # The reset came either in answer to the send (one immediate retry) or to an ACK or PING
    # the sender's connection sent first (then the pool noticed at checkout).
    assert second.retries <= 1, second
    assert any("stateless reset" in r.getMessage() for r in caplog.records)


async def test_a_transfer_survives_the_senders_address_changing() -> None:
    """Mid-transfer a NAT rebinding gives the sender a new source address: QUIC identifies the
    connection by its ids, not the address, so the receiver validates the new path and the
    transfer carries on over the same connection (over TCP this would be a cut and a resume)."""
    size = 8 * MiB
    array = np.random.default_rng(6).integers(0, 255, size, dtype=np.uint8)
    async with running(quic()) as a, running(quic()) as b, trio.open_nursery() as nursery:
        proxy = UdpProxy(("127.0.0.1", b.port), faults={0: UdpFault(rebind_after=4 * MiB)})
        await nursery.start(proxy.run)
        with trio.fail_after(60):
            result = await a.send_tensor(proxy.addr, "w", array)
        got = await b.receive_tensor()
        assert np.array_equal(got.array, array)
        assert result.transport == "quic"
        assert (result.retries, result.bytes_resent) == (0, 0)  # no cut, no resume
        # One connection, one new source address; the old address's replies were dropped, so
        # everything after the rebinding (the Stored reply too) came over the new path.
        assert len(proxy.conns) == 1 and proxy.stats.rebound == 1
        nursery.cancel_scope.cancel()
