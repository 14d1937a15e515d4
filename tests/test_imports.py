"""No import cycle inside a package (docs/design.md section 2): the floors keep the packages apart, and within
each package the modules import one way too, counting imports inside functions (which hide a cycle from the
interpreter, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "metrics", "lightning_modules")


def module_name(path: Path, root: Path = REPO) -> str:
    """The dotted name of a source file under `root`: ``metrics/report.py`` -> ``metrics.report``, an
    ``__init__.py`` its package's name."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The modules among `modules` that `path` (module `name`) imports anywhere in it (module level, in
    functions, under TYPE_CHECKING); ``from pkg import name`` counts as importing ``pkg.name`` when that is a
    module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" for alias in node.names]  # a module, or a name in `base`
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name or a third-party module: the module holding it
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package: str, root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the modules of the same package (`root`/`package`, subpackages included) it imports."""
    names = {path: module_name(path, root) for path in sorted((root / package).rglob("*.py"))}
    modules = set(names.values())
    return {name: imported_modules(path, name, modules) for path, name in names.items()}


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(one cycle ``[a, b, ..., a]``, all its modules) per strongly connected component of more than one
    module (Tarjan): the modules that import each other, directly or through the others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in sorted(graph[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            component.append(node)
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [(_cycle_through(graph, set(c), c[0]), c) for c in components]


def _cycle_through(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest import path from `start` back to itself within `component` (breadth first)."""
    paths = {child: [start, child] for child in sorted(graph[start] & component)}
    frontier = list(paths)
    while start not in paths:
        next_frontier = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child not in paths:
                    paths[child] = [*paths[node], child]
                    next_frontier.append(child)
        frontier = next_frontier
    return paths[start]


def test_cycles_finds_a_cycle_hidden_in_a_function(tmp_path):
    """The detector itself: a function-level import closes a cycle that module-level imports alone do not."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import f\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n")
    (package / "c.py").write_text("from . import a\n")
    graph = import_graph("pkg", tmp_path)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert cycles(graph) == [(["pkg.a", "pkg.b", "pkg.a"], ["pkg.a", "pkg.b"])]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package):
    found = cycles(import_graph(package))
    named = [f"{' -> '.join(cycle)} (the cycle's modules: {', '.join(members)})" for cycle, members in found]
    assert not found, "import cycles: " + "; ".join(named)
