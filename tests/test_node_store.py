"""A node with a state directory: tensors received into the on-disk store, resumable across a
restart of the receiving node, refused cleanly when the store is full."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio

from tensord.config import HostPort, MiB, Settings, StoreSettings
from tensord.errors import TensorNotFound, TransferFailed
from tensord.node import TensorNode

from .support.daemons import free_port
from .support.helpers import fast_settings, running
from .support.tcp_proxy import Fault, proxied

CHUNK = 256 * 1024
WINDOW = 2 * MiB


def stored(state: Path, node_id: str = "b", port: int = 0, **store: int) -> Settings:
    s = fast_settings(chunk_size=CHUNK, enable_compression=False).with_transfer(window_bytes=WINDOW)
    return replace(
        s,
        node_id=node_id,
        listen=HostPort("127.0.0.1", port),
        state_dir=state,
        store=StoreSettings(**store),
    )


async def test_received_tensor_lands_in_the_store_as_npy(tmp_path: Path) -> None:
    array = np.random.default_rng(1).standard_normal((300, 700)).astype(np.float32)
    async with running() as a, running(stored(tmp_path)) as b:
        await a.send_tensor(b.addr, "layers/0/wq", array)
        got = b.get_tensor("layers/0/wq")
        assert isinstance(got, np.memmap) and not got.flags.writeable
        assert np.array_equal(got, array)
        info = b.tensor_info("layers/0/wq")
        assert (info.dtype, info.shape, info.sender) == ("<f4", (300, 700), a.node_id)
        assert b.tensor_names() == ["layers/0/wq"]
    # A new process sees it: the store is the truth, not the node's memory.
    files = list((tmp_path / "tensors").glob("*.npy"))
    assert len(files) == 1 and np.array_equal(np.load(files[0]), array)
    assert not list((tmp_path / "partial").iterdir())


async def test_stored_tensors_are_served_to_pulls_and_sent_with_their_wire_dtype(
    tmp_path: Path,
) -> None:
    bf16 = np.arange(4096, dtype=np.uint16)
    async with running(stored(tmp_path / "b")) as b, running(stored(tmp_path / "c", "c")) as c:
        b.put_tensor("w", bf16, dtype="bfloat16")
        got = await c.pull_tensor(b.addr, "w", as_name="w-copy")
        assert got.tobytes() == bf16.tobytes()
        assert c.tensor_info("w-copy").dtype == "bfloat16"
        assert c.tensor_info("w-copy").sender == "b"
        result = await c.send_stored(b.addr, "w-copy", as_name="w2")
        assert result.nbytes == bf16.nbytes
        assert b.tensor_info("w2").dtype == "bfloat16"
        with pytest.raises(TensorNotFound):
            await c.pull_tensor(b.addr, "absent")
        b.delete_tensor("w")
        assert b.tensor_names() == ["w2"]


async def test_store_as_is_a_deprecated_spelling_of_as_name(tmp_path: Path) -> None:
    """``pull_tensor(store_as=...)`` still works for one release, with a DeprecationWarning."""
    async with running(stored(tmp_path / "b")) as b, running(stored(tmp_path / "c", "c")) as c:
        b.put_tensor("w", np.arange(8))
        with pytest.warns(DeprecationWarning, match="as_name"):
            got = await c.pull_tensor(b.addr, "w", store_as="w-old")
        assert np.array_equal(got, np.arange(8))
        assert c.tensor_names() == ["w-old"]


async def test_receiver_restarted_mid_transfer_resumes_from_its_saved_progress(
    tmp_path: Path,
) -> None:
    size = 24 * MiB
    array = np.random.default_rng(3).integers(0, 255, size=size, dtype=np.uint8)
    cut = size // 2
    port = free_port()
    state = tmp_path / "b"
    async with running(fast_settings(chunk_size=CHUNK).with_transfer(window_bytes=WINDOW)) as a:
        async with proxied(port, {0: Fault(cut_after=cut)}) as proxy, trio.open_nursery() as n:
            proxy.hold_later = trio.Event()
            results = []
            sent = trio.Event()

            async def send() -> None:
                results.append(await a.send_tensor(f"tensord://b@{proxy.addr}", "big", array))
                sent.set()

            b1 = TensorNode(stored(state, port=port))
            await b1.start(n)
            n.start_soon(send)
            await proxy.cut_event.wait()
            # The receiver goes away while the sender waits to retry: what it had is saved.
            assert await b1.drain(5)
            b2 = TensorNode(stored(state, port=port))
            await b2.start(n)
            proxy.hold_later.set()
            with trio.fail_after(30):
                arrival = await b2.receive_tensor()
                await sent.wait()
            assert arrival.name == "big"
            assert np.array_equal(b2.get_tensor("big"), array)
            b2.shutdown()
        result = results[0]
        assert result.retries >= 1
        # Only what was in flight at the cut travelled twice, not the half already on disk.
        assert result.bytes_resent <= WINDOW
        assert proxy.conns[-1].upstream <= size - cut + WINDOW + 64 * 1024


async def test_full_store_refuses_with_a_clear_error_and_keeps_what_it_has(
    tmp_path: Path,
) -> None:
    first = np.ones(1 * MiB, dtype=np.uint8)
    async with running() as a, running(stored(tmp_path, max_bytes=3 * MiB)) as b:
        await a.send_tensor(b.addr, "first", first)
        with pytest.raises(TransferFailed) as err:
            await a.send_tensor(b.addr, "second", np.zeros(4 * MiB, dtype=np.uint8))
        assert err.value.code == "quota"
        assert "cap" in str(err.value) and "tensord rm" in str(err.value)
        assert b.tensor_names() == ["first"]
        assert np.array_equal(b.get_tensor("first"), first)
    assert not list((tmp_path / "partial").iterdir())


async def test_landed_bytes_are_written_back_behind_the_socket_and_never_after_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensord.store.partial as partial_module

    calls: list[tuple[str, int]] = []
    real_writeback = partial_module.start_writeback
    real_commit = partial_module.PartialReceive.commit

    def writeback(fd: int, offset: int, nbytes: int) -> bool:
        calls.append(("writeback", nbytes))
        return real_writeback(fd, offset, nbytes)

    def commit(self: partial_module.PartialReceive, sender: str) -> object:
        calls.append(("commit", self.meta.nbytes))
        return real_commit(self, sender)

    monkeypatch.setattr(partial_module, "start_writeback", writeback)
    monkeypatch.setattr(partial_module.PartialReceive, "commit", commit)
    array = np.random.default_rng(5).standard_normal(10 * MiB).astype(np.float32)  # 40 MiB
    async with running() as a, running(stored(tmp_path)) as b:
        await a.send_tensor(b.addr, "big", array)
        assert np.array_equal(b.get_tensor("big"), array)
    assert calls[-1] == ("commit", array.nbytes)
    written = [n for what, n in calls[:-1]]
    assert all(what == "writeback" for what, _ in calls[:-1])
    # Each request covers what had landed, more every time, never beyond the tensor.
    assert written == sorted(written) and all(0 < n <= array.nbytes for n in written)
