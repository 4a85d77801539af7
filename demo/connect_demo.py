"""`onboard demo`'s last act: one admin connects end to end through a durable link. The
connect service runs on uvicorn in a thread beside the demo's emulator and SMTP server; the
admin's email carries the link (`<service>/c/<token>`); the click goes through the link page,
its button, the emulated provider's consent page (Allow) and the callback, which calls
CreateConnection, records the tenant `connected` and activates it on the profile's environment
(`activated`). Then a second admin connects the same way, Versori reports its credential
broken, `onboard sync` finds it, a reconnect email goes out, and its click updates the same
connection in place: activated again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from connect_service.app import create_app
from connect_service.service import ConnectService, versori_clients
from demo.connect_click import click_through, deliver_connect_link, write_connect_profile
from demo.emulator_config import DEMO_ENVIRONMENT
from demo.local import DemoStage
from demo.processes import free_port
from onboarding.inputs.brand import brand_from_settings
from onboarding.inputs.profile import ConnectorProfile, load_profile
from onboarding.inputs.roster import load_roster
from onboarding.ledger import Ledger, funnel_lines
from onboarding.mail import MailSender, MailTemplates
from onboarding.settings import load_settings
from onboarding.sync.versori_sync import sync
from onboarding.versori.client import VersoriClient


class ThreadedServer:
    """An ASGI app on uvicorn in a daemon thread, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="connect-demo", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the demo's connect service did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def connect_one(
    stage: DemoStage, roster: Path, emulator_url: str, tenant_id: str, broken_id: str
) -> list[str]:
    """Email `tenant_id` of `roster` a durable link to the demo's Platform API v2 system
    (a profile written to the demo folder), click it through; the same for `broken_id`, whose
    credential then breaks and is reconnected in place; and say how it went: lines to print,
    ending with each connector's funnel."""
    settings = load_settings()  # the demo's environment, read once here
    ledger = Ledger(stage.ledger_url)
    service = ConnectService(
        ledger,
        client_for=versori_clients(settings.versori),
        brand=brand_from_settings(settings.brand, settings.sender),
        secure_cookies=False,
    )
    try:
        with ThreadedServer(create_app(service)) as server:
            path = write_connect_profile(
                stage.ledger.parent / "profile-connect.yaml",
                emulator_url,
                f"{server.base_url}/callback",
                environment_id=DEMO_ENVIRONMENT.environment_id,
            )
            profile = load_profile(path)
            tenants = {
                t.tenant_id: t
                for t in load_roster(str(roster), [profile])
                if t.tenant_id in (tenant_id, broken_id)
            }
            tenant = tenants[tenant_id]
            mailer = MailSender.from_settings(settings.smtp)
            templates = MailTemplates(None, brand=settings.brand.values())
            with VersoriClient.from_settings(settings.versori, api=profile.api) as client:

                def send(who: str, reconnect: str = "") -> str:
                    return deliver_connect_link(
                        ledger, profile, path, tenants[who], client, server.base_url,
                        mailer=mailer, templates=templates, reconnect=reconnect,
                    )  # fmt: skip

                click = click_through(send(tenant_id))
                click_through(send(broken_id))
                lines = [
                    f"Emailed {tenant.tenant_id} a durable link ({server.base_url}/c/…), then "
                    f"clicked it: link page, button, provider consent (Allow), callback: "
                    f"{click.title!r}.",
                    _said(ledger, tenant_id, profile.target_id, profile.name),
                ]
                lines += _break_and_reconnect(
                    ledger,
                    profile,
                    client,
                    emulator_url,
                    broken_id,
                    lambda: send(broken_id, "broken"),
                )
            mailer.close()
        lines.append(
            "Funnel per connector (linked → delivered → opened → started → connected → activated):"
        )
        names = {r.connector_id: r.profile for r in ledger.iter_records()}
        for connector_id, funnel in ledger.funnel().items():
            lines.append(f"  {names.get(connector_id, connector_id)}: {funnel_lines(funnel)}")
        return lines
    finally:
        ledger.close()


def _said(ledger: Ledger, tenant_id: str, connector_id: str, name: str) -> str:
    record = ledger.get(tenant_id, connector_id)
    status = record.status.value if record is not None else "missing"
    connection = record.connection_id if record is not None else None
    return f"Ledger: {tenant_id} on {name} is {status} (Versori connection {connection})."


def _break_and_reconnect(
    ledger: Ledger,
    profile: ConnectorProfile,
    client: VersoriClient,
    emulator_url: str,
    tenant_id: str,
    reconnect_email: Callable[[], str],
) -> list[str]:
    """`tenant_id`'s credential revoked at the provider (the emulator's hook), found by sync,
    a reconnect email sent and clicked: the same connection, working and activated again."""
    before = ledger.get(tenant_id, profile.target_id)
    if before is None or before.connection_id is None:
        return [f"{tenant_id} did not connect: nothing to break."]
    httpx.post(
        f"{emulator_url}/_emulator/connections/{before.connection_id}/credential",
        json={"errors": ["invalid_grant: the admin revoked access at the provider"]},
        timeout=10,
    ).raise_for_status()
    found = sync(ledger, [profile], lambda _p: client)
    broken = [c for c in found.changes if c.tenant_id == tenant_id]
    said = broken[0].after.value if broken else "unchanged"
    click = click_through(reconnect_email())
    after = ledger.get(tenant_id, profile.target_id)
    same = after is not None and after.connection_id == before.connection_id
    return [
        f"Then {tenant_id} connected too, and its provider revoked the access: `onboard sync` "
        f"found it {said}; a reconnect email went out; its click: {click.title!r}.",
        _said(ledger, tenant_id, profile.target_id, profile.name)
        + (" The same connection, updated in place." if same else ""),
    ]
