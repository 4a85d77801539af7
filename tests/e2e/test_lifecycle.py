"""Know who is live, keep them live, with real processes: `onboard run`, `onboard sync` and
`onboard remind` as the operator runs them (subprocesses on the session's Prefect server),
`onboard connect-server` as a process, the Versori emulator on a real socket (in a thread of
this process: a real HTTP server), a real SMTP server whose emails are read for their links,
and ledgers on SQLite and PostgreSQL.

1. A connection made elsewhere (in Versori's own UI) for a tenant emailed a link it never
   clicked: sync records it `connected` with its id, or `activated` when the profile names an
   environment (and the activation is in Versori).
2. A tenant onboarded by email through the connect service, activated; its credential breaks:
   sync says `broken`, remind sends a reconnect email, its click updates the SAME connection
   in place, and the tenant is activated again.
3. A connection deleted out of band: sync says `disconnected`, remind's reconnect email, its
   click makes a NEW connection, and the activation holds it.
4. A two-system campaign (CRM and Slack on one environment), on PostgreSQL: connected to the
   first only, no activation; to the second, exactly one activation, made once (a sync after
   makes no ActivateUser call).

The emulator, the SMTP server and each ledger's connect-server serve every test of the module;
each test has tenants of its own (ids with a random suffix), so none needs the emulator reset
(a reset would also drop connections the module's ledgers still hold). Scenario 1 has a ledger
of its own: a sync reads every tenant of the profile's system in the ledger, and its profile
without an environment would take the others' activations for none."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from demo.connect_click import click_through, write_connect_profile
from demo.emulator import DEFAULT_API_KEY, EmulatorServer
from demo.emulator_config import DEMO_CRM, DEMO_SYSTEM
from demo.emulator_oauth import CONSENT_PATH
from demo.processes import base_env, child, free_port, wait_for_http
from onboarding.inputs.profile import load_profile
from onboarding.ledger import Ledger, Record, Status
from tests.conftest import PG_URL
from tests.platform_stage import (
    AUTH,
    CRM,
    ENV,
    ORG,
    SLACK,
    SLACK_TEMPLATE,
    TEMPLATE,
    TWO_ENV,
    two_systems,
)
from tests.smtp_server import SmtpTestServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ONBOARD = str(Path(sys.executable).parent / "onboard")
EMAIL_FROM = "onboarding@example.com"
TWO_ENV_CRM_TEMPLATE = "01M8F12B95S4BX0QFB3TPDWZ1J"  # the CRM's template in TWO_ENV
DURABLE_LINK = re.compile(r"http://127\.0\.0\.1:\d+/c/[A-Za-z0-9_-]+")
POST_ACTIVATIONS = "POST /o/{organisation_id}/activations"
T = TypeVar("T")


@dataclass
class Versori:
    """The emulator of the module, and what a test asks it."""

    url: str

    def get(self, path: str, **params: str) -> Any:
        answer = httpx.get(f"{self.url}/o/{ORG}{path}", params=params, headers=AUTH, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def hook(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        answer = httpx.request(method, f"{self.url}/_emulator{path}", json=body, timeout=10)
        assert answer.status_code < 300, answer.text
        return answer

    def activations(self, environment: str, tenant: str) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = self.get(f"/environments/{environment}/activations")
        return [a for a in listed if a["user"]["externalId"] == tenant]

    def connections(self, tenant: str, system: str = CRM) -> list[dict[str, Any]]:
        """The tenant's connections in `system`, as Versori lists them (ListConnections)."""
        users = self.get("/users", search=tenant)["users"]
        [user] = [u for u in users if u["externalId"] == tenant]
        found: list[dict[str, Any]] = self.get(
            "/connections", end_user_id=user["id"], system_id=system, first="100"
        )["items"]
        return found

    def activation_posts(self) -> int:
        calls: dict[str, int] = self.hook("GET", "/calls").json()["calls"]
        return calls.get(POST_ACTIVATIONS, 0)


@dataclass
class Site:
    """A ledger and the connect-server process on it, and the environment an `onboard` command
    needs to use them (the emulator, the SMTP server, the session's Prefect server)."""

    tmp: Path
    db_url: str
    ledger: Ledger
    env: dict[str, str]
    smtp: SmtpTestServer
    versori: Versori
    base: str  # ONBOARD_CONNECT_BASE_URL, "" when emails carry raw authorize URLs

    def onboard(self, *args: str) -> str:
        """An `onboard` command as a process: its stdout, once it exited 0."""
        done = subprocess.run(
            [ONBOARD, *args],
            env=self.env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"onboard {args[0]}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def roster(self, *tenants: str) -> Path:
        path = self.tmp / f"roster-{tenants[0]}.csv"
        rows = [f"{t},Company {t},{address(t)}" for t in tenants]
        path.write_text("tenant_id,name,admin_email\n" + "\n".join(rows) + "\n")
        return path

    def record(self, tenant: str, connector: str = CRM) -> Record:
        found = self.ledger.get(tenant, connector)
        assert found is not None, f"no record of {tenant}"
        return found

    def emails(self, tenant: str, count: int) -> list[EmailMessage]:
        """The tenant's emails, in order, once there are `count` of them."""
        to = address(tenant)

        def mine() -> list[EmailMessage] | None:
            found = [m.message() for m in list(self.smtp.messages) if to in m.rcpt_tos]
            return found if len(found) >= count else None

        found = eventually(mine, f"{count} email(s) to {to}")
        assert len(found) == count, [str(m["Subject"]) for m in found]
        return found


def address(tenant: str) -> str:
    return f"admin@{tenant}.example.com"


def tenant_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """`probe()` once it is not None, polled until a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s")
        time.sleep(0.05)


def plain(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


def durable_links(message: EmailMessage) -> dict[str, str]:
    """The email's durable links, by the connector's display name above each ("1. Acme
    CRM:" in a campaign's email; the one link of a single-connector email under "")."""
    links: dict[str, str] = {}
    heading = ""
    for line in plain(message).splitlines():
        named = re.match(r"\d+\. (.+?)(?: \(.*\))?:$", line)
        if named:
            heading = named.group(1)
        found = DURABLE_LINK.fullmatch(line.strip())
        if found:
            links[heading] = found.group(0)
    return links


def connect(link: str, tenant: str, display_name: str) -> None:
    """An admin's click through the link: its page, its button, Allow, the callback."""
    click = click_through(link)
    assert click.status == 200, click
    assert click.title == f"Company {tenant} is connected to {display_name}", click


def write_profile(
    site: Site,
    name: str,
    display_name: str,
    *,
    system: str,
    credential: str,
    client_id: str,
    template: str,
    environment: str | None,
) -> Path:
    """A v2 profile of the emulator's `system` whose links the site's connect service finishes
    (without one, emails carry raw authorize URLs to the emulator's consent page)."""
    path = site.tmp / f"{name}.yaml"
    lines = [
        f"name: {name}",
        f"display_name: {display_name}",
        "api: platform-v2",
        f"organisation_id: {ORG}",
        f"system_id: {system}",
        f"credential_id: {credential}",
        f"client_id: {client_id}",
        f"authorize_url: {site.versori.url}{CONSENT_PATH}",
        f"redirect_url: {site.base or 'https://app.example.com'}/callback",
        "scopes: [read]",
        f"connection_template_id: {template}",
        'connection_name: "{name} ({tenant_id})"',
    ]
    if environment is not None:
        lines.append(f"environment_id: {environment}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- the module's services ------------------------------------------------------------------


@pytest.fixture(scope="module")
def versori() -> Iterator[Versori]:
    """The emulator with the demo's environment (the CRM alone) and TWO_ENV (CRM and Slack)."""
    with EmulatorServer(two_systems()) as server:
        yield Versori(server.base_url)


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpTestServer]:
    with SmtpTestServer() as server:
        yield server


def _env(
    tmp: Path, versori: Versori, smtp: SmtpTestServer, db_url: str, api: str
) -> dict[str, str]:
    env = base_env(tmp)
    env.update(
        VERSORI_BASE_URL=versori.url,
        VERSORI_API_KEY=DEFAULT_API_KEY,
        ONBOARD_DB_URL=db_url,
        ONBOARD_SMTP_HOST=smtp.host,
        ONBOARD_SMTP_PORT=str(smtp.port),
        ONBOARD_SMTP_SECURITY="none",
        ONBOARD_EMAIL_FROM=EMAIL_FROM,
        PREFECT_API_URL=api,
        COLUMNS="200",
    )
    return env


@pytest.fixture
def plain_site(
    tmp_path: Path, versori: Versori, smtp: SmtpTestServer, prefect_api: str
) -> Iterator[Site]:
    """A SQLite ledger of the test's own and no connect service: emails carry raw authorize
    URLs. (Its own, because a sync reads every tenant of the profile's system in the ledger.)"""
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(db_url) as ledger:
        env = _env(tmp_path, versori, smtp, db_url, prefect_api)
        yield Site(tmp_path, db_url, ledger, env, smtp, versori, "")


@contextmanager
def _served(
    tmp: Path, db_url: str, versori: Versori, smtp: SmtpTestServer, api: str
) -> Iterator[Site]:
    """The ledger at `db_url` (made here) and `onboard connect-server` on it, a process."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = _env(tmp, versori, smtp, db_url, api)
    env["ONBOARD_CONNECT_BASE_URL"] = base
    log = tmp / "connect-server.log"
    with Ledger(db_url) as ledger:
        with child([ONBOARD, "connect-server", "--port", str(port)], env, log) as server:
            wait_for_http(f"{base}/healthz", proc=server, found=True)
            yield Site(tmp, db_url, ledger, env, smtp, versori, base)
        served = log.read_text(encoding="utf-8", errors="replace")
        assert "Traceback" not in served, served
        assert DEFAULT_API_KEY not in served


@pytest.fixture(scope="module")
def sqlite_site(
    tmp_path_factory: pytest.TempPathFactory, versori: Versori, smtp: SmtpTestServer,
    prefect_api: str,
) -> Iterator[Site]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("lifecycle-sqlite")
    with _served(tmp, f"sqlite:///{tmp / 'ledger.db'}", versori, smtp, prefect_api) as site:
        yield site


@pytest.fixture(scope="module")
def postgres_site(
    tmp_path_factory: pytest.TempPathFactory, versori: Versori, smtp: SmtpTestServer,
    prefect_api: str,
) -> Iterator[Site]:  # fmt: skip
    """The same on a schema of its own in PostgreSQL (skipped, as conftest's, if it does not
    answer)."""
    tmp = tmp_path_factory.mktemp("lifecycle-postgres")
    admin = create_engine(PG_URL, connect_args={"connect_timeout": 3})
    schema = f"t_{uuid.uuid4().hex}"
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except SQLAlchemyError as err:
        admin.dispose()
        why = str(getattr(err, "orig", None) or err).splitlines()[0]
        pytest.skip(f"PostgreSQL (ONBOARD_TEST_PG_URL) does not answer: {why}")
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        with _served(
            tmp, url.render_as_string(hide_password=False), versori, smtp, prefect_api
        ) as site:
            yield site
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# --- the scenarios ------------------------------------------------------------------------------


def test_connections_made_elsewhere_are_found_by_sync(plain_site: Site) -> None:
    """Two tenants emailed links (a campaign: the CRM, whose profile names the environment,
    and Slack, whose profile names none) who never clicked them, each connected in Versori's
    own UI to one system: sync records the Slack one `connected` with its id, the CRM one
    `activated` (the activation made in Versori); the links they did not use stay as they
    were."""
    site = plain_site
    crm = write_profile(
        site, "lifecycle-elsewhere-crm", "Acme CRM", system=CRM,
        credential=DEMO_CRM.credential_id, client_id=DEMO_CRM.client_id, template=TEMPLATE,
        environment=ENV,
    )  # fmt: skip
    slack = write_profile(
        site, "lifecycle-elsewhere-slack", "Acme Slack", system=SLACK,
        credential=DEMO_SYSTEM.credential_id, client_id=DEMO_SYSTEM.client_id,
        template=SLACK_TEMPLATE, environment=None,
    )  # fmt: skip
    profiles = ("--profile", str(crm), "--profile", str(slack))
    in_crm, in_slack = tenant_id("elsewhere-crm"), tenant_id("elsewhere-slack")
    roster = str(site.roster(in_crm, in_slack))
    site.onboard("run", "--roster", roster, *profiles, "--deliver", "email")
    for tenant in (in_crm, in_slack):
        [invitation] = site.emails(tenant, 1)
        assert plain(invitation).count("/provider/authorize?") == 2, "raw authorize URLs"
        assert site.record(tenant).status is Status.DELIVERED

    def elsewhere(tenant: str, system: str, template: str) -> str:
        body = {"externalId": tenant, "systemId": system, "connectionTemplateId": template}
        made: str = site.versori.hook("POST", "/connections", body).json()["connection"]["id"]
        return made

    crm_made = elsewhere(in_crm, CRM, TEMPLATE)
    slack_made = elsewhere(in_slack, SLACK, SLACK_TEMPLATE)
    out = site.onboard("sync", *profiles)

    connected = site.record(in_slack, SLACK)
    assert (connected.status, connected.connection_id) == (Status.CONNECTED, slack_made)
    assert connected.activation_id is None, "a profile without an environment activates nothing"
    activated = site.record(in_crm)
    assert (activated.status, activated.connection_id) == (Status.ACTIVATED, crm_made), out
    [activation] = site.versori.activations(ENV, in_crm)
    assert activation["id"] == activated.activation_id
    assert [c["id"] for c in activation["connections"]] == [crm_made]
    assert site.versori.activations(ENV, in_slack) == []
    assert site.record(in_crm, SLACK).status is Status.DELIVERED, "never connected there"
    assert site.record(in_slack).status is Status.DELIVERED
    lines = out.splitlines()
    assert "2 tenant(s); changed: connected 1; activated 1; " in lines[0], out
    assert "2 tenant(s); changed: connected 1; " in lines[1] and "activated" not in lines[1]
    assert "Activated 1 tenant(s), 0 refused" in out, out


def _onboarded(site: Site, name: str, prefix: str) -> tuple[str, Path, str]:
    """A tenant emailed a durable link by `onboard run`, clicked through: activated on ENV.
    (tenant, profile, connection id)."""
    tenant = tenant_id(prefix)
    profile = write_connect_profile(
        site.tmp / f"{name}.yaml", site.versori.url, f"{site.base}/callback",
        name=name, environment_id=ENV,
    )  # fmt: skip
    out = site.onboard(
        "run", "--roster", str(site.roster(tenant)), "--profile", str(profile), "--deliver", "email"
    )
    assert "1 delivered" in out, out
    [invitation] = site.emails(tenant, 1)
    [link] = durable_links(invitation).values()
    assert link.startswith(f"{site.base}/c/")
    connect(link, tenant, load_profile(profile).display_name)
    record = site.record(tenant)
    assert record.status is Status.ACTIVATED, "the environment's one system: activated at once"
    assert record.connection_id is not None
    [activation] = site.versori.activations(ENV, tenant)
    assert [c["id"] for c in activation["connections"]] == [record.connection_id]
    return tenant, profile, record.connection_id


def _reconnect_email(site: Site, tenant: str, profile: Path, count: int) -> str:
    """`onboard remind` emails the tenant a reconnect link: the link."""
    out = site.onboard("remind", "--profile", str(profile), "--after-hours", "0")
    reconnect = site.emails(tenant, count)[-1]
    assert "stopped working" in str(reconnect["Subject"]), reconnect["Subject"]
    [link] = durable_links(reconnect).values()
    assert tenant in out, out
    return link


def test_a_broken_credential_is_reconnected_in_place(sqlite_site: Site) -> None:
    site = sqlite_site
    tenant, profile, first = _onboarded(site, "lifecycle-broken", "broken")

    site.versori.hook(
        "POST", f"/connections/{first}/credential", {"errors": ["invalid_grant: revoked"]}
    )
    out = site.onboard("sync", "--profile", str(profile))
    assert "broken 1" in out, out
    record = site.record(tenant)
    assert (record.status, record.connection_id) == (Status.BROKEN, first)
    assert record.reconnect_of == "broken" and "revoked" in (record.error_message or "")

    link = _reconnect_email(site, tenant, profile, 2)
    assert "no longer accepts its sign-in" in " ".join(plain(site.emails(tenant, 2)[-1]).split())
    assert site.record(tenant).status is Status.BROKEN, "broken until the reconnect works"
    connect(link, tenant, load_profile(profile).display_name)

    again = site.record(tenant)
    assert again.connection_id == first, "the same connection, updated in place"
    assert again.status is Status.ACTIVATED and again.reconnect_of is None
    connection = site.versori.get(f"/connections/{first}")
    assert connection["credentials"][0]["credential"]["errors"] == []
    assert [c["id"] for c in site.versori.connections(tenant)] == [first], "one connection"
    [activation] = site.versori.activations(ENV, tenant)
    assert [c["id"] for c in activation["connections"]] == [first]
    assert activation["id"] == again.activation_id


def test_a_deleted_connection_is_made_anew(sqlite_site: Site) -> None:
    site = sqlite_site
    tenant, profile, first = _onboarded(site, "lifecycle-gone", "gone")

    site.versori.hook("DELETE", f"/connections/{first}")
    out = site.onboard("sync", "--profile", str(profile))
    assert "disconnected 1" in out, out
    record = site.record(tenant)
    assert (record.status, record.connection_id) == (Status.DISCONNECTED, None)
    assert record.reconnect_of == "disconnected"

    link = _reconnect_email(site, tenant, profile, 2)
    connect(link, tenant, load_profile(profile).display_name)

    again = site.record(tenant)
    assert again.connection_id not in (None, first), "a new connection"
    assert again.status is Status.ACTIVATED
    assert [c["id"] for c in site.versori.connections(tenant)] == [again.connection_id]
    [activation] = site.versori.activations(ENV, tenant)
    assert [c["id"] for c in activation["connections"]] == [again.connection_id]
    assert activation["id"] == again.activation_id


def test_a_two_system_campaign_is_activated_once(postgres_site: Site) -> None:
    site = postgres_site
    tenant = tenant_id("campaign")
    crm = write_profile(
        site, "lifecycle-two-crm", "Two CRM", system=CRM, credential=DEMO_CRM.credential_id,
        client_id=DEMO_CRM.client_id, template=TWO_ENV_CRM_TEMPLATE, environment=TWO_ENV,
    )  # fmt: skip
    slack = write_profile(
        site, "lifecycle-two-slack", "Two Slack", system=SLACK,
        credential=DEMO_SYSTEM.credential_id, client_id=DEMO_SYSTEM.client_id,
        template=SLACK_TEMPLATE, environment=TWO_ENV,
    )  # fmt: skip
    profiles = ("--profile", str(crm), "--profile", str(slack))
    roster = str(site.roster(tenant))
    site.onboard("run", "--roster", roster, *profiles, "--deliver", "email")
    [invitation] = site.emails(tenant, 1)
    links = durable_links(invitation)
    assert set(links) == {"Two CRM", "Two Slack"}, plain(invitation)
    posts = site.versori.activation_posts()

    connect(links["Two CRM"], tenant, "Two CRM")
    assert site.record(tenant).status is Status.CONNECTED
    assert site.record(tenant, SLACK).status is Status.DELIVERED
    assert site.versori.activations(TWO_ENV, tenant) == [], "Slack is not connected yet"
    site.onboard("sync", *profiles)
    assert site.record(tenant).status is Status.CONNECTED
    assert site.versori.activation_posts() == posts, "no activation asked for"

    connect(links["Two Slack"], tenant, "Two Slack")
    crm_record, slack_record = site.record(tenant), site.record(tenant, SLACK)
    assert crm_record.status is Status.ACTIVATED and slack_record.status is Status.ACTIVATED
    [activation] = site.versori.activations(TWO_ENV, tenant)
    assert crm_record.activation_id == slack_record.activation_id == activation["id"]
    held = {crm_record.connection_id, slack_record.connection_id}
    assert {c["id"] for c in activation["connections"]} == held and None not in held
    assert site.versori.activation_posts() == posts + 1, "one ActivateUser call"

    out = site.onboard("sync", *profiles)
    assert site.versori.activation_posts() == posts + 1, "sync made no second activation"
    assert len(site.versori.activations(TWO_ENV, tenant)) == 1
    assert site.record(tenant).activation_id == activation["id"]
    assert "Activated 0 tenant(s), 0 refused" in out, out
