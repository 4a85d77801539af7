"""The core package is plain Python: importing every module of `onboarding` loads no Prefect
(nor prefect-email, prefect-redis), none of the Prefect layers (`flows`, `tasks`), no web
framework (Starlette, uvicorn) and not the connect service (`connect_service`); and no module
of the core names one of them in an import, not even inside a function."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from demo.processes import PROJECT

# Run in a fresh interpreter: this test process has Prefect loaded already.
IMPORT_THE_CORE = """
import json, pkgutil, sys
import onboarding

names = ["onboarding"]
for module in pkgutil.walk_packages(onboarding.__path__, "onboarding."):
    __import__(module.name)
    names.append(module.name)
loaded = sorted(
    name
    for name in sys.modules
    if name.startswith("prefect")
    or name.split(".")[0] in ("flows", "tasks", "starlette", "uvicorn", "connect_service")
)
print(json.dumps({"imported": names, "loaded": loaded}))
"""


def test_importing_every_core_module_loads_no_prefect() -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_THE_CORE],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    # The walk found the modules, subpackages' too (so an empty walk cannot pass).
    assert {
        "onboarding.ledger",
        "onboarding.mail.sender",
        "onboarding.ledger.facade",
        "onboarding.batch.campaign",
        "onboarding.batch.run_request",
        "onboarding.versori.client",
        "onboarding.connections.durable_links",
    } <= set(report["imported"])
    assert report["loaded"] == []


# What no module of the core imports, top-level or inside a function.
NOT_IN_THE_CORE = (
    "prefect",
    "prefect_email",
    "prefect_redis",
    "flows",
    "tasks",
    "starlette",
    "uvicorn",
    "asgi_correlation_id",
    "connect_service",
)


def imported_roots(source: str, filename: str) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_core_module_imports_prefect_or_the_web() -> None:
    files = sorted((PROJECT / "onboarding").rglob("*.py"))
    assert len(files) > 30, files  # the walk found the core
    found = [
        f"{path.relative_to(PROJECT)}: {root}"
        for path in files
        for root in sorted(imported_roots(path.read_text(), str(path)))
        if root in NOT_IN_THE_CORE
    ]
    assert found == []
    # The check reads what it should: a lazy import is found.
    assert "starlette" in imported_roots("def f():\n    import starlette.app\n", "x.py")
