"""Child processes for the end-to-end tests and the benchmarks: free ports, waiting for services,
child process groups, a real `prefect server`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

PROJECT = Path(__file__).resolve().parent.parent
# Bound once: some tests replace time.sleep for a while (test_task_retry.py, test_pacing.py) and
# count its calls, which must not include those of a helper waiting in another thread (the
# session's Prefect server starts in one, tests/conftest.py).
_sleep = time.sleep


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(
    url: str,
    timeout: float = 60.0,
    proc: subprocess.Popen[bytes] | None = None,
    found: bool = False,
) -> None:
    """Wait until `url` answers (any status below 500; with `found`, a 200)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            status = httpx.get(url, timeout=2).status_code
            if status == 200 or (status < 500 and not found):
                return
        except httpx.HTTPError:
            pass
        _sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextmanager
def child(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in its own process group, killed with its children on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, env=env, cwd=PROJECT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()


def base_env(tmp: Path) -> dict[str, str]:
    """The parent's environment with a private Prefect home and none of our settings but a
    short retry backoff."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VERSORI_", "ONBOARD_", "PREFECT_"))
    }
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # Retries as the product makes them, with waits of 50 ms instead of 1 s, 2 s, 4 s: a
    # command whose tenants fail transiently otherwise sleeps seconds (tests/unit/test_settings.py
    # checks the backoff itself).
    env["ONBOARD_RETRY_BACKOFF_SECONDS"] = "0.05"
    # A killed run's claims lapse after 3 s instead of 20: a re-run (tests/e2e/test_crash_resume,
    # test_signals) takes its tenants over after that wait, as after the real one.
    env["ONBOARD_RUN_LEASE_SECONDS"] = "3"
    return env


@contextmanager
def prefect_server(
    tmp: Path,
    database_url: str | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    separate_services: bool = False,
) -> Iterator[str]:
    """A real `prefect server start` on a free loopback port with its own home (and database,
    SQLite in that home unless `database_url` says otherwise). `env` adds to (or overrides) the
    server's environment, e.g. Prefect settings. With `separate_services`, the API runs with
    `--no-services` and the background services in a `prefect server services start` process
    of their own, logging beside `log` to "<log stem>-services<suffix>" (which needs a broker
    and Docket that both processes reach, such as Redis, set in `env`). Yields the API URL."""
    port = free_port()
    server_env = base_env(tmp)
    server_env["PREFECT_HOME"] = str(tmp / "prefect-server-home")
    server_env["PREFECT_API_LOG_RETRYABLE_ERRORS"] = "true"
    if database_url:
        server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    server_env.update(env or {})
    api = f"http://127.0.0.1:{port}/api"
    prefect = str(Path(sys.executable).parent / "prefect")
    log = log or tmp / "prefect-server.log"
    command = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    if separate_services:
        command.append("--no-services")
    with child(command, server_env, log) as proc:
        wait_for_http(f"{api}/health", timeout=120, proc=proc)
        if not separate_services:
            yield api
            return
        # Started once the API has migrated the database, so it need not migrate again.
        services_env = dict(server_env, PREFECT_SERVER_DATABASE_MIGRATE_ON_START="false")
        services_log = log.with_name(f"{log.stem}-services{log.suffix}")
        with child([prefect, "server", "services", "start"], services_env, services_log):
            yield api
