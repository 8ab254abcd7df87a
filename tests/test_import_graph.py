"""The layers' arrows point down, with no circles (ARCHITECTURE.md), checked on the source with `ast`.

clients → server → duplex → models: nothing below imports what is above it; the Python client (`clients/python`)
imports only the wire layer of the server (`server.wire`), which imports nothing else of the server; and no
two modules import each other, directly or through others. Imports inside functions count too: a lazy import
is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("clients", "server", "duplex", "models")  # top to bottom


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base)
                deps.add(target)
                deps.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules)
        graph[name] = {d for d in deps if d.split(".")[0] in LAYERS and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in graph:
                continue
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_arrows_point_down() -> None:
    graph = _import_graph()
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = sorted((m, d) for m, deps in graph.items() for d in deps if rank[d.split(".")[0]] < rank[m.split(".")[0]])
    assert upward == [], f"imports that point up a layer: {upward}"


def test_the_python_client_imports_only_the_wire_layer_of_the_server() -> None:
    graph = _import_graph()
    reaching = sorted((m, d) for m, deps in graph.items() if m.startswith("clients.python")
                      for d in deps if d.split(".")[0] in ("server", "duplex", "models")
                      and not (d == "server.wire" or d.startswith("server.wire.")))
    assert reaching == [], f"the Python client reaches past server.wire: {reaching}"


def test_the_wire_layer_imports_nothing_else_of_ours() -> None:
    graph = _import_graph()
    leaks = sorted((m, d) for m, deps in graph.items() if m.startswith("server.wire")
                   for d in deps if not d.startswith("server.wire"))
    assert leaks == [], f"server.wire imports other parts of the project: {leaks}"


def test_no_import_circles() -> None:
    assert _cycles(_import_graph()) == []


def test_the_checker_sees_a_circle_and_an_upward_import() -> None:
    """The checks above can fail: a made-up graph with both faults is caught."""
    graph = {"server.a": {"server.b"}, "server.b": {"server.a"}, "models.x": {"duplex.y"}, "duplex.y": set()}
    assert _cycles(graph) == [["server.a", "server.b"]]
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    assert [(m, d) for m, deps in graph.items() for d in deps
            if rank[d.split(".")[0]] < rank[m.split(".")[0]]] == [("models.x", "duplex.y")]
