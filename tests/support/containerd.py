"""A real containerd (Debian's ``containerd``) owned by one test, driven with ``ctr``.

Each instance has its own root, state dir, config and socket, and the CRI plugin (and the
snapshotters that need special filesystems) disabled, so it starts in a fraction of a second
without kubelet or cgroup setup. Images are unpacked with the ``native`` snapshotter (plain
directory copies: no overlay mount outlives the pull). On exit containerd is stopped and the
test fails if a process of it or a mount under its root is left behind.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .helpers import require, wait_serving

CONFIG = """
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"""

#: The snapshotter images are unpacked with: directories, no lasting mounts.
SNAPSHOTTER = "native"


@dataclass
class Containerd:
    """A running containerd: ``ctr`` against its socket, and where it keeps things."""

    root: Path
    socket: Path
    log: Path

    def ctr_bytes(self, *args: str, timeout: float = 120) -> bytes:
        """``ctr -a SOCKET ARGS...``: its stdout; a failure raises with ctr's stderr and the
        daemon's log (what a test needs to see why a pull failed)."""
        done = subprocess.run(
            ["ctr", "-a", str(self.socket), *args], capture_output=True, timeout=timeout
        )
        if done.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} exited {done.returncode}: "
                f"{done.stderr.decode(errors='replace')}\ncontainerd log:\n{self.log.read_text()}"
            )
        return done.stdout

    def ctr(self, *args: str) -> str:
        """:meth:`ctr_bytes` as text."""
        return self.ctr_bytes(*args).decode()

    def pull(self, ref: str, hosts_dir: Path) -> str:
        """``ctr images pull --hosts-dir DIR REF`` unpacked with the native snapshotter."""
        return self.ctr(
            "images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", SNAPSHOTTER, ref
        )

    def content(self) -> set[str]:
        """The digests in the content store (containerd verified each one as it wrote it)."""
        return set(self.ctr("content", "ls", "-q").split())

    def image_target(self, ref: str) -> str:
        """The digest the image ``ref`` points at (its manifest)."""
        for line in self.ctr("images", "ls").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return fields[2]
        raise AssertionError(f"containerd has no image {ref}")

    def snapshot_files(self, name: str) -> list[Path]:
        """Files called ``name`` in the native snapshotter's unpacked layers."""
        snapshots = self.root / f"io.containerd.snapshotter.v1.{SNAPSHOTTER}" / "snapshots"
        return sorted(snapshots.rglob(name))


def _mounts_under(path: Path) -> list[str]:
    """Mount points below ``path`` (from /proc/self/mountinfo)."""
    prefix = str(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


@contextmanager
def containerd(tmp: Path) -> Iterator[Containerd]:
    """containerd with everything under ``tmp`` (the socket in a short temporary directory:
    a Unix socket path is limited to 107 bytes), stopped on exit."""
    binary = shutil.which("containerd")
    require(
        binary is not None and shutil.which("ctr") is not None,
        "containerd is not installed (apt-get install containerd)",
    )
    assert binary is not None
    tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ctd-") as short:
        sock = Path(short) / "c.sock"
        config = tmp / "config.toml"
        root = tmp / "root"
        config.write_text(
            CONFIG.format(root=root, state=Path(short) / "state", socket=sock, opt=tmp / "opt")
        )
        log_path = tmp / "log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [binary, "--config", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        try:

            def probe() -> None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))

            wait_serving(probe, proc, log_path, 30)
            yield Containerd(root, sock, log_path)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        left = _mounts_under(root) + _mounts_under(Path(short))
        assert not left, f"containerd left mounts behind: {left}"
