"""Asked to stop, a command stops within seconds, whatever the Prefect server does.

- `onboard serve` on SIGTERM: with the server up it pauses its deployments' schedules and exits
  0; with the server hung (SIGSTOP) or stopping at the same moment it still exits 0 within
  10 s (deployments/serve.py: BoundedStopRunner). Before, it went on for minutes, retrying the
  pauses against the gone API, deaf to SIGTERM and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import PROJECT, base_env, child, free_port, wait_for_http

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
STOP_WITHIN = 10.0
SERVING = b"Serving; stop with Ctrl-C or SIGTERM"


def wait_for_log(log: Path, text: bytes, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_bytes():
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, f"{text!r} not in {log} within {timeout} s"
        time.sleep(0.1)


def stop_time(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> float:
    """Seconds until `proc` exits (at most `timeout`, then it is still running)."""
    started = time.monotonic()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    return time.monotonic() - started


# -- onboard serve -------------------------------------------------------------------------


class Server:
    """A `prefect server start` of this module's own (the tests stop it), on a migrated
    database."""

    def __init__(self, proc: subprocess.Popen[bytes], api: str) -> None:
        self.proc, self.api = proc, api


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, migrated_prefect_db: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("signals-server")
    env = base_env(tmp)
    home = tmp / "prefect-server-home"
    home.mkdir()
    shutil.copyfile(migrated_prefect_db, home / "prefect.db")
    env["PREFECT_HOME"] = str(home)
    port = free_port()
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with child(command, env, tmp / "server.log") as proc:
        api = f"http://127.0.0.1:{port}/api"
        wait_for_http(f"{api}/health", timeout=120, proc=proc)
        yield Server(proc, api)
        if proc.poll() is None:  # a test left it stopped
            os.killpg(proc.pid, signal.SIGCONT)


def start_serve(tmp: Path, api: str) -> tuple[subprocess.Popen[bytes], Path]:
    env = dict(base_env(tmp), PREFECT_API_URL=api)
    log = tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "onboard"), "serve"],
            env=env,
            cwd=PROJECT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for_log(log, SERVING, proc, timeout=90)
    return proc, log


def paused(api: str, name: str) -> bool:
    return bool(httpx.get(f"{api}/deployments/name/{name}", timeout=10).json()["paused"])


def test_serve_stops_on_sigterm_pausing_its_deployments(tmp_path: Path, server: Server) -> None:
    proc, log = start_serve(tmp_path, server.api)
    try:
        assert not paused(server.api, "onboard-tenants/scheduled")
        proc.send_signal(signal.SIGTERM)
        took = stop_time(proc)
        assert proc.returncode == 0, log.read_text()
        assert took < STOP_WITHIN, log.read_text()
        assert paused(server.api, "onboard-tenants/scheduled"), "Prefect's pause on shutdown"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_stops_within_seconds_when_the_server_hangs(tmp_path: Path, server: Server) -> None:
    proc, log = start_serve(tmp_path, server.api)
    os.killpg(server.proc.pid, signal.SIGSTOP)  # the server takes connections, answers nothing
    try:
        proc.send_signal(signal.SIGTERM)
        took = stop_time(proc)
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log.read_text()
    assert took < STOP_WITHIN, f"{took:.1f} s\n{log.read_text()}"
    assert "does not answer" in log.read_text()


def test_serve_stops_within_seconds_when_the_server_stops_too(
    tmp_path: Path, server: Server
) -> None:
    """Last of the module: it stops the module's server."""
    proc, log = start_serve(tmp_path, server.api)
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)  # the same moment, as a stack going down
        proc.send_signal(signal.SIGTERM)
        took = stop_time(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log.read_text()
    assert took < STOP_WITHIN, f"{took:.1f} s\n{log.read_text()}"
