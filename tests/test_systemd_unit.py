"""The shipped systemd unit passes ``systemd-analyze verify`` and says what the daemon does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .support.helpers import require

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "tensord.service"


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze is not installed (Debian package: systemd)")
    assert analyze is not None
    # verify checks that ExecStart exists: point it at this checkout's console script
    tensord = Path(sys.executable).parent / "tensord"
    unit = tmp_path / "tensord.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/tensord", str(tensord)))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "tensord.service" not in out.stderr  # no warnings about our unit


def test_unit_matches_the_daemon() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "StateDirectory=tensord",
        "RuntimeDirectory=tensord",
        "EnvironmentFile=-/etc/tensord/tensord.env",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
    ):
        assert line in text, line
