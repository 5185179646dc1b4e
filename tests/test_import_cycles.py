"""The worker's packages import each other in layers, without cycles: server -> batching, storage; storage imports
neither. Imports are read from the source (ast), function-level ones included, so a cycle hidden inside a
function (imported late "to avoid the cycle") counts as one too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "batching", "storage")
# Cycles known and owned elsewhere; remove an entry when its cycle is gone.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its source)."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                # `from package import module` imports the module; `from module import name`, the module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                resolved = known(target)
                if resolved and resolved != name:
                    graph[name].add(resolved)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_among_the_worker_modules():
    graph = import_graph()
    new = [sorted(c) for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"


def test_storage_imports_neither_the_server_nor_batching():
    graph = import_graph()
    upward = sorted((m, t) for m, ts in graph.items() if m.split(".")[0] == "storage" for t in ts
                    if t.split(".")[0] in ("server", "batching"))  # fmt: skip
    assert not upward


def test_batching_does_not_import_the_server():
    graph = import_graph()
    upward = sorted((m, t) for m, ts in graph.items() if m.split(".")[0] == "batching" for t in ts
                    if t.split(".")[0] == "server")  # fmt: skip
    assert not upward


def test_the_cycle_finder_reports_a_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(graph) == [frozenset({"a", "b"})]
