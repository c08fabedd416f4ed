"""The shape of tensord/net/quic/: aioquic's private API in one module, protocol logic without
Trio, no module too long to read (docs/QUIC.md, "Modules").

The private-API check is by name: aioquic's own source says which underscore names it has
(every ``obj._name`` it reads and every ``def _name`` it defines); no module of the package
but ``_aioquic.py`` may use one as an attribute, define a method by one, or import from a
private aioquic module. One of our own private names that collides with one of aioquic's is
renamed rather than allowed: the check stays a plain rule.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import aioquic
import pytest

import tensord.net.quic

PACKAGE = Path(tensord.net.quic.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))
ENGINE = "_aioquic.py"
#: The protocol side, which the Trio side (udp, streams, session, dial, listen) feeds: these
#: modules do not use trio themselves (importing them still runs the package's ``__init__``).
NO_TRIO = ("_aioquic.py", "codes.py", "reset.py", "tls.py", "tuning.py")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@functools.cache
def aioquic_private_names() -> frozenset[str]:
    """Every underscore attribute aioquic reads or writes and every underscore method it
    defines, from its installed source."""
    names: set[str] = set()
    for path in Path(aioquic.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                names.add(node.attr)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _is_private(
                node.name
            ):
                names.add(node.name)
    return frozenset(names)


def private_uses(source: str) -> list[str]:
    """Where ``source`` touches aioquic's private API: ``line: what``."""
    private = aioquic_private_names()
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in private:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in private:
            found.append(f"{node.lineno}: def {node.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aioquic"):
            parts = node.module.split(".")
            names = [alias.name for alias in node.names]
            if any(_is_private(p) for p in parts) or any(_is_private(n) for n in names):
                found.append(f"{node.lineno}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "aioquic" and any(_is_private(p) for p in parts):
                    found.append(f"{node.lineno}: import {alias.name}")
    return found


def test_the_check_sees_what_it_is_for() -> None:
    planted = (
        "from aioquic._buffer import Buffer\n"
        "def f(session):\n"
        "    return session.quic._streams, session.quic._loss.bytes_in_flight\n"
        "class C:\n"
        "    def _write_stream_limits(self): ...\n"
    )
    assert len(private_uses(planted)) == 4
    ours = "def f(stream):\n    return stream._fin_sent, stream.quic.send_buffered\n"
    assert private_uses(ours) == []


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != ENGINE], ids=lambda p: p.name)
def test_only_the_engine_module_touches_aioquic_private_api(path: Path) -> None:
    assert private_uses(path.read_text()) == [], (
        f"{path.name} reaches into aioquic's private API: move that behind "
        f"tensord/net/quic/{ENGINE}"
    )


def test_the_engine_module_is_where_the_private_api_is() -> None:
    assert private_uses((PACKAGE / ENGINE).read_text()), "nothing private left? update the docs"


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if p.name in NO_TRIO] + [PACKAGE.parent / "admission.py"],
    ids=lambda p: p.name,
)
def test_the_protocol_modules_do_not_import_trio(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "trio" for a in node.names), path.name
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "trio", path.name


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_is_too_long_to_read(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 800
