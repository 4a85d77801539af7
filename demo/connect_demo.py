"""`onboard demo`'s last act: one admin connects end to end through a durable link. The
connect service runs on uvicorn in a thread beside the demo's emulator and SMTP server; the
admin's email carries the link (`<service>/c/<token>`); the click goes through the link page,
its button, the emulated provider's consent page (Allow) and the callback, which calls
CreateConnection and records the tenant `connected`."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from connect_service.app import create_app
from connect_service.service import ConnectService, versori_clients
from demo.connect_click import click_through, deliver_connect_link, write_connect_profile
from demo.local import DemoStage
from demo.processes import free_port
from onboarding.inputs.brand import brand_from_settings
from onboarding.inputs.profile import load_profile
from onboarding.inputs.roster import load_roster
from onboarding.ledger import Ledger, funnel_lines
from onboarding.mail import MailSender, MailTemplates
from onboarding.settings import load_settings
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


def connect_one(stage: DemoStage, roster: Path, emulator_url: str, tenant_id: str) -> list[str]:
    """Email `tenant_id` of `roster` a durable link to the demo's Platform API v2 system
    (a profile written to the demo folder), click it through, and say how it went: lines to
    print, ending with each connector's funnel."""
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
            )
            profile = load_profile(path)
            tenant = next(
                t for t in load_roster(str(roster), [profile]) if t.tenant_id == tenant_id
            )
            mailer = MailSender.from_settings(settings.smtp)
            templates = MailTemplates(None, brand=settings.brand.values())
            with VersoriClient.from_settings(settings.versori, api=profile.api) as client:
                link = deliver_connect_link(
                    ledger, profile, path, tenant, client, server.base_url,
                    mailer=mailer, templates=templates,
                )  # fmt: skip
            mailer.close()
            click = click_through(link)
        record = ledger.get(tenant.tenant_id, profile.target_id)
        status = record.status.value if record is not None else "missing"
        connection = record.connection_id if record is not None else None
        lines = [
            f"Emailed {tenant.tenant_id} a durable link ({server.base_url}/c/…), then clicked "
            f"it: link page, button, provider consent (Allow), callback: {click.title!r}.",
            f"Ledger: {tenant.tenant_id} on {profile.name} is {status} (Versori connection "
            f"{connection}).",
            "Funnel per connector (linked → delivered → opened → started → connected):",
        ]
        names = {r.connector_id: r.profile for r in ledger.iter_records()}
        for connector_id, funnel in ledger.funnel().items():
            lines.append(f"  {names.get(connector_id, connector_id)}: {funnel_lines(funnel)}")
        return lines
    finally:
        ledger.close()
