"""Binding the control socket: mode 0660, stale sockets replaced, live ones and foreign
directories refused."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from tensord.control.server import bind_control_socket

from .support.helpers import require


def test_created_0660_in_a_new_0750_directory(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    sock = bind_control_socket(path)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    finally:
        sock.close()


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    first = bind_control_socket(path)
    with pytest.raises(OSError, match="already serving"):
        bind_control_socket(path)  # somebody listens there
    first.close()  # a killed daemon leaves the file behind
    second = bind_control_socket(path)
    second.close()


def test_a_non_socket_file_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("precious")
    with pytest.raises(OSError, match="not a socket"):
        bind_control_socket(path)
    assert path.read_text() == "precious"


def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "needs root to chown a directory to nobody")
    d = tmp_path / "other"
    d.mkdir()
    os.chown(d, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(OSError, match="not a directory owned by this user"):
        bind_control_socket(d / "control.sock")
    assert not (d / "control.sock").exists()
