"""`onboard connect-server` as an operator runs it, a real process: its log lines (time, level,
logger, request id; text and JSON), the X-Request-ID of every answer and the reference on an
error page, the access line's masking (no token, state or code in the log), SIGTERM with a
request in flight (answered, then exit 0; past --grace-seconds, the app's page, not a
plain-text 500), a client sending its headers slowly (closed after --header-timeout),
oversized headers, and an empty VERSORI_API_KEY (exit 2).

Versori is the emulator in this process, behind a middleware that holds its initialise calls
when a test says so: the button's POST is then a request in flight for as long as wanted."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo.connect_click import CSRF_PATTERN, deliver_connect_link, write_connect_profile
from demo.emulator import DEFAULT_API_KEY, EmulatorConfig, EmulatorServer
from demo.processes import base_env, child, free_port, wait_for_http
from onboarding.inputs.profile import load_profile
from onboarding.inputs.roster import Tenant
from onboarding.ledger import Ledger
from onboarding.versori.client import VersoriClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ONBOARD = str(Path(sys.executable).parent / "onboard")
LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ "
    r"\[[^\]\s]+\] .+"
)
HEX_ID = re.compile(r"[0-9a-f]{32}")
STATE = "STATEsecret0123456789"
CODE = "CODEsecret0123456789"


@dataclass
class Hold:
    """How long the emulator holds each initialise call, and a sign that one arrived."""

    seconds: float = 0.0
    arrived: threading.Event = field(default_factory=threading.Event)


class HoldInitialise:
    def __init__(self, app: Any, hold: Hold) -> None:
        self.app = app
        self.hold = hold

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/initialise"):
            self.hold.arrived.set()
            if self.hold.seconds:
                await asyncio.sleep(self.hold.seconds)
        await self.app(scope, receive, send)


@dataclass
class Site:
    tmp: Path
    env: dict[str, str]
    base: str  # ONBOARD_CONNECT_BASE_URL: every server here says it, whatever its port
    hold: Hold
    seed: Callable[[str], str]  # tenant id -> its durable link's token


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for_line(self, *parts: str, timeout: float = 5.0) -> str:
        """The first log line holding every one of `parts` (the access line is written just
        after its answer went out)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.text().splitlines():
                if all(p in line for p in parts):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {parts}:\n{self.text()}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("connect-process")
    hold = Hold()
    emulator = EmulatorServer(EmulatorConfig())
    emulator.app.add_middleware(HoldInitialise, hold=hold)
    base = f"http://127.0.0.1:{free_port()}"
    with emulator:
        profile_path = write_connect_profile(
            tmp / "acme.yaml", emulator.base_url, f"{base}/callback"
        )
        profile = load_profile(profile_path)
        ledger_url = f"sqlite:///{tmp / 'ledger.db'}"
        ledger = Ledger(ledger_url)
        client = VersoriClient(
            api="platform-v2", api_key=DEFAULT_API_KEY, base_url=emulator.base_url
        )
        env = base_env(tmp)
        env.update(
            VERSORI_BASE_URL=emulator.base_url,
            VERSORI_API_KEY=DEFAULT_API_KEY,
            ONBOARD_DB_URL=ledger_url,
            ONBOARD_CONNECT_BASE_URL=base,
        )

        def seed(tenant_id: str) -> str:
            tenant = Tenant(tenant_id=tenant_id, name=tenant_id, admin_email=f"{tenant_id}@x.com")
            link = deliver_connect_link(ledger, profile, profile_path, tenant, client, base)
            return link.rsplit("/", 1)[1]

        try:
            yield Site(tmp, env, base, hold, seed)
        finally:
            client.close()
            ledger.close()


@contextmanager
def connect_server(site: Site, name: str, *args: str) -> Iterator[Running]:
    port = free_port()
    log = site.tmp / f"{name}.log"
    command = [ONBOARD, "connect-server", "--port", str(port), *args]
    with child(command, site.env, log) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", proc=proc, found=True)
        yield Running(proc, url, log)


@pytest.fixture(scope="module")
def server(site: Site) -> Iterator[Running]:
    """Text lines, and a 1 s header timeout."""
    with connect_server(site, "text", "--header-timeout", "1") as running:
        yield running


def _press(url: str, token: str, request_id: str) -> httpx.Response:
    """The link page, then its button (the POST that calls Versori's initialise)."""
    with httpx.Client(timeout=30) as http:
        page = http.get(f"{url}/c/{token}")
        found = CSRF_PATTERN.search(page.text)
        assert page.status_code == 200 and found, page.text
        return http.post(
            f"{url}/c/{token}",
            data={"csrf": unescape(found.group(1))},
            headers={"X-Request-ID": request_id},
            follow_redirects=False,
        )


def _no_secrets(log: str, *secrets_: str) -> None:
    for secret in (*secrets_, STATE, CODE, DEFAULT_API_KEY):
        assert secret not in log, f"{secret[:4]}… reached the log"


def test_lines_request_ids_and_a_masked_access_log(site: Site, server: Running) -> None:
    token = site.seed("t-log")
    unknown = secrets.token_urlsafe(32)  # 43 characters, as a real token
    with httpx.Client(timeout=10) as http:
        given = http.get(f"{server.url}/c/{unknown}?x", headers={"X-Request-ID": "case-0001"})
        page = http.get(f"{server.url}/c/{token}?x")
        refused = http.get(f"{server.url}/callback?state={STATE}&code={CODE}")
        missing = http.get(f"{server.url}/no/such/page", headers={"X-Request-ID": "bad id <"})
        health = http.get(f"{server.url}/healthz")
    # The id: the client's when it is safe, else a new one; on every answer.
    assert given.status_code == 404 and given.headers["x-request-id"] == "case-0001"
    assert "Reference: case-0001</p>" in given.text
    assert page.status_code == 200 and HEX_ID.fullmatch(page.headers["x-request-id"])
    assert "Reference" not in page.text
    for error in (refused, missing):
        assert error.status_code in (400, 404)
        rid = error.headers["x-request-id"]
        assert HEX_ID.fullmatch(rid) and f"Reference: {rid}</p>" in error.text
    assert HEX_ID.fullmatch(health.headers["x-request-id"])

    # The access lines: masked, each with its request's id.
    line = server.wait_for_line("[case-0001]", "connect_service.access")
    assert f'"GET /c/{unknown[:4]}…?x" 404 ' in line and line.endswith(" ms")
    line = server.wait_for_line(f"[{page.headers['x-request-id']}]", "access")
    assert f'"GET /c/{token[:4]}…?x" 200 ' in line
    line = server.wait_for_line(f"[{refused.headers['x-request-id']}]", "access")
    assert f'"GET /callback?state={STATE[:4]}…&code={CODE[:4]}…" 400 ' in line
    server.wait_for_line(f"[{missing.headers['x-request-id']}]", '"GET /no/such/page" 404 ')
    server.wait_for_line(f"[{health.headers['x-request-id']}]", '"GET /healthz" 200 ')

    # A line the service logs on its worker thread carries the request's id too.
    pressed = _press(server.url, token, "case-0002")
    assert pressed.status_code == 303 and pressed.headers["x-request-id"] == "case-0002"
    server.wait_for_line("[case-0002]", "connect_service.service", "new state")
    server.wait_for_line("[case-0002]", f'"POST /c/{token[:4]}…" 303 ')

    log = server.text()
    for line in log.splitlines():
        assert LINE.fullmatch(line), line
    assert " INFO uvicorn.error [-] Uvicorn running on " in log
    _no_secrets(log, token, unknown, token[4:12])


def test_a_client_slow_with_its_headers_is_closed(site: Site, server: Running) -> None:
    host, port = httpx.URL(server.url).host, httpx.URL(server.url).port
    assert port is not None
    # Half a request line, then nothing.
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HT")
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed, no answer
        assert 0.8 < time.monotonic() - started < 3.0
    # A byte every 0.2 s: bytes arriving do not put the limit off.
    with socket.create_connection((host, port), timeout=10) as sock:
        started = time.monotonic()
        sock.settimeout(0.2)
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 50:
            try:
                sock.sendall(bytes([byte]))
                closed = sock.recv(1024) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
            if closed:
                break
        assert closed and time.monotonic() - started < 3.0
    server.wait_for_line("no complete request headers within 1 s")

    # Headers of more than 16 KiB, sent at once: refused.
    with socket.create_connection((host, port), timeout=10) as sock:
        big = b"X-Big: " + b"a" * 20_000 + b"\r\n"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 431 ")
    server.wait_for_line("request line and headers over 16384 bytes")
    # A body that large is not a header: the app answers (its own form limit, 403).
    with socket.create_connection((host, port), timeout=10) as sock:
        body = b"csrf=" + b"a" * 20_000
        head = b"POST /c/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % (
            secrets.token_urlsafe(32).encode(),
            len(body),
        )
        sock.sendall(head + b"Content-Type: application/x-www-form-urlencoded\r\n\r\n" + body)
        assert sock.recv(1024).startswith(b"HTTP/1.1 403 ")

    # A request whose answer takes longer than the header timeout is answered all the same.
    token = site.seed("t-slow-answer")
    site.hold.seconds = 1.6
    try:
        pressed = _press(server.url, token, "case-0003")
    finally:
        site.hold.seconds = 0
    assert pressed.status_code == 303


def test_json_lines_from_every_worker(site: Site) -> None:
    """--workers 2: the workers are processes of their own, started by uvicorn, and log
    alike (Config.log_config, applied in each)."""
    unknown = secrets.token_urlsafe(32)
    args = ("--log-format", "json", "--workers", "2")
    with connect_server(site, "json", *args) as running:
        missing = httpx.get(f"{running.url}/c/{unknown}?x", headers={"X-Request-ID": "case-json"})
        assert missing.headers["x-request-id"] == "case-json"
        running.wait_for_line('"request_id": "case-json"')
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(timeout=15) == 0
    records = [json.loads(line) for line in running.text().splitlines()]
    for record in records:
        assert {"time", "level", "logger", "message", "request_id"} <= set(record), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    access = [r for r in records if r["request_id"] == "case-json"]
    assert [r["logger"] for r in access] == ["connect_service.access"]
    assert access[0]["level"] == "INFO" and access[0]["status"] == 404
    assert access[0]["path"] == f"/c/{unknown[:4]}…?x" and access[0]["method"] == "GET"
    assert sum(r["message"] == "Shutting down" for r in records) == 2  # each worker
    _no_secrets(running.text(), unknown)


def _in_flight(site: Site, running: Running, token: str, hold: float) -> httpx.Response:
    """The button's POST held `hold` s at Versori; SIGTERM once it is in flight."""
    site.hold.arrived.clear()
    site.hold.seconds = hold
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(_press, running.url, token, "case-term")
            assert site.hold.arrived.wait(10), "the POST did not reach Versori"
            running.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                httpx.get(f"{running.url}/healthz", timeout=2)
            return answer.result(timeout=30)
    finally:
        site.hold.seconds = 0


def test_sigterm_answers_the_request_in_flight_then_exits_0(site: Site) -> None:
    token = site.seed("t-term")
    with connect_server(site, "sigterm") as running:
        started = time.monotonic()
        pressed = _in_flight(site, running, token, hold=2.0)
        assert pressed.status_code == 303, pressed.text
        assert pressed.headers["location"].startswith(site.env["VERSORI_BASE_URL"])
        assert pressed.headers["x-request-id"] == "case-term"
        assert running.proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    log = running.text()
    assert "Shutting down" in log and "Traceback" not in log
    running.wait_for_line("[case-term]", f'"POST /c/{token[:4]}…" 303 ')
    _no_secrets(log, token)


def test_sigterm_past_the_grace_answers_with_the_apps_page(site: Site) -> None:
    """--grace-seconds 1 and a request held 2.5 s: uvicorn cancels it, and the answer is the
    app's error page with its reference, not uvicorn's plain-text 500."""
    token = site.seed("t-grace")
    with connect_server(site, "grace", "--grace-seconds", "1") as running:
        pressed = _in_flight(site, running, token, hold=2.5)
        assert pressed.status_code == 500
        assert pressed.headers["content-type"].startswith("text/html")
        assert "Something went wrong" in pressed.text
        assert f"Reference: {pressed.headers['x-request-id']}</p>" in pressed.text
        assert running.proc.wait(timeout=15) == 0
    running.wait_for_line("timeout graceful shutdown exceeded")
    running.wait_for_line("[case-term]", f'"POST /c/{token[:4]}…" 500 ')
    _no_secrets(running.text(), token)


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_api_key_exits_2(site: Site, key: str) -> None:
    env = {**site.env, "VERSORI_API_KEY": key}
    done = subprocess.run(
        [ONBOARD, "connect-server", "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=60, cwd=site.tmp,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "VERSORI_API_KEY" in done.stderr
    assert not os.environ.get("VERSORI_API_KEY") or os.environ["VERSORI_API_KEY"] not in (
        done.stderr
    )
