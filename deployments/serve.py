"""Serve every deployment of prefect.yaml from one process, with the same names, schedules,
parameters and limits: the file is read here, never copied, so there is one source of truth."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import sys
import threading
import time
from typing import Any

import httpx
import yaml
from prefect import Flow
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import TerminationSignal
from prefect.logging import get_logger
from prefect.runner import Runner
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

from deployments.steps import PROJECT_DIR

# Asked to stop (SIGTERM, Ctrl-C), the process ends within this many seconds whatever the
# Prefect API does; and how long the API gets to answer whether it is there at all.
STOP_GRACE_SECONDS = 5.0
API_CHECK_SECONDS = 1.0

log = get_logger("onboard.serve")


def load_flow(entrypoint: str) -> Flow[..., Any]:
    """`flows/onboard_tenants.py:onboard_tenants` -> the flow object, imported as a module so
    that it is the same object the rest of the project imports."""
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name)
    if not isinstance(flow, Flow):
        raise TypeError(f"{entrypoint} is not a Prefect flow")
    return flow


def read_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text("utf-8"))
    return config


def pool_env(config: dict[str, Any]) -> dict[str, str]:
    """The environment the work pool's job variables give every run (block names, no secrets)."""
    env: dict[str, str] = {}
    for spec in config["deployments"]:
        env.update((spec.get("work_pool") or {}).get("job_variables", {}).get("env", {}))
    return env


def deployments_from_yaml(config: dict[str, Any]) -> list[RunnerDeployment]:
    return [
        load_flow(spec["entrypoint"]).to_deployment(  # type: ignore[misc]  # sync, not a coroutine
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
        for spec in config["deployments"]
    ]


def schedule_lines(deployments: list[RunnerDeployment]) -> list[str]:
    """What `onboard serve` says of the schedules it applies: each deployment that has one,
    whether it is on, what a scheduled run works on, and, when one is off, how to turn it on
    (prefect.yaml ships every one off)."""
    lines, off = [], False
    for d in deployments:
        for s in d.schedules or []:
            cron, zone = (
                getattr(s.schedule, "cron", s.schedule),
                getattr(s.schedule, "timezone", ""),
            )
            off = off or not s.active
            params = (d.parameters or {}).items()
            about = ", ".join(f"{k} {v}" for k, v in params if k in ("profile", "roster"))
            lines.append(
                f"  {d.flow_name}/{d.name}: {cron}{f' {zone}' if zone else ''}, "
                f"{'ON' if s.active else 'off'}" + (f" ({about})" if about else "")
            )
    if not lines:
        return ["No deployment has a schedule."]
    how = (
        "To turn one on: point its parameters (profile, roster) at your own in prefect.yaml, set "
        "`active: true` under its schedule, and start `onboard serve` again."
    )
    return ["Schedules (from prefect.yaml):", *lines, *([how] if off else [])]


def serve_all() -> None:
    """Blocks until asked to stop (SIGTERM or Ctrl-C; see `BoundedStopRunner`). Runs from the
    project folder, where the relative paths in the deployments' parameters point, as a
    worker does from its checkout."""
    os.chdir(PROJECT_DIR)
    config = read_config()
    # Served runs execute in this process's environment (a served deployment takes no job
    # variables): the block names a worker gets from the pool come from here, unless the
    # environment already says otherwise.
    for key, value in pool_env(config).items():
        os.environ.setdefault(key, value)
    deployments = deployments_from_yaml(config)
    # What prefect.serve does, with a runner whose stop is bounded.
    runner = BoundedStopRunner(pause_on_shutdown=True)
    for deployment in deployments:
        runner.add_deployment(deployment)
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
    ui = PREFECT_UI_URL.value()
    print(
        f"Serving {len(deployments)} deployment(s) and polling for their runs: {names}.\n"
        "Start one with `prefect deployment run NAME`"
        + (f" or from the Prefect UI ({ui}/deployments)" if ui else "")
        + "; stop with Ctrl-C or SIGTERM.\n"
        + "\n".join(schedule_lines(deployments)),
        flush=True,
    )
    # Ctrl-C stops as SIGTERM does (asyncio keeps a handler that is not Python's default).
    signal.signal(signal.SIGINT, runner.handle_sigterm)
    with contextlib.suppress(KeyboardInterrupt, TerminationSignal):
        asyncio.run(runner.start())


class BoundedStopRunner(Runner):
    """Prefect's runner, whose stop never waits on a Prefect API that is gone.

    Prefect's own, told to stop (its SIGTERM handler), cancels the runs in flight and then
    pauses every deployment's schedules through the API. With the Prefect server stopping at
    the same time, each call to it is retried with exponential backoff (2, 4, 8, 16, 32 s, on
    top of httpx's own connection retries) for each of the 5 deployments; meanwhile a second
    SIGTERM or a Ctrl-C changed nothing, so `onboard serve` went on for minutes (seen under
    py-spy: Runner.__aexit__ -> _pause_schedules -> pause_deployment -> httpcore connect,
    sleeping between retries).

    Here: before pausing, the API is asked whether it is there, with a 1 s timeout; if not, the
    schedules are left as they are (saying so), since nothing could pause them. Whatever
    happens, the process ends STOP_GRACE_SECONDS after the first request to stop, and at once
    on a second one; exit code 0 either way (it stopped as asked)."""

    _stop_requested = False

    async def __aenter__(self) -> BoundedStopRunner:
        await super().__aenter__()
        log.info("Serving; stop with Ctrl-C or SIGTERM")
        return self

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        if self._stop_requested:
            _exit_now("asked again to stop: stopping now")
        self._stop_requested = True
        threading.Thread(target=self._stop_in_time, name="stop-in-time", daemon=True).start()
        super().handle_sigterm(*args, **kwargs)

    async def astop(self) -> None:
        if self.pause_on_shutdown and not await _api_answers():
            self.pause_on_shutdown = False
            log.warning(
                "The Prefect API at %s does not answer: the deployments' schedules are left "
                "unpaused (`onboard serve` serves them again when it starts)",
                PREFECT_API_URL.value(),
            )
        await super().astop()

    def _stop_in_time(self) -> None:
        time.sleep(STOP_GRACE_SECONDS)
        _exit_now(
            f"not stopped within {STOP_GRACE_SECONDS:g} s (the Prefect API does not answer): "
            "stopping now; runs it could not mark cancelled show as running until the server "
            "notices they are gone"
        )


async def _api_answers() -> bool:
    url = str(PREFECT_API_URL.value() or "").rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=API_CHECK_SECONDS) as client:
            return (await client.get(f"{url}/health")).status_code == 200
    except httpx.HTTPError:
        return False


def _exit_now(why: str) -> None:
    log.warning("%s", why)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    serve_all()
