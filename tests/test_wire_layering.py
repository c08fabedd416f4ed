"""tensord/wire is sans-I/O: none of its modules may import trio (or any other I/O library)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tensord.wire

WIRE = Path(tensord.wire.__file__).parent
FORBIDDEN = {"trio", "socket", "asyncio", "anyio", "selectors", "ssl"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module imported anywhere in ``path`` (also inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("import_module",
                                                                             "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):  # fmt: skip
            found.add(node.args[0].value.split(".")[0])
    return found


def relative_imports_leaving_wire(path: Path) -> list[str]:
    """``from ..net import x`` style imports that climb out of tensord/wire to an I/O layer."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 2:
            target = (node.module or "").split(".")[0]
            if target not in ("errors", "limits"):  # both pure, no I/O
                out.append(f"{'.' * node.level}{node.module or ''}")
    return out


WIRE_FILES = sorted(WIRE.rglob("*.py"))


def test_wire_package_has_the_expected_modules() -> None:
    names = {p.name for p in WIRE_FILES}
    assert {"__init__.py", "frames.py", "messages.py", "transfer.py"} <= names


@pytest.mark.parametrize("path", WIRE_FILES, ids=lambda p: p.name)
def test_no_io_imports(path: Path) -> None:
    bad = imported_modules(path) & FORBIDDEN
    assert not bad, f"{path.name} imports {sorted(bad)}: tensord/wire must stay sans-I/O"
    climbing = relative_imports_leaving_wire(path)
    assert not climbing, f"{path.name} imports {climbing} from outside tensord/wire"


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nimport trio.lowlevel as ll\nfrom socket import socket\n"
        "def f():\n    import asyncio\n    return __import__('anyio')\n"
    )
    assert imported_modules(sample) >= {"trio", "socket", "asyncio", "anyio", "os"}


def modules_loaded_by(statement: str) -> list[str]:
    """I/O modules (and tensord's I/O layers) in sys.modules of a fresh interpreter after
    running ``statement``."""
    watched = sorted(FORBIDDEN - {"socket", "selectors", "ssl"})  # the stdlib loads these anyway
    code = (
        "import sys\n"
        f"{statement}\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {watched!r}"
        " or m.startswith(('tensord.net', 'tensord.node')))\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return [m for m in proc.stdout.strip().split(",") if m]


def test_importing_tensord_wire_does_not_load_trio() -> None:
    loaded = modules_loaded_by(
        "import tensord.wire, tensord.wire.transfer, tensord.wire.frames\n"
        "assert 'tensord.wire.transfer' in sys.modules"
    )
    assert loaded == [], f"importing tensord.wire loaded {loaded}"


def test_the_subprocess_check_sees_trio() -> None:
    assert "trio" in modules_loaded_by("import trio")
