"""Every connection exactly once, with real processes: `onboard emulator` (strict: one
connection per end user and template, a second answered 409) scripted to fail CreateConnection
after making the connection, `onboard connect-server`, and its ledger on SQLite and on
PostgreSQL (through a TCP proxy the test can cut). Each test clicks through as a browser would
(an httpx client keeping its cookies) and ends with exactly one connection in the emulator for
the tenant and the ledger `connected` with that connection's id.

Faults: CreateConnection answered late (after the service's timeout), its socket dropped, a 5xx
after the connection was made, a 409 for a connection the ledger lost, SIGTERM and SIGKILL of
the service while CreateConnection is in flight, and the ledger's database dropping out."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from demo.connect_click import write_connect_profile
from demo.emulator import DEFAULT_API_KEY
from demo.processes import PROJECT, base_env, child, free_port, wait_for_http
from onboarding.clock import utcnow
from onboarding.connections.durable_links import issue_connect_link
from onboarding.inputs.profile import ConnectorProfile, load_profile
from onboarding.ledger import Ledger, Status
from tests.conftest import PG_URL
from tests.e2e.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ONBOARD = str(Path(sys.executable).parent / "onboard")
STALL = 3.0  # how long a slow_after answer holds back: past the service's timeout below
SCRIPT = (
    "create:slow: [slow_after]\n"
    "create:drop: [drop_after]\n"
    "create:late5xx: [500_after]\n"
    "create:term: [slow_after]\n"
    "create:kill: [slow_after]\n"
    "create:outage: [slow_after]\n"
)
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Server:
    """`onboard connect-server` as a process that a test may stop, kill and start again."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [ONBOARD, "connect-server", "--port", str(self.port)],
                env=self.env,
                cwd=PROJECT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_http(f"{self.base}/healthz", proc=self.proc, found=True)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=15)


@dataclass
class Stack:
    backend: str
    emulator: str
    ledger: Ledger
    profile: ConnectorProfile
    profile_path: Path
    env: dict[str, str]
    tmp: Path
    server: Server
    proxy: TcpProxy | None = None
    used: set[str] = field(default_factory=set)

    def tenant(self, prefix: str) -> tuple[str, str]:
        """A delivered tenant (its id starts with `prefix`, which the emulator's script
        matches) and its connect link's token."""
        tenant_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.ledger.record_link(
            tenant_id=tenant_id,
            connector_id=self.profile.target_id,
            profile=self.profile.name,
            tenant_name=f"Tenant {tenant_id}",
            admin_email=f"{tenant_id}@example.com",
            url=f"https://batch.example/authorize?state=batch-{tenant_id}",
            state=f"batch-{tenant_id}",
            created_at=utcnow(),
            expires_at=utcnow() + timedelta(hours=72),
            tenant_fields={},
        )
        self.ledger.mark_delivered(tenant_id, self.profile.target_id, channel="email")
        return tenant_id, issue_connect_link(
            self.ledger, tenant_id, self.profile, self.profile_path
        )

    def click(self, token: str, base: str | None = None) -> tuple[httpx.Client, str]:
        """The admin's browser (its cookies kept) through the link page, its button and the
        provider's consent: the callback's path and query, not yet followed."""
        browser = httpx.Client(base_url=base or self.server.base, timeout=60)
        page = browser.get(f"/c/{token}")
        found = _CSRF.search(page.text)
        assert found, page.text
        pressed = browser.post(f"/c/{token}", data={"csrf": found.group(1)})
        assert pressed.status_code == 303, pressed.text
        authorize = httpx.URL(pressed.headers["location"])
        consent = httpx.post(
            authorize.copy_with(query=None),
            data={
                "state": authorize.params["state"],
                "client_id": authorize.params["client_id"],
                "decision": "allow",
            },
        )
        assert consent.status_code == 303
        back = httpx.URL(consent.headers["location"])
        return browser, f"/callback?{back.query.decode()}"

    def connections(self, tenant_id: str) -> list[dict[str, Any]]:
        made = httpx.get(f"{self.emulator}/_emulator/connections").json()["connections"]
        return [c for c in made if c.get("external_id") == tenant_id]

    def exactly_once(self, tenant_id: str, wait: float = 0.0) -> str:
        """One connection in Versori for the tenant, and the ledger connected with its id
        (waiting up to `wait` seconds for the sweep to record it)."""
        deadline = time.monotonic() + wait
        while True:
            made = self.connections(tenant_id)
            record = self.ledger.get(tenant_id, self.profile.target_id)
            assert record is not None
            if record.status is Status.CONNECTED or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        assert len(made) == 1, made
        assert (record.status, record.connection_id) == (Status.CONNECTED, made[0]["id"])
        return str(made[0]["id"])


def _server_env(tmp: Path, emulator: str, db_url: str, base: str) -> dict[str, str]:
    env = base_env(tmp)
    env.update(
        VERSORI_BASE_URL=emulator,
        VERSORI_API_KEY=DEFAULT_API_KEY,
        ONBOARD_DB_URL=db_url,
        ONBOARD_CONNECT_BASE_URL=base,
        ONBOARD_CONNECT_CREATE_TIMEOUT_SECONDS="1.5",
        ONBOARD_CONNECT_LOOKUP_TIMEOUT_SECONDS="5",
        ONBOARD_CONNECT_CONNECTING_GRACE_SECONDS="2",
        ONBOARD_CONNECT_SWEEP_SECONDS="1",
    )
    return env


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"connect-faults-{backend}")
    proxy: TcpProxy | None = None
    schema = ""
    if backend == "sqlite":
        direct = served = f"sqlite:///{tmp / 'ledger.db'}"
    else:
        admin = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        schema = f"t_{uuid.uuid4().hex}"
        try:
            with admin.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        except Exception as err:  # skip with the reason, as conftest does
            pytest.skip(f"PostgreSQL does not answer: {type(err).__name__}")
        url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        direct = url.render_as_string(hide_password=False)
        proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
        served = url.set(port=proxy.port).render_as_string(hide_password=False)
    emulator_port, connect_port = free_port(), free_port()
    emulator = f"http://127.0.0.1:{emulator_port}"
    base = f"http://127.0.0.1:{connect_port}"
    profile_path = write_connect_profile(tmp / "acme.yaml", emulator, f"{base}/callback")
    (tmp / "script.yaml").write_text(SCRIPT)
    env = _server_env(tmp, emulator, served, base)
    emulator_cmd = [
        ONBOARD, "emulator", "--port", str(emulator_port),
        "--script", str(tmp / "script.yaml"), "--stall-seconds", str(STALL),
    ]  # fmt: skip
    ledger = Ledger(direct)
    server = Server(env, connect_port, tmp / "connect-server.log")
    try:
        with child(emulator_cmd, env, tmp / "emulator.log") as emu:
            wait_for_http(f"{emulator}/healthz", proc=emu)
            server.start()
            yield Stack(
                backend, emulator, ledger, load_profile(profile_path), profile_path, env, tmp,
                server, proxy,
            )  # fmt: skip
            server.stop()
        log = server.log.read_text()
        assert "Traceback" not in log, log
        assert DEFAULT_API_KEY not in log
    finally:
        server.stop()
        ledger.close()
        if proxy is not None:
            proxy.close()
        if schema:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


@pytest.mark.parametrize("fault", ["slow", "drop", "late5xx"])
def test_a_lost_answer_ends_with_one_connection_recorded(stack: Stack, fault: str) -> None:
    """Versori made the connection, then answered after the service's timeout, dropped the
    socket, or answered 500: the code is not sent again, the lookup finds the connection,
    the admin sees it connected, within the timeout and the lookup."""
    tenant, token = stack.tenant(fault)
    browser, callback = stack.click(token)
    started = time.monotonic()
    page = browser.get(callback)
    waited = time.monotonic() - started
    assert page.status_code == 200 and "is connected" in page.text, page.text
    assert waited < 1.5 + 5 + 2, f"the browser waited {waited:.1f} s"
    connection = stack.exactly_once(tenant)
    assert connection in stack.server.log.read_text(), "the connection's id is in the log"
    again = browser.get(callback)
    assert again.status_code == 200 and "is connected" in again.text, "a reload says connected"
    assert len(stack.connections(tenant)) == 1


def test_a_409_for_a_connection_the_ledger_lost_records_that_connection(stack: Stack) -> None:
    tenant, token = stack.tenant("lost")
    browser, callback = stack.click(token)
    assert browser.get(callback).status_code == 200
    first = stack.exactly_once(tenant)
    stack.ledger.reset(tenant, stack.profile.target_id)  # an operator's reset: the id is gone
    stack.ledger.mark_delivered(tenant, stack.profile.target_id, channel="email")
    token = issue_connect_link(stack.ledger, tenant, stack.profile, stack.profile_path)
    browser, callback = stack.click(token)
    page = browser.get(callback)
    assert page.status_code == 200 and "is connected" in page.text, page.text
    assert stack.exactly_once(tenant) == first


def test_sigterm_while_create_connection_is_in_flight_finishes_the_click(stack: Stack) -> None:
    """SIGTERM mid-callback: the service stops accepting, lets the callback finish (its own
    page, not a plain-text 500), records the connection, and exits."""
    tenant, token = stack.tenant("term")
    browser, callback = stack.click(token)
    answers: list[httpx.Response] = []
    clicking = threading.Thread(target=lambda: answers.append(browser.get(callback)))
    clicking.start()
    time.sleep(0.5)
    stack.server.signal(signal.SIGTERM)
    clicking.join(30)
    assert stack.server.proc is not None
    assert stack.server.proc.wait(30) == 0
    try:
        assert answers and answers[0].status_code == 200, answers
        assert "is connected" in answers[0].text and "<main>" in answers[0].text
        stack.exactly_once(tenant)
    finally:
        stack.server.start()


def test_sigkill_mid_create_connection_is_resolved_by_the_sweep(stack: Stack) -> None:
    """SIGKILL mid-callback (nothing finishes): the claim stays `connecting`; the service, once
    started again, asks Versori and records the connection; the admin's reload says so."""
    tenant, token = stack.tenant("kill")
    browser, callback = stack.click(token)
    clicking = threading.Thread(target=lambda: _swallow(browser.get, callback))
    clicking.start()
    time.sleep(0.5)
    stack.server.signal(signal.SIGKILL)
    clicking.join(30)
    assert stack.server.proc is not None
    stack.server.proc.wait(15)
    time.sleep(STALL)  # Versori finishes making it after the service died
    record = stack.ledger.get(tenant, stack.profile.target_id)
    assert record is not None and record.status is not Status.CONNECTED
    assert stack.ledger.connecting_of(tenant, stack.profile.target_id), "left connecting"
    stack.server.start()
    stack.exactly_once(tenant, wait=15)
    page = browser.get(callback)
    assert page.status_code == 200 and "is connected" in page.text


def test_the_ledger_dropping_out_mid_create_connection_loses_nothing(stack: Stack) -> None:
    """The ledger's database goes away while CreateConnection is in flight: the admin still
    sees the connection Versori made, its id is in the log, and once the database is back the
    sweep records it."""
    if stack.proxy is None:
        pytest.skip("a SQLite ledger is a local file: it cannot drop out from under the service")
    tenant, token = stack.tenant("outage")
    browser, callback = stack.click(token)
    answers: list[httpx.Response] = []
    clicking = threading.Thread(target=lambda: answers.append(browser.get(callback)))
    clicking.start()
    time.sleep(0.5)
    stack.proxy.cut()
    try:
        clicking.join(60)
        assert answers and answers[0].status_code == 200 and "is connected" in answers[0].text
        made = stack.connections(tenant)
        assert len(made) == 1
        assert "could not record it" in stack.server.log.read_text()
        assert made[0]["id"] in stack.server.log.read_text()
        record = stack.ledger.get(tenant, stack.profile.target_id)
        assert record is not None and record.status is not Status.CONNECTED
    finally:
        stack.proxy.restore()
    stack.exactly_once(tenant, wait=20)


def _swallow(call: Any, *args: Any) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the service was killed mid-answer
        call(*args)
