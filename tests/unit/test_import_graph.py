"""The project's import graph, drawn from the source (every import, those inside functions
and under TYPE_CHECKING too): no cycle, and every arrow points down a layer
(deployments -> flows -> tasks -> the core; the connect service, connect_service/, an entry
point on the core that no lower layer imports; demo and bench beside them, the core importing
neither; entry points in flows/ never import each other)."""

from __future__ import annotations

import ast
from pathlib import Path

from demo.processes import PROJECT

PACKAGES = ("onboarding", "connect_service", "flows", "tasks", "deployments", "demo", "bench")
# What each top-level package may import of the others.
MAY_IMPORT = {
    "onboarding": set(),
    # The connect service (`onboard connect-server`): an entry point, like flows/; the batch
    # (onboarding, tasks, flows) never imports it.
    "connect_service": {"onboarding"},
    "tasks": {"onboarding"},
    "flows": {"onboarding", "tasks"},
    "deployments": {"onboarding", "connect_service", "tasks", "flows", "demo"},
    # The demo's last act serves the connect app in process (demo/connect_demo.py).
    "demo": {"onboarding", "connect_service"},
    "bench": {"onboarding", "connect_service", "tasks", "flows", "deployments", "demo"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project's modules that `path` imports, by their full names."""
    found: set[str] = set()
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (PROJECT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    edges = {module_name(p): imports_of(p, modules) for p in files}
    # A package's own __init__ is not an arrow from its modules back up (Python runs it first).
    return {
        m: {t for t in targets if t != m and not m.startswith(t + ".")}
        for m, targets in edges.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_every_arrow_points_down_a_layer() -> None:
    upward = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if (s := source.split(".")[0]) != (t := target.split(".")[0]) and t not in MAY_IMPORT[s]
    ]
    assert upward == []


def test_entry_points_never_import_each_other() -> None:
    entry_points = {module_name(p) for p in (PROJECT / "flows").glob("*.py")} - {"flows"}
    edges = graph()
    crossing = [f"{m} -> {t}" for m in entry_points for t in edges[m] if t in entry_points]
    assert crossing == []
    assert len(entry_points) == 4, entry_points


def test_the_graph_is_really_drawn() -> None:
    """A check that reads nothing would pass: the known arrows are found."""
    edges = graph()
    assert "onboarding.batch.campaign" in edges["onboarding.batch.tenant_slices"]
    assert "onboarding.inputs.run_request" in edges["flows.inputs.parameters"]
    assert "onboarding.connections.durable_links" in edges["onboarding.batch.campaign"]
    assert "connect_service.service" in edges["connect_service.app"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
