"""Asked to stop, a command stops within seconds, whatever the Prefect server does.

- `onboard serve` on SIGTERM: with the server up it pauses its deployments' schedules and exits
  0; with the server hung (SIGSTOP) or stopping at the same moment it still exits 0 within
  10 s (deployments/serve.py: BoundedStopRunner). Before, it went on for minutes, retrying the
  pauses against the gone API, deaf to SIGTERM and Ctrl-C.
- `onboard run`, one Ctrl-C to its process group (which stops its temporary Prefect server too,
  as a terminal does): exit 130 within 10 s with how far the roster got, read from the ledger;
  the same command again finishes the roster (flows/running/in_process.py: stop_on_interrupt).
  Before, it went on for minutes trying to reach the dead server.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from demo.emulator import DEFAULT_API_KEY, EmulatorConfig, EmulatorServer
from demo.processes import PROJECT, base_env, child, free_port, wait_for_http
from onboarding.ledger import Ledger

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
PROFILE = str(PROJECT / "examples" / "profile.yaml")
CONNECTOR = "01M8F12B95S4BX0QFB3TPDWZ0Q"
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


# -- onboard run ---------------------------------------------------------------------------

TENANTS = 200
# Delivered tenants in the ledger before the Ctrl-C. At 2 s a call the first comes alone, ~2 s
# into the batch, the next ones ~2 s later, 16 at once: 1 lets the Ctrl-C land a round earlier,
# with as many calls in flight and the same 2 s each still to wait.
INTERRUPT_AFTER = 1


def delivered(db_url: str) -> int:
    ledger = Ledger(db_url)
    try:
        return ledger.counts_by_status(CONNECTOR).get("delivered", 0)
    finally:
        ledger.close()


def test_one_ctrl_c_stops_a_run_within_seconds_and_the_same_command_finishes_it(
    tmp_path: Path, migrated_prefect_db: Path
) -> None:
    roster = tmp_path / "roster.csv"
    roster.write_text(
        "tenant_id,name,admin_email,subdomain\n"
        + "".join(
            f"t{i:04d},Tenant {i},admin@t{i:04d}.example.com,t{i:04d}\n"
            for i in range(1, TENANTS + 1)
        )
    )
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = base_env(tmp_path)
    env.update(VERSORI_API_KEY=DEFAULT_API_KEY, ONBOARD_DB_URL=db_url)
    home = Path(env["PREFECT_HOME"])
    home.mkdir(parents=True)
    shutil.copyfile(migrated_prefect_db, home / "prefect.db")  # the temporary server's
    command = [str(BIN / "onboard"), "run", "--roster", str(roster), "--profile", PROFILE]
    out, err = tmp_path / "run.out", tmp_path / "run.err"

    with EmulatorServer(EmulatorConfig(latency_ms=2000)) as slow:
        env["VERSORI_BASE_URL"] = slow.base_url
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                command, env=env, cwd=tmp_path, stdout=stdout, stderr=stderr, start_new_session=True
            )
        try:
            deadline = time.monotonic() + 120
            while not (tmp_path / "ledger.db").exists() or delivered(db_url) < INTERRUPT_AFTER:
                assert proc.poll() is None, err.read_text()
                assert time.monotonic() < deadline, "no tenant delivered in 120 s"
                time.sleep(0.2)
            before = delivered(db_url)
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the CLI and its temporary server
            took = stop_time(proc)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 130, out.read_text() + err.read_text()
        assert took < STOP_WITHIN, f"{took:.1f} s\n{err.read_text()}"

    printed = out.read_text()
    found = re.search(
        r"Interrupted: (\d+) of 200 tenant\(s\) delivered, (\d+) failed.*; run the same command "
        r"again to finish \(it skips what is done\)\.",
        printed,
    )
    assert found, printed
    after = delivered(db_url)
    assert before <= int(found[1]) <= after < TENANTS, (before, found[1], after)
    # Counts only: no link, state or key on either stream.
    ledger = Ledger(db_url)
    secrets = [s for r in ledger.iter_records() for s in (r.url, r.state) if s]
    ledger.close()
    shown = printed + err.read_text()
    assert secrets and not [s for s in secrets if s in shown]
    assert DEFAULT_API_KEY not in shown
    # The temporary server went with it (its process group empties).
    deadline = time.monotonic() + 5
    with pytest.raises(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.1)

    with EmulatorServer() as fast:  # the same command, on a Versori that answers at once
        again = subprocess.run(
            command,
            env={**env, "VERSORI_BASE_URL": fast.base_url},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert again.returncode == 0, again.stdout + again.stderr
    assert delivered(db_url) == TENANTS
