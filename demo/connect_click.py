"""An admin's click through a durable connect link, played with httpx: the link page (GET),
its button (POST), the emulated provider's consent page (Allow or Deny) and the callback, as
a browser would follow them. For `onboard demo`, the benchmark and tests; the browser tests
(tests/e2e/test_connect_browser.py) do the same in Chromium.

Also the profile such a click needs: a Platform API v2 profile whose authorize URL is the
emulator's consent page and whose redirect_url is the service's /callback."""

from __future__ import annotations

import re
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from demo.emulator_config import DEMO_CRM
from demo.emulator_oauth import CONSENT_PATH

if TYPE_CHECKING:
    from onboarding.inputs.profile import ConnectorProfile
    from onboarding.inputs.roster import Tenant
    from onboarding.ledger import Ledger
    from onboarding.mail import MailSender, MailTemplates
    from onboarding.versori.client import VersoriClient

# Any ULID stands for the connection template: the emulator checks only its form.
DEMO_TEMPLATE_ID = "01M8F12B95S4BX0QFB3TPDWZ0V"
CSRF_PATTERN = re.compile(r'name="csrf" value="([^"]+)"')
_TITLE = re.compile(r"<h1>(.*?)</h1>", re.S)


def write_connect_profile(
    path: Path,
    emulator_url: str,
    callback_url: str,
    *,
    name: str = "acme-crm",
    success_url: str | None = None,
    connect_link_days: float = 30,
    environment_id: str | None = None,
) -> Path:
    """A v2 profile for the emulator's DEMO_CRM that the connect service completes."""
    lines = [
        f"name: {name}",
        "api: platform-v2",
        f"organisation_id: {DEMO_CRM.organisation_id}",
        f"system_id: {DEMO_CRM.connector_id}",
        f"credential_id: {DEMO_CRM.credential_id}",
        f"client_id: {DEMO_CRM.client_id}",
        f"authorize_url: {emulator_url.rstrip('/')}{CONSENT_PATH}",
        f"redirect_url: {callback_url}",
        "scopes: [read]",
        "prompt: consent",
        "additional_params:",
        '  login_hint: "{admin_email}"',
        "link_ttl_hours: 72",
        f"connect_link_days: {connect_link_days}",
        f"connection_template_id: {DEMO_TEMPLATE_ID}",
        'connection_name: "{name} ({tenant_id})"',
    ]
    if success_url:
        lines.append(f"success_url: {success_url}")
    if environment_id:
        lines.append(f"environment_id: {environment_id}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class Click:
    """How a click ended: the last page's status and title, and each hop's status."""

    status: int
    title: str
    hops: tuple[int, ...]
    url: str


def title_of(html: str) -> str:
    found = _TITLE.search(html)
    return unescape(found.group(1)).strip() if found else ""


def click_through(link: str, *, allow: bool = True, client: httpx.Client | None = None) -> Click:
    """Open `link`, press its button, answer the consent page, follow back to the callback."""
    own = client is None
    http = client or httpx.Client(timeout=30)
    hops: list[int] = []
    try:
        page = http.get(link)
        hops.append(page.status_code)
        found = CSRF_PATTERN.search(page.text)
        if page.status_code != 200 or found is None:
            return Click(page.status_code, title_of(page.text), tuple(hops), str(page.url))
        pressed = http.post(link, data={"csrf": unescape(found.group(1))}, follow_redirects=False)
        hops.append(pressed.status_code)
        if pressed.status_code != 303:
            return Click(pressed.status_code, title_of(pressed.text), tuple(hops), link)
        authorize = pressed.headers["location"]
        consent = http.get(authorize)
        hops.append(consent.status_code)
        state = httpx.URL(authorize).params["state"]
        client_id = httpx.URL(authorize).params["client_id"]
        answered = http.post(
            httpx.URL(authorize).copy_with(query=None),
            data={"state": state, "client_id": client_id, "decision": "allow" if allow else "deny"},
            follow_redirects=False,
        )
        hops.append(answered.status_code)
        back = http.get(answered.headers["location"], follow_redirects=False)
        hops.append(back.status_code)
        if back.status_code == 303:  # a success_url
            return Click(303, "", tuple(hops), back.headers["location"])
        return Click(back.status_code, title_of(back.text), tuple(hops), str(back.url))
    finally:
        if own:
            http.close()


def deliver_connect_link(
    ledger: Ledger,
    profile: ConnectorProfile,
    profile_path: Path,
    tenant: Tenant,
    client: VersoriClient,
    base_url: str,
    *,
    mailer: MailSender | None = None,
    templates: MailTemplates | None = None,
    reconnect: str = "",
) -> str:
    """What a batch does for one tenant once ONBOARD_CONNECT_BASE_URL is set: a checked link
    from Versori recorded (a state, as today), then a durable connect link issued and, with a
    mailer, emailed in place of the raw authorize URL. Returns the durable link."""
    from datetime import timedelta

    from onboarding.clock import utcnow
    from onboarding.connections.durable_links import connect_url, issue_connect_link
    from onboarding.versori.authorize_url import check_link

    request = profile.render(tenant.values)
    url = client.initialise(profile.organisation_id, profile.target_id, request)
    checked = check_link(
        url, request, redirect_uri=profile.redirect_uri, redirect_host=profile.redirect_host
    )
    now = utcnow()
    ledger.record_link(
        tenant_id=tenant.tenant_id,
        connector_id=profile.target_id,
        profile=profile.name,
        tenant_name=tenant.name,
        admin_email=tenant.admin_email,
        url=checked.url,
        state=checked.state,
        created_at=now,
        expires_at=now + timedelta(hours=profile.link_ttl_hours),
        tenant_fields=tenant.fields,
    )
    link = connect_url(
        base_url, issue_connect_link(ledger, tenant.tenant_id, profile, profile_path)
    )
    if mailer is not None and templates is not None:
        from onboarding.mail import MailLink, build_message

        expires = now + timedelta(days=profile.connect_link_days)
        message = build_message(
            tenant=tenant,
            links=[
                MailLink(
                    profile.name,
                    profile.target_id,
                    link,
                    checked.state,
                    expires,
                    display_name=profile.display_name,
                    access=tuple(profile.access),
                    brand=profile.brand,
                    reconnect=reconnect,
                )
            ],
            email_from=mailer.email_from,
            templates=templates,
        )
        mailer.send(message)
        channel = "email"
    else:
        channel = "store"
    ledger.mark_delivered(tenant.tenant_id, profile.target_id, channel=channel)
    return link
