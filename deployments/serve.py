"""Serve every deployment of prefect.yaml from one process, with the same names, schedules,
parameters and limits: the file is read here, never copied, so there is one source of truth."""

from __future__ import annotations

import importlib
import os
import signal
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

PROJECT_DIR = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_DIR / "prefect.yaml"


def load_flow(entrypoint: str) -> Flow[..., Any]:
    """`flows/onboard_tenants.py:onboard_tenants` -> the flow object, imported as a module so
    that it is the same object the rest of the project imports."""
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name)
    if not isinstance(flow, Flow):
        raise TypeError(f"{entrypoint} is not a Prefect flow")
    return flow


def read_config(path: Path = PREFECT_YAML) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return config


def pool_env(config: dict[str, Any]) -> dict[str, str]:
    """The environment the work pool's job variables give every run (block names, no secrets)."""
    env: dict[str, str] = {}
    for spec in config["deployments"]:
        env.update((spec.get("work_pool") or {}).get("job_variables", {}).get("env", {}))
    return env


def deployments_from_yaml(config: dict[str, Any] | None = None) -> list[RunnerDeployment]:
    config = config or read_config()
    out: list[RunnerDeployment] = []
    for spec in config["deployments"]:
        flow = load_flow(spec["entrypoint"])
        out.append(
            flow.to_deployment(  # type: ignore[arg-type]  # sync here: never a coroutine
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=spec.get("parameters") or {},
                schedules=[
                    Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                    for s in spec.get("schedules", [])
                ],
                concurrency_limit=spec.get("concurrency_limit"),
                enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
            )
        )
    return out


def serve_all() -> None:
    """Blocks until interrupted. Runs from the project folder, where the relative paths in the
    deployments' parameters point, as a worker does from its checkout."""
    os.chdir(PROJECT_DIR)
    config = read_config()
    # Served runs execute in this process's environment (a served deployment takes no job
    # variables): the block names a worker gets from the pool come from here, unless the
    # environment already says otherwise.
    for key, value in pool_env(config).items():
        os.environ.setdefault(key, value)
    # A service manager stops us with SIGTERM: shut down as on Ctrl-C, not wait for SIGKILL.
    signal.signal(signal.SIGTERM, _interrupt)
    serve(*deployments_from_yaml(config), print_starting_message=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    serve_all()
