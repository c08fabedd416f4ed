"""Which code may import which, read from the source with ``ast`` (nothing is imported).

- Nothing under ``tests/`` imports ``bench``: the chaos scenarios live in ``tests/support/chaos``
  and ``bench/chaos.py`` imports them, never the other way round.
- Nothing imports a test module (``tests/test_*.py``): shared helpers live in ``tests/support``.
- No import cycle among the modules of ``tensord/``: dependencies point down (DESIGN.md). Every
  import counts - at module level, inside a function, under ``if TYPE_CHECKING:`` - because
  each is a dependency a reader has to follow, whether or not Python runs it at import time.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path, root: Path = ROOT) -> str:
    """``tensord/net/tcp.py`` -> ``tensord.net.tcp``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str, tuple[str, ...]]]:
    """Every import in ``path``: (line, absolute module, the names a ``from`` import takes)."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield node.lineno, module, tuple(alias.name for alias in node.names)


def import_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports. ``from a import b`` is an edge to
    ``a.b`` when that is a module, else to ``a``; importing a submodule is not counted as
    importing its parent packages (their ``__init__`` re-exports would make every module
    look cyclic)."""
    paths = {module_name(p, root): p for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges: set[str] = set()
        for _, module, names in imported(path, root):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in paths]
            if len(targets) < len(names) or not names:
                targets.append(module)
            edges |= {t for t in targets if t in paths and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_nothing_under_tests_imports_bench() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for line, module, _ in imported(path)
        if module == "bench" or module.startswith("bench.")
    ]
    assert not offenders, "tests/ must not import bench/ (move the code to tests/support):\n" + (
        "\n".join(offenders)
    )


def test_no_test_module_is_imported() -> None:
    """A test module is what pytest runs, not a library: what two files share lives in
    ``tests/support`` (importing a test module also collects its tests a second time under
    another name, and its fixtures leak into the importer)."""

    def is_test_module(module: str, names: tuple[str, ...]) -> bool:
        parts = module.split(".")
        if parts[0] != "tests":
            return False
        if parts[-1].startswith("test_"):
            return True
        return module == "tests" and any(n.startswith("test_") for n in names)

    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for folder in ("tests", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, module, names in imported(path)
        if is_test_module(module, names)
    ]
    assert not offenders, "a test module imported (move what it shares to tests/support):\n" + (
        "\n".join(offenders)
    )


def test_no_new_import_cycle_among_tensord_modules() -> None:
    found = cycles(import_graph("tensord"))
    assert not found, "import cycles in tensord/ (make one side depend on an interface):\n" + (
        "\n".join(" <-> ".join(c) for c in found)
    )
