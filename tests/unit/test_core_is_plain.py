"""The core package is plain Python: importing every module of `onboarding` loads no Prefect
(nor prefect-email, prefect-redis) and none of the Prefect layers (`flows`, `tasks`)."""

from __future__ import annotations

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
    if name.startswith("prefect") or name.split(".")[0] in ("flows", "tasks")
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
    assert {"onboarding.ledger", "onboarding.mail.sender", "onboarding.ledger.store"} <= set(
        report["imported"]
    )
    assert report["loaded"] == []
