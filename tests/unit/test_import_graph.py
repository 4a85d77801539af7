"""The project's import graph, drawn from the source (every import, those inside functions
and under TYPE_CHECKING too): no cycle, and every arrow points down a layer
(deployments -> flows -> tasks -> the core; the connect service, connect_service/, an entry
point on the core that no lower layer imports; demo and bench beside them, the core importing
neither; entry points in flows/ never import each other). Inside the core, its parts (the
subpackages of onboarding/) form no cycle either, and are layered too (CORE_MAY_IMPORT)."""

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

# The core's parts (the subpackages of onboarding/), in layers, bottom up:
#     settings < versori, ledger < inputs < mail < connections < batch, sync
# What each part may import of the others: those of lower layers, never one of its own layer
# or above. Any part may import the root modules (clock, constants, db_url, errors, files,
# net, ...), which import no part but as ROOT_MAY_IMPORT says.
CORE_MAY_IMPORT = {
    "settings": set(),
    # The Versori API's client and its wire format, and the ledger: each on the settings only.
    "versori": {"settings"},
    "ledger": {"settings"},
    # What a run reads (profiles, rosters, the brand shown): checked without opening a ledger.
    "inputs": {"settings", "versori", "ledger"},
    "mail": {"settings", "versori", "ledger", "inputs"},
    "connections": {"settings", "versori", "ledger", "inputs", "mail"},
    # The top: a run's batch (its inputs checked together, run_request) and the sync with
    # Versori: each may import every part below; no part imports either of them.
    "batch": {"settings", "versori", "ledger", "inputs", "mail", "connections"},
    "sync": {"settings", "versori", "ledger", "inputs", "mail", "connections"},
}
# The root modules of the core import no part, but this one: an export reads the ledger.
ROOT_MAY_IMPORT = {"onboarding.export": {"ledger"}}


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
    assert len(entry_points) == 5, entry_points  # sync_connections the fifth


def test_the_graph_is_really_drawn() -> None:
    """A check that reads nothing would pass: the known arrows are found."""
    edges = graph()
    assert "onboarding.batch.campaign" in edges["onboarding.batch.tenant_slices"]
    assert "onboarding.batch.run_request" in edges["flows.inputs.parameters"]
    assert "onboarding.connections.durable_links" in edges["onboarding.batch.campaign"]
    assert "connect_service.service" in edges["connect_service.app"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def core_part(module: str) -> str | None:
    """The part of the core (its subpackage) `module` is in: None for a root module of the
    core (clock, errors, files, ...) and for a module outside the core."""
    parts = module.split(".")
    return (
        parts[1]
        if parts[0] == "onboarding" and len(parts) > 1 and parts[1] in CORE_MAY_IMPORT
        else None
    )


def core_arrows() -> list[tuple[str, str]]:
    """Every arrow between two modules of the core, from the same graph as above."""
    return [
        (source, target)
        for source, targets in graph().items()
        for target in sorted(targets)
        if source.split(".")[0] == "onboarding" and target.split(".")[0] == "onboarding"
    ]


def test_the_core_table_names_every_part_in_layers() -> None:
    """CORE_MAY_IMPORT names each subpackage of onboarding/ (a new one must be placed in a
    layer), and is itself a layering: no part may import one that may import it."""
    core = PROJECT / "onboarding"
    parts = {p.name for p in core.iterdir() if (p / "__init__.py").is_file()}
    assert parts == set(CORE_MAY_IMPORT)
    assert cycles(CORE_MAY_IMPORT) == []
    assert all(CORE_MAY_IMPORT[p] <= set(CORE_MAY_IMPORT) for p in CORE_MAY_IMPORT)


def test_the_core_parts_form_no_cycle() -> None:
    part_edges: dict[str, set[str]] = {part: set() for part in CORE_MAY_IMPORT}
    for source, target in core_arrows():
        s, t = core_part(source), core_part(target)
        if s is not None and t is not None and s != t:
            part_edges[s].add(t)
    assert cycles(part_edges) == []


def test_every_arrow_in_the_core_points_down_a_layer() -> None:
    upward = []
    for source, target in core_arrows():
        s, t = core_part(source), core_part(target)
        if t is None or s == t:
            continue  # a root module, or within one part
        allowed = CORE_MAY_IMPORT[s] if s is not None else ROOT_MAY_IMPORT.get(source, set())
        if t not in allowed:
            upward.append(f"{source} -> {target}")
    assert upward == []


def test_the_core_graph_is_really_drawn() -> None:
    """The core's known arrows are found, and its parts told from its root modules."""
    arrows = set(core_arrows())
    assert ("onboarding.batch.run_request", "onboarding.mail") in arrows
    assert ("onboarding.inputs.brand", "onboarding.settings.brand") in arrows
    assert ("onboarding.export", "onboarding.ledger") in arrows
    assert core_part("onboarding.settings") == "settings"
    assert core_part("onboarding.files") is None and core_part("flows.inputs") is None
