"""Chaos scenario 4: the receiver's store runs out of room (its size cap, a small tmpfs, a tmpfs
filled by another writer mid-transfer).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from tensord.config import MiB
from tensord.errors import (
    TransferFailed,
)
from tensord.node import TensorNode
from tensord.store import TensorStore

from ..daemons import free_port
from ..helpers import fast_settings
from ..tcp_proxy import proxied
from .common import (
    Watermark,
    digest,
    partial_files,
    random_bytes,
    receiver,
    stored_digests,
    watch_sender,
)
from .rows import Row, fmt_bytes

# -- 4. disk full ------------------------------------------------------------------------------


def tmpfs_missing() -> str | None:
    """Why a tmpfs cannot be mounted here (None: it can)."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount command"
    with tempfile.TemporaryDirectory(prefix="tensord-probe-") as tmp:
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", tmp], capture_output=True, text=True
        )
        if p.returncode != 0:
            return f"mount -t tmpfs failed: {p.stderr.strip()}"
        subprocess.run(["umount", tmp], check=False)
    return None


@contextlib.contextmanager
def tmpfs(size: int) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tensord-tmpfs-") as tmp:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", tmp],
            check=True,
            capture_output=True,
        )
        try:
            yield Path(tmp)
        finally:
            if subprocess.run(["umount", tmp], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", tmp], check=False)


def _fill(path: Path) -> int:
    """Write zeros to ``path`` until the disk is full; the bytes written."""
    written = 0
    block = bytes(1 << 20)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(block)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            while True:
                written += f.write(block[:4096])
    return written


async def disk_full(
    *, tensor: int = 6 * MiB, keep: int = 3, use_tmpfs: bool = True, seed: int = 4
) -> list[Row]:
    """The receiver's store runs out of room three ways: its size cap
    (``TENSORD_STORE_MAX_BYTES``), a small tmpfs as its state dir, and a tmpfs filled by
    another writer in the middle of a transfer. The sender must get a clear error, earlier
    tensors must stay intact and nothing half-written may be visible."""
    rows = [await store_quota(tensor=tensor, keep=keep, seed=seed)]
    if use_tmpfs:
        reason = tmpfs_missing()
        if reason is not None:
            for what in ("small tmpfs", "tmpfs filled mid-transfer"):
                rows.append(Row("4. Disk full", what, skipped=reason))
        else:
            rows.append(await small_disk(tensor=tensor, keep=keep, seed=seed))
            rows.append(await disk_filled_midway(tensor=tensor, seed=seed))
    return rows


async def _keep_tensors(
    node: TensorNode, addr: str, tensor: int, keep: int, seed: int
) -> dict[str, str]:
    out = {}
    for i in range(keep):
        data = random_bytes((seed, i), tensor)
        await node.send_tensor(addr, f"keep/{i}", data)
        out[f"keep/{i}"] = digest(data)
    return out


def _intact(row: Row, state: Path, kept: dict[str, str], allowed: set[str]) -> None:
    got = stored_digests(state, list(kept))
    row.lost = sum(1 for n, h in kept.items() if got[n] != h)
    names = {i.name for i in TensorStore(state).list()}
    row.check(
        names <= set(kept) | allowed, f"unexpected tensors visible: {names - set(kept) - allowed}"
    )
    row.check(not partial_files(state), f"partial files left: {partial_files(state)}")
    npy = [p.name for p in (state / "tensors").glob("*.npy")]
    row.check(len(npy) == len(names), f"{len(npy)} data files for {len(names)} tensors: {npy}")


async def store_quota(*, tensor: int = 6 * MiB, keep: int = 3, seed: int = 4) -> Row:
    """The store's size cap refuses a tensor; the earlier ones stay intact."""
    started = time.perf_counter()
    cap = keep * tensor + tensor // 2
    row = Row(
        "4. Disk full",
        f"store quota: TENSORD_STORE_MAX_BYTES = {fmt_bytes(cap)}, {keep} tensors of "
        f"{fmt_bytes(tensor)} stored, then one more",
    )
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp:
        home = Path(tmp)
        async with (
            receiver(home, port, TENSORD_STORE_MAX_BYTES=str(cap)),
            TensorNode(fast_settings()) as node,
        ):
            addr = f"127.0.0.1:{port}"
            kept = await _keep_tensors(node, addr, tensor, keep, seed)
            t0 = time.perf_counter()
            error = await _expect_refusal(row, node, addr, random_bytes(seed, tensor))
            took = time.perf_counter() - t0
            row.check("cap" in error and "tensord rm" in error, f"unclear error: {error!r}")
        _intact(row, home / "state", kept, set())
    row.tried = "1 tensor over the cap"
    row.outcome = f"refused in {took * 1e3:.0f} ms: {error!r}; the {keep} earlier tensors intact"
    row.seconds = time.perf_counter() - started
    return row


async def _expect_refusal(row: Row, node: TensorNode, addr: str, data: Any) -> str:
    """Send ``data`` as ``over``; the refusal's message ('' and a problem if it was stored)."""
    try:
        result = await node.send_tensor(addr, "over", data)
    except TransferFailed as exc:
        row.check(exc.code == "quota", f"error code {exc.code!r}, expected 'quota'")
        return str(exc)
    row.check(False, f"a tensor over the limit was stored: {result}")
    return ""


async def small_disk(*, tensor: int = 6 * MiB, keep: int = 3, seed: int = 4) -> Row:
    """A tmpfs state dir too small for one more tensor: refused before anything is written."""
    started = time.perf_counter()
    size = keep * tensor + tensor // 2 + 2 * MiB
    row = Row(
        "4. Disk full",
        f"small disk: a {fmt_bytes(size)} tmpfs as the receiver's state dir, tensors of "
        f"{fmt_bytes(tensor)} until it is full",
    )
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp, tmpfs(size) as mnt:
        async with (
            receiver(Path(tmp), port, TENSORD_STATE_DIR=str(mnt)),
            TensorNode(fast_settings()) as node,
        ):
            addr = f"127.0.0.1:{port}"
            kept = await _keep_tensors(node, addr, tensor, keep, seed)
            error = await _expect_refusal(row, node, addr, random_bytes(seed, tensor))
            row.check("free" in error and "tensord rm" in error, f"unclear error: {error!r}")
        _intact(row, mnt, kept, set())
    row.tried = f"{keep + 1} tensors, the last one past the free space"
    row.outcome = f"refused: {error!r}; the {keep} earlier tensors intact"
    row.seconds = time.perf_counter() - started
    return row


async def disk_filled_midway(*, tensor: int = 6 * MiB, seed: int = 4) -> Row:
    """Another writer fills the receiver's tmpfs while a tensor arrives."""
    started = time.perf_counter()
    big = 4 * tensor
    size = tensor + big + 8 * MiB
    row = Row(
        "4. Disk full",
        f"disk filled mid-transfer: another writer fills the receiver's {fmt_bytes(size)} tmpfs "
        f"while a {fmt_bytes(big)} tensor arrives",
    )
    port = free_port()
    data = random_bytes((seed, 99), big)
    want = digest(data)
    outcome = ""
    with tempfile.TemporaryDirectory(prefix="tensord-chaos-") as tmp, tmpfs(size) as mnt:
        async with (
            receiver(Path(tmp), port, TENSORD_STATE_DIR=str(mnt)) as d,
            TensorNode(fast_settings()) as node,
            proxied(port, {}, rate=big / 2.0) as proxy,
        ):
            kept = await _keep_tensors(node, f"127.0.0.1:{port}", tensor, 1, seed)
            acked = Watermark()
            errors: list[TransferFailed] = []
            filled = 0
            async with trio.open_nursery() as nursery:
                await nursery.start(watch_sender, node, acked)

                async def send() -> None:
                    try:
                        await node.send_tensor(f"tensord://r@{proxy.addr}", "big", data)
                    except TransferFailed as exc:
                        errors.append(exc)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(send)
                await acked.wait_for(big // 4)
                filled = await trio.to_thread.run_sync(_fill, mnt / "filler")
            stored = "big" in {i.name for i in TensorStore(mnt).list()}
            if errors:
                err = errors[0]
                row.check(err.code == "quota", f"error code {err.code!r}, expected 'quota'")
                row.check(
                    "free disk space" in str(err) or "tensord rm" in str(err),
                    f"unclear error: {err}",
                )
                row.check(not stored, "the failed tensor is visible in the store")
                outcome = f"refused at commit: {str(err)!r}"
            else:
                got = stored_digests(mnt, ["big"])["big"]
                row.lost += got != want
                outcome = "completed byte-exact (its space was reserved at the start)"
            warnings = d.text.count("cannot save progress")
            _intact(row, mnt, kept, {"big"} if not errors else set())
            # Room again: the same tensor goes through.
            (mnt / "filler").unlink()
            await node.send_tensor(f"127.0.0.1:{port}", "big", data)
            row.lost += stored_digests(mnt, ["big"])["big"] != want
    row.tried = f"1 transfer, {fmt_bytes(filled)} written by the other writer"
    row.outcome = (
        f"{outcome}; {warnings} checkpoints could not be saved (logged); the earlier tensor "
        "intact; after freeing space the same send succeeded byte-exact"
    )
    row.seconds = time.perf_counter() - started
    return row
