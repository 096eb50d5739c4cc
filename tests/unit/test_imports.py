"""The package's import graph has no cycle, counting imports inside functions too (issue 23: a low module never
imports a higher one)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dist_tune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """dist_tune modules `path` imports anywhere in it (`from dist_tune.x import y` counts dist_tune.x.y when that
    is a module, else dist_tune.x), with the subpackages whose `__init__` those imports run (other than the
    packages `path` itself is in, which are already being imported when it runs)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                      for alias in node.names}
    here = module_name(path)
    parents = {".".join(name.split(".")[:i]) for name in found for i in range(2, name.count(".") + 1)}
    parents = {parent for parent in parents if not here.startswith(f"{parent}.")}  # its own package is running
    return {name for name in found | parents if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported(path, set(paths)) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return trail[trail.index(child):] + [child] if child in trail else [node, child]
            if child not in state:
                cycle = visit(child, trail + [child])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"dist_tune.trainer", "dist_tune.data.stream", "dist_tune.engines.base"} <= set(graph)
    assert "dist_tune.evaluation" in graph["dist_tune.trainer"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
