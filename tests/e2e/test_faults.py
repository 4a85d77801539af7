"""Fault injection, end to end: `onboard run` as real processes against faults a reliability
review found, each test reproducing one of them.

1. Two batches of one profile at once, each on a Prefect temporary server of its own (so that
   nothing in Prefect is shared: only the ledger's claims keep them apart), on one PostgreSQL
   ledger: no admin is mailed twice, no tenant is initialised twice.
2. The ledger's PostgreSQL connections killed three times mid-batch (pg_terminate_backend, on
   the test's own database only): no tenant fails for it, no SQL reaches the output or the
   ledger, nobody is mailed twice.
3. A Versori that sends its headers and then stalls, for one tenant: that tenant is called at
   most twice (one retry after a timeout), its time is bounded (ONBOARD_TENANT_DEADLINE_SECONDS),
   the others are delivered.
4. A 404 for one tenant fails that tenant alone (`not_found`); three in a row, from distinct
   tenants, stop the batch (the rest `not_attempted`, the stop said once).

Faults are played by the in-process emulator (demo.emulator) behind `Faults`, an
ASGI middleware of this file: it answers a tenant's initialise call with a scripted 401, 403,
404, 429, 503 or a stall (headers, one byte of body, then nothing until the client hangs up),
and counts every call and every 200 per tenant. It does not need the emulator's own script
actions or /_emulator/stats.

PostgreSQL: each test that needs it gets a database of its own (`pg_database`, created on the
server of ONBOARD_TEST_PG_URL, dropped with FORCE on the way out), so that killing "every other
backend of this database" touches no other test's connections. Skipped where PostgreSQL does
not answer, naming the URL.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from demo.emulator import DEFAULT_API_KEY, EmulatorConfig, EmulatorServer
from demo.processes import PROJECT, base_env, child, free_port, wait_for_http
from demo.versori_rules import error_response
from tests.smtp_server import SmtpTestServer

pytestmark = pytest.mark.e2e

ONBOARD = str(Path(sys.executable).parent / "onboard")
PREFECT = str(Path(sys.executable).parent / "prefect")
PROFILE = PROJECT / "examples" / "profile.yaml"
EMAIL_FROM = "onboarding@saas.example.com"
PG_URL = os.environ.get("ONBOARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# SQL, or the database layer's names, in what an operator reads: a leak of the statement (and
# of its parameters, links among them) through an error message.
# (The statements' keywords in capitals only: "could not update" is prose.)
SQL_TEXT = re.compile(r"(?i:sqlalchemy|psycopg)|\b(?:SELECT|UPDATE|INSERT|DELETE)\b")


# -- the roster, the profile, the environment ---------------------------------------------------


def tenant_ids(count: int) -> list[str]:
    return [f"t{i:04d}" for i in range(1, count + 1)]


def address_of(tenant_id: str) -> str:
    return f"admin@{tenant_id}.example.com"


def host_of(tenant_id: str) -> str:
    """The first label of the tenant's authorize URL's host (the profile's {subdomain})."""
    return f"co-{tenant_id}"


def pattern_of(tenant_id: str) -> str:
    """A substring of this tenant's authorize URL and of no other tenant's."""
    return f"//{host_of(tenant_id)}."


def write_roster(path: Path, count: int) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tenant_id", "name", "admin_email", "subdomain"])
        for tid in tenant_ids(count):
            w.writerow([tid, f"Company {tid}", address_of(tid), host_of(tid)])
    return path


def write_profile(path: Path, name: str) -> Path:
    """examples/profile.yaml under a name of its own, so each test's runs are told apart on the
    session's Prefect server."""
    path.write_text(PROFILE.read_text().replace("name: zendesk-demo", f"name: {name}", 1))
    return path


def run_env(
    tmp: Path, versori: str, db_url: str, smtp: SmtpTestServer | None = None
) -> dict[str, str]:
    env = base_env(tmp)
    env.update(VERSORI_BASE_URL=versori, VERSORI_API_KEY=DEFAULT_API_KEY, ONBOARD_DB_URL=db_url)
    if smtp is not None:
        env.update(
            ONBOARD_SMTP_HOST=smtp.host,
            ONBOARD_SMTP_PORT=str(smtp.port),
            ONBOARD_SMTP_SECURITY="none",
            ONBOARD_EMAIL_FROM=EMAIL_FROM,
        )
    return env


def temporary_server_home(env: dict[str, str], home: Path, migrated_prefect_db: Path) -> None:
    """Point `env` at a Prefect home of its own whose temporary server finds its database
    migrated (as on any run but a machine's first): 10 s of migrations saved per run."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_prefect_db, home / "prefect.db")
    env["PREFECT_HOME"] = str(home)
    env.pop("PREFECT_API_URL", None)


def onboard_args(roster: Path, profile: Path, *extra: str) -> list[str]:
    return [ONBOARD, "run", "--roster", str(roster), "--profile", str(profile), *extra]


def wait_for(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> int:
    try:
        return int(proc.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        pytest.fail(f"`onboard run` did not end within {timeout:g} s:\n{tail(log)}")


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:]


def run_to_end(
    args: list[str], env: dict[str, str], log: Path, timeout: float = 150
) -> tuple[int, float]:
    """`onboard run` to its end: its exit code and how long it took (s)."""
    started = time.monotonic()
    with child(args, env, log) as proc:
        code = wait_for(proc, log, timeout)
    return code, time.monotonic() - started


# -- the ledger, read with plain SQL (whatever the product's Ledger class becomes) --------------


@dataclass(frozen=True)
class Row:
    tenant_id: str
    status: str
    error_code: str
    error_message: str
    attempts: int


def ledger_rows(db_url: str) -> dict[str, Row]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT tenant_id, status, error_code, error_message, attempts "
                    "FROM onboarding_records"
                )
            ).fetchall()
    finally:
        engine.dispose()
    return {
        r[0]: Row(str(r[0]), str(r[1]), str(r[2] or ""), str(r[3] or ""), int(r[4] or 0))
        for r in rows
    }


def superseded_by_tenant(db_url: str) -> Counter[str]:
    """How many states each tenant was given before its current one (a tenant initialised
    twice leaves the first state here)."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT tenant_id FROM onboarding_superseded_links")).all()
    finally:
        engine.dispose()
    return Counter(str(r[0]) for r in rows)


def statuses(rows: dict[str, Row]) -> Counter[str]:
    return Counter(r.status for r in rows.values())


# -- PostgreSQL: a database of the test's own -----------------------------------------------------


def _conninfo(database: str) -> str:
    """A libpq URL (psycopg) for `database` on the server of ONBOARD_TEST_PG_URL."""
    url = make_url(PG_URL).set(drivername="postgresql", database=database)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def pg_database() -> Iterator[tuple[str, str]]:
    """A new, empty database on the PostgreSQL of ONBOARD_TEST_PG_URL, dropped (FORCE) on the
    way out. Yields (ledger URL for ONBOARD_DB_URL, libpq URL for psycopg)."""
    admin = _conninfo(make_url(PG_URL).database or "postgres")
    name = f"onboard_faults_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as err:
        shown = make_url(PG_URL).render_as_string(hide_password=True)
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        pytest.skip(f"PostgreSQL at {shown} (ONBOARD_TEST_PG_URL) does not answer: {why}")
    ledger_url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield ledger_url, _conninfo(name)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- Versori with faults --------------------------------------------------------------------------

# Scripted answers, as Versori gives them: (status, code, message, headers).
_ERRORS: dict[str, tuple[int, str, str, dict[str, str] | None]] = {
    "401": (401, "unauthenticated", "the API key is not valid", None),
    "403": (403, "permission_denied", "the API key may not use this credential", None),
    "404": (404, "not_found", "credential not found", None),
    "429": (429, "rate_limited", "too many requests", {"Retry-After": "1"}),
    "503": (503, "unavailable", "the service is temporarily unavailable", None),
}
ACTIONS = frozenset({"ok", "stall", *_ERRORS})


@dataclass
class Faults:
    """What `FaultsMiddleware` plays and counts, shared with the test's thread.

    `script` maps a substring of a request's `authorizeUrl?additionalParams` to actions, each
    used once in turn, then the call goes through; an action ending in `*` repeats for ever.
    Actions: ok, 401, 403, 404, 429 (Retry-After: 1), 503, stall (200 and its headers, one
    byte of body, then nothing until the client hangs up or `stall_seconds` pass)."""

    script: dict[str, list[str]] = field(default_factory=dict)
    stall_seconds: float = 120.0
    calls: Counter[str] = field(default_factory=Counter)  # by tenant id, every call
    answered_200: Counter[str] = field(default_factory=Counter)  # links issued, by tenant id
    call_times: dict[str, list[float]] = field(default_factory=dict)  # monotonic, at arrival
    _progress: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for pattern, actions in self.script.items():
            unknown = [a for a in actions if a.removesuffix("*") not in ACTIONS]
            assert not unknown, f"script[{pattern!r}]: unknown actions {unknown}"

    def arrived(self, tenant: str, probe: str) -> str:
        """Count the call; the action it gets."""
        with self._lock:
            self.calls[tenant] += 1
            self.call_times.setdefault(tenant, []).append(time.monotonic())
            for pattern, actions in self.script.items():
                if pattern not in probe:
                    continue
                index = self._progress.get(pattern, 0)
                if index >= len(actions):
                    return "ok"
                action = actions[index]
                if action.endswith("*"):
                    return action[:-1]
                self._progress[pattern] = index + 1
                return action
            return "ok"

    def issued(self, tenant: str) -> None:
        with self._lock:
            self.answered_200[tenant] += 1

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        with self._lock:
            return Counter(self.calls), Counter(self.answered_200)


class FaultsMiddleware:
    """In front of the emulator's app: plays `faults` for initialise calls, counts them."""

    def __init__(self, app: ASGIApp, faults: Faults) -> None:
        self.app = app
        self.faults = faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope["path"]).endswith("/oauth2/initialise"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        tenant, probe = "", ""
        try:
            body = json.loads(raw)
            probe = f"{body['authorizeUrl']}?{body.get('additionalParams') or ''}"
            host = urlsplit(body["authorizeUrl"]).hostname or ""
            tenant = host.split(".")[0].removeprefix("co-")
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # the emulator answers a bad body itself
        action = self.faults.arrived(tenant, probe) if tenant else "ok"
        if action in _ERRORS:
            status, code, text_, headers = _ERRORS[action]
            reply = error_response(
                status, code, text_, details="injected by test_faults", headers=headers
            )
            await reply(scope, receive, send)
            return
        if action == "stall":
            await self._stall(receive, send)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                self.faults.issued(tenant)
            await send(message)

        await self.app(scope, replay, watch)

    async def _stall(self, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"4096")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})

        async def hung_up() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        with suppress(TimeoutError):
            await asyncio.wait_for(hung_up(), self.faults.stall_seconds)


@contextmanager
def faulty_versori(faults: Faults, latency_ms: float = 50) -> Iterator[str]:
    """The emulator (in this process, on a free port) behind `faults`. Yields its base URL."""
    server = EmulatorServer(EmulatorConfig(latency_ms=latency_ms))
    server.app.add_middleware(FaultsMiddleware, faults=faults)
    with server:
        yield server.base_url


def mail_by_recipient(smtp: SmtpTestServer) -> Counter[str]:
    return Counter(rcpt.lower() for m in list(smtp.messages) for rcpt in m.rcpt_tos)


def wait_for_quiet(smtp: SmtpTestServer, still: float = 0.5, timeout: float = 10.0) -> None:
    """Until the SMTP server has taken no message for `still` seconds."""
    deadline = time.monotonic() + timeout
    seen, since = len(smtp.messages), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if len(smtp.messages) != seen:
            seen, since = len(smtp.messages), time.monotonic()
        elif time.monotonic() - since >= still:
            return


# -- 1. two runs at once ---------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.timeout(240)
def test_two_runs_at_once_never_mail_twice(
    tmp_path: Path, pg_database: tuple[str, str], migrated_prefect_db: Path
) -> None:
    count = int(os.environ.get("FAULTS_TENANTS", "300"))  # FAULTS_TENANTS=1500: the review's size
    db_url, _ = pg_database
    roster = write_roster(tmp_path / "tenants.csv", count)
    profile = write_profile(tmp_path / "profile.yaml", f"faults-twice-{uuid.uuid4().hex[:6]}")
    args = onboard_args(roster, profile, "--deliver", "email")
    faults = Faults()
    with faulty_versori(faults, latency_ms=50) as versori, SmtpTestServer(tls="none") as smtp:
        env = run_env(tmp_path, versori, db_url, smtp)
        env_a, env_b = dict(env), dict(env)
        temporary_server_home(env_a, tmp_path / "home-a", migrated_prefect_db)
        temporary_server_home(env_b, tmp_path / "home-b", migrated_prefect_db)
        log_a, log_b = tmp_path / "run-a.log", tmp_path / "run-b.log"
        started = time.monotonic()
        with child(args, env_a, log_a) as run_a, child(args, env_b, log_b) as run_b:
            code_a = wait_for(run_a, log_a, 180)
            code_b = wait_for(run_b, log_b, 180)
        seconds = time.monotonic() - started
        # Both runs have exited: each had the 250 for every message it sent, and the SMTP
        # server records a message before it replies, so there is nothing still to arrive.
        mail = mail_by_recipient(smtp)
        calls, issued = faults.snapshot()

    rows = ledger_rows(db_url)
    superseded = superseded_by_tenant(db_url)
    tids = tenant_ids(count)
    twice_mailed = sorted(t for t in tids if mail[address_of(t)] > 1)
    never_mailed = sorted(t for t in tids if mail[address_of(t)] == 0)
    twice_issued = sorted(t for t in tids if issued[t] > 1)
    not_delivered = {t: rows[t].status if t in rows else None for t in tids}
    not_delivered = {t: s for t, s in not_delivered.items() if s != "delivered"}
    print(
        f"two runs at once, {seconds:.1f} s: exits {code_a}/{code_b}; "
        f"{len(smtp.messages)} messages for {count} admins, {len(twice_mailed)} admins mailed "
        f"more than once ({sum(mail.values()) - count + len(never_mailed)} extra messages), "
        f"{len(never_mailed)} never; {sum(issued.values())} links issued, "
        f"{len(twice_issued)} tenants initialised more than once; "
        f"{sum(superseded.values())} superseded states in the ledger; "
        f"ledger {dict(statuses(rows))}; {sum(calls.values())} calls"
    )
    assert not twice_mailed, f"{len(twice_mailed)} admins mailed twice: {twice_mailed[:10]}"
    assert not twice_issued, f"{len(twice_issued)} tenants initialised twice: {twice_issued[:10]}"
    assert not superseded, f"states superseded: {dict(superseded.most_common(10))}"
    assert not never_mailed, f"{len(never_mailed)} admins never mailed: {never_mailed[:10]}"
    assert not not_delivered, f"not delivered: {dict(list(not_delivered.items())[:10])}"
    assert (code_a, code_b) == (0, 0), tail(log_a) + "\n----\n" + tail(log_b)


# -- 2. dropped ledger connections ----------------------------------------------------------------


def terminate_other_backends(conn: psycopg.Connection[Any]) -> int:
    """Kill every other connection to this connection's database (and to no other): how many."""
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchall()
    return sum(1 for (killed,) in rows if killed)


def finished_tenants(conn: psycopg.Connection[Any]) -> int:
    """Tenants delivered or failed so far (0 before the ledger's table exists)."""
    try:
        row = conn.execute(
            "SELECT count(*) FROM onboarding_records WHERE status IN ('delivered', 'failed')"
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0


@pytest.mark.postgres
@pytest.mark.timeout(240)
def test_dropped_ledger_connections_fail_no_tenant(
    tmp_path: Path, pg_database: tuple[str, str], prefect_api: str
) -> None:
    count = int(os.environ.get("FAULTS_TENANTS", "300"))  # FAULTS_TENANTS=1500: the review's size
    db_url, conninfo = pg_database
    roster = write_roster(tmp_path / "tenants.csv", count)
    profile = write_profile(tmp_path / "profile.yaml", f"faults-dropped-{uuid.uuid4().hex[:6]}")
    # 4 at a time, so the batch lasts long enough (300 x 50 ms / 4 ~ 4 s of calls, and the
    # mail) for three kills at 15 %, 40 % and 70 % of it.
    args = onboard_args(roster, profile, "--deliver", "email", "--concurrency", "4")
    kill_at = [int(count * share) for share in (0.15, 0.40, 0.70)]
    killed: list[tuple[int, int]] = []  # (tenants finished when killed, backends killed)
    faults = Faults()
    log = tmp_path / "run.log"
    with faulty_versori(faults, latency_ms=50) as versori, SmtpTestServer(tls="none") as smtp:
        env = run_env(tmp_path, versori, db_url, smtp)
        env["PREFECT_API_URL"] = prefect_api
        started = time.monotonic()
        with (
            psycopg.connect(conninfo, autocommit=True) as admin,
            child(args, env, log) as proc,
        ):
            while kill_at and proc.poll() is None:
                if time.monotonic() - started > 150:
                    pytest.fail(f"the batch did not get through within 150 s:\n{tail(log)}")
                done = finished_tenants(admin)
                if done >= kill_at[0]:
                    killed.append((done, terminate_other_backends(admin)))
                    kill_at.pop(0)
                time.sleep(0.02)
            code = wait_for(proc, log, 150)
        seconds = time.monotonic() - started
        wait_for_quiet(smtp)
        mail = mail_by_recipient(smtp)

    output = log.read_text(errors="replace")
    rows = ledger_rows(db_url)
    tids = tenant_ids(count)
    failed = {t: (r.error_code, r.error_message) for t, r in rows.items() if r.status == "failed"}
    internal = sorted(t for t, r in rows.items() if r.error_code == "internal_error")
    sql_in_ledger = sorted(t for t, r in rows.items() if SQL_TEXT.search(r.error_message))
    sql_in_output = sorted({m.group(0) for m in SQL_TEXT.finditer(output)})
    twice = sorted(t for t in tids if mail[address_of(t)] > 1)
    never = sorted(t for t in tids if mail[address_of(t)] == 0)
    print(
        f"dropped connections, {seconds:.1f} s: exit {code}; kills (finished, backends) "
        f"{killed}; ledger {dict(statuses(rows))}, {len(rows)} rows; failed by code "
        f"{dict(Counter(c for c, _ in failed.values()))}; {len(internal)} internal_error; "
        f"SQL in {len(sql_in_ledger)} error messages, in the output {sql_in_output}; "
        f"{len(twice)} admins mailed twice, {len(never)} never"
    )
    assert len(killed) == 3, f"the run ended before three kills: {killed}\n{tail(log)}"
    assert all(n > 0 for _, n in killed), f"a kill found no ledger connection: {killed}"
    assert not failed, f"{len(failed)} failed: {dict(list(failed.items())[:5])}"
    assert not internal, f"internal_error for {internal[:10]}"
    assert not sql_in_ledger, f"SQL in error_message of {sql_in_ledger[:10]}"
    assert not sql_in_output, f"SQL in the output: {sql_in_output}\n{tail(log)}"
    assert "internal_error" not in output, tail(log)
    assert not twice, f"{len(twice)} admins mailed twice: {twice[:10]}"
    assert not never, f"{len(never)} admins never mailed: {never[:10]}"
    assert sorted(rows) == tids and statuses(rows) == {"delivered": count}, statuses(rows)
    assert code == 0, tail(log)


# -- 3. a stalling Versori ---------------------------------------------------------------------

READ_TIMEOUT = 2.0
TENANT_DEADLINE = 8.0


@pytest.mark.timeout(180)
def test_a_stalling_versori_is_bounded(tmp_path: Path, prefect_api: str) -> None:
    count = 20
    stalled = "t0007"
    roster = write_roster(tmp_path / "tenants.csv", count)
    profile = write_profile(tmp_path / "profile.yaml", f"faults-stall-{uuid.uuid4().hex[:6]}")
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    faults = Faults(script={pattern_of(stalled): ["stall*"]})
    log = tmp_path / "run.log"
    with faulty_versori(faults, latency_ms=50) as versori:
        env = run_env(tmp_path, versori, db_url)
        env.update(
            PREFECT_API_URL=prefect_api,
            VERSORI_READ_TIMEOUT=f"{READ_TIMEOUT:g}",
            ONBOARD_TENANT_DEADLINE_SECONDS=f"{TENANT_DEADLINE:g}",
        )
        code, seconds = run_to_end(onboard_args(roster, profile), env, log, timeout=150)
        calls, issued = faults.snapshot()
        times = list(faults.call_times.get(stalled, []))

    rows = ledger_rows(db_url)
    span = times[-1] - times[0] if times else 0.0
    others = {t: rows[t].status if t in rows else None for t in tenant_ids(count) if t != stalled}
    not_delivered = {t: s for t, s in others.items() if s != "delivered"}
    row = rows.get(stalled)
    print(
        f"stalling Versori: exit {code} after {seconds:.1f} s; {stalled} called "
        f"{calls[stalled]} times over {span:.1f} s (first to last call), ledger "
        f"{row.status if row else None}/{row.error_code if row else None} with "
        f"{row.attempts if row else None} attempts; others {dict(Counter(others.values()))}"
    )
    assert calls[stalled] <= 2, f"{stalled} called {calls[stalled]} times (at most 2)"
    # No new try starts after the tenant's deadline.
    assert span <= TENANT_DEADLINE, f"{stalled}'s calls spread over {span:.1f} s"
    assert seconds < 30, f"the run took {seconds:.1f} s"
    assert row is not None and row.status == "failed", row
    assert "timeout" in row.error_code or "deadline" in row.error_code, row
    assert not not_delivered, not_delivered
    assert all(calls[t] == 1 and issued[t] == 1 for t in others), calls
    assert code == 1, tail(log)


# -- 4. 404s: one tenant's, then three in a row ---------------------------------------------


@pytest.mark.timeout(180)
def test_a_tenant_specific_404_fails_that_tenant_alone(tmp_path: Path, prefect_api: str) -> None:
    count = 30
    missing, unavailable, limited = "t0007", "t0012", "t0020"
    roster = write_roster(tmp_path / "tenants.csv", count)
    profile = write_profile(tmp_path / "profile.yaml", f"faults-404-{uuid.uuid4().hex[:6]}")
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    faults = Faults(
        script={
            pattern_of(missing): ["404*"],
            pattern_of(unavailable): ["503"],
            pattern_of(limited): ["429"],
        }
    )
    log = tmp_path / "run.log"
    with faulty_versori(faults, latency_ms=50) as versori:
        env = run_env(tmp_path, versori, db_url)
        env["PREFECT_API_URL"] = prefect_api
        code, seconds = run_to_end(onboard_args(roster, profile), env, log, timeout=150)
        calls, _ = faults.snapshot()

    rows = ledger_rows(db_url)
    by_code = Counter(r.error_code for r in rows.values() if r.status == "failed")
    print(
        f"one tenant's 404: exit {code} after {seconds:.1f} s; ledger {dict(statuses(rows))}, "
        f"failed by code {dict(by_code)}; calls {missing}={calls[missing]} "
        f"{unavailable}={calls[unavailable]} {limited}={calls[limited]}, "
        f"{sum(1 for t in tenant_ids(count) if calls[t] == 0)} tenants never called"
    )
    failed = {t: r.error_code for t, r in rows.items() if r.status == "failed"}
    assert failed == {missing: "not_found"}, failed
    assert calls[missing] == 1, f"a 404 is not retried: {calls[missing]} calls"
    for tid in (unavailable, limited):
        assert rows[tid].status == "delivered" and calls[tid] == 2, (rows[tid], calls[tid])
    others = [t for t in tenant_ids(count) if t not in (missing, unavailable, limited)]
    assert all(rows[t].status == "delivered" and calls[t] == 1 for t in others), calls
    assert code == 1, tail(log)


@pytest.mark.timeout(180)
def test_three_404s_in_a_row_stop_the_batch(tmp_path: Path, prefect_api: str) -> None:
    count = 12
    missing = ["t0005", "t0006", "t0007"]
    roster = write_roster(tmp_path / "tenants.csv", count)
    profile = write_profile(tmp_path / "profile.yaml", f"faults-stop-{uuid.uuid4().hex[:6]}")
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    faults = Faults(script={pattern_of(t): ["404*"] for t in missing})
    log = tmp_path / "run.log"
    # One tenant at a time, in roster order: "in a row" is then the roster's order.
    args = onboard_args(roster, profile, "--concurrency", "1", "--tenants-per-task", "1")
    with faulty_versori(faults, latency_ms=50) as versori:
        env = run_env(tmp_path, versori, db_url)
        env["PREFECT_API_URL"] = prefect_api
        code, seconds = run_to_end(args, env, log, timeout=150)
        calls, _ = faults.snapshot()

    rows = ledger_rows(db_url)
    output = log.read_text(errors="replace")
    # Said once, at the end of `onboard run`'s output (its console leaves out the flow's own
    # log line of it: tests/unit/test_first_hour.py).
    said = len(re.findall(r"The batch stopped: Versori does not know connector", output))
    by_tenant = {t: (rows[t].status, rows[t].error_code) if t in rows else None for t in rows}
    print(
        f"three 404s in a row: exit {code} after {seconds:.1f} s; ledger "
        f"{dict(sorted(by_tenant.items()))}; calls {dict(sorted(calls.items()))}; "
        f"the stop said {said} times"
    )
    tids = tenant_ids(count)
    before, after = tids[:4], tids[7:]
    assert all(rows[t].status == "delivered" for t in before), by_tenant
    assert {t: by_tenant[t] for t in missing} == {t: ("failed", "not_found") for t in missing}
    assert all(calls[t] == 1 for t in missing), calls
    assert {t: by_tenant.get(t) for t in after} == {t: ("failed", "not_attempted") for t in after}
    assert not any(calls[t] for t in after), f"called after the stop: {calls}"
    assert said == 1, f"the stop said {said} times:\n{tail(log)}"
    assert code == 1, tail(log)


# -- 5. the Prefect server restarted mid-batch ----------------------------------------------


def delivered_so_far(db_url: str) -> int:
    """Tenants delivered so far (0 before the run has made the ledger's tables)."""
    try:
        return statuses(ledger_rows(db_url))["delivered"]
    except Exception:  # no table yet
        return 0


@pytest.mark.timeout(300)
def test_a_prefect_server_restart_mid_batch_holds_nothing_for_the_next_batch(
    tmp_path: Path, migrated_prefect_db: Path
) -> None:
    """The server killed (-9) mid-batch and started again: the batch goes on, and the next
    batch of the same profile starts at once and finishes the roster. (Once, a Prefect slot
    `onboarding-ledger-<profile>` stayed held after such a restart, and the next batch waited
    6.5 minutes; batches now share a roster through the ledger's claims, which nothing in
    Prefect holds.)"""
    count = 40
    roster = write_roster(tmp_path / "tenants.csv", count)
    profile = write_profile(tmp_path / "profile.yaml", f"faults-restart-{uuid.uuid4().hex[:6]}")
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "server-home"
    home.mkdir()
    shutil.copyfile(migrated_prefect_db, home / "prefect.db")
    server_env = dict(base_env(tmp_path), PREFECT_HOME=str(home))
    server_args = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    args = onboard_args(roster, profile, "--concurrency", "2")
    faults = Faults()
    with faulty_versori(faults, latency_ms=300) as versori:
        env = dict(run_env(tmp_path, versori, db_url), PREFECT_API_URL=api)
        with child(server_args, server_env, tmp_path / "server-1.log") as server:
            wait_for_http(f"{api}/health", timeout=120, proc=server)
            with child(args, env, tmp_path / "first.log") as first:
                deadline = time.monotonic() + 60
                while delivered_so_far(db_url) < 5:
                    assert time.monotonic() < deadline, tail(tmp_path / "first.log")
                    time.sleep(0.2)
                os.killpg(server.pid, 9)
                server.wait()
                # Started again at once: the API stays down while the new server starts (5 s
                # and more here) and the batch stalls on it meanwhile, which is the outage.
                with child(server_args, server_env, tmp_path / "server-2.log") as again:
                    wait_for_http(f"{api}/health", timeout=120, proc=again)
                    wait_for(first, tmp_path / "first.log", 150)
                    code, seconds = run_to_end(args, env, tmp_path / "next.log", timeout=150)
        _, issued = faults.snapshot()
    rows = ledger_rows(db_url)
    print(f"server restart: the next batch exited {code} in {seconds:.1f} s")
    assert seconds < 75, f"the next batch took {seconds:.1f} s"
    assert code == 0, tail(tmp_path / "next.log")
    assert statuses(rows) == {"delivered": count}, statuses(rows)
    assert all(issued[t] == 1 for t in tenant_ids(count)), issued
