"""`onboard automations install` on the session's real Prefect server (tests/conftest.py): the
notification block and the deployment resolved to their ids, the automations created once and
then updated in place by name, and each one acting on tenant events sent to that server: a
webhook (a listener on 127.0.0.1 that records what it is sent) gets the notifications, and the
deployment gets a flow run per connected tenant with its ids as parameters.

The events are the project's own (onboarding/batch/tenant_events.py: names and labels), sent
with `prefect.events.emit_event`. Every wait polls with a deadline. The automations are deleted
on the way out: later tests of the session send tenant events to the same server."""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest
import typer
from typer.testing import CliRunner

from deployments.automations_cli import (
    BROKEN_NAME,
    CONNECTED_NAME,
    FAILURES_NAME,
    automations_app,
)
from onboarding.batch.outcomes import StatusChange
from onboarding.batch.tenant_events import tenant_event

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CONNECTOR = "01M8F12B95S4BX0QFB3TPDWZ0Q"
PROFILE = "hubspot"
WAIT_SECONDS = 60.0
NAMES = (FAILURES_NAME, BROKEN_NAME, CONNECTED_NAME)


class Webhook:
    """An HTTP listener on 127.0.0.1 that keeps every POST's JSON body."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body or b"{}"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Webhook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Stack:
    api: str
    webhook: Webhook
    block: str  # the notification block's name
    block_id: UUID
    deployment: str  # flow/deployment
    deployment_id: UUID
    run: str  # in every tenant id of this test


def wait_for(what: str, found: Callable[[], Any], timeout: float = WAIT_SECONDS) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def install(*args: str) -> Any:
    app = typer.Typer()
    app.add_typer(automations_app, name="automations")
    return CliRunner().invoke(app, ["automations", "install", *args])


def ours() -> dict[str, list[Any]]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {name: client.read_automations_by_name(name) for name in NAMES}


def emit(status: str, tenant_id: str, error_code: str = "", **labels: str) -> None:
    """The project's event for this status change (tenant_events.py), sent with emit_event."""
    from prefect.events import emit_event

    event = tenant_event(StatusChange(tenant_id, CONNECTOR, PROFILE, status, error_code))
    emit_event(
        event=event["event"],
        resource={**event["resource"], **labels},
        payload=event["payload"],
        id=UUID(event["id"]),
    )


def flush_events() -> None:
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()


@pytest.fixture(scope="module")
def stack(prefect_api: str) -> Iterator[Stack]:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run = uuid.uuid4().hex[:8]
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), Webhook() as webhook:
        block = f"ops-alerts-{run}"
        block_id = CustomWebhookNotificationBlock(
            name="onboarding tests",
            url=webhook.url,
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
        ).save(block)
        assert isinstance(block_id, UUID)
        # The same name on another type of notification block: NAME alone is ambiguous.
        SlackWebhook(url="https://hooks.slack.com/services/T0/B0/x").save(f"shared-{run}")
        CustomWebhookNotificationBlock(name="t", url=webhook.url).save(f"shared-{run}")
        flow = f"provision-tenant-{run}"
        with get_client(sync_client=True) as client:
            flow_id = client.create_flow_from_name(flow)
            deployment_id = client.create_deployment(
                flow_id,
                "default",
                parameter_openapi_schema={
                    "type": "object",
                    "properties": {
                        name: {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
                        for name in ("tenant_id", "connector_id", "connection_id")
                    },
                },
            )
            client.create_deployment(
                flow_id,
                "tenant-only",
                parameter_openapi_schema={
                    "type": "object",
                    "properties": {"tenant_id": {"type": "string"}},
                },
            )
        try:
            yield Stack(
                prefect_api, webhook, block, block_id, f"{flow}/default", deployment_id, run
            )
        finally:
            flush_events()
            with get_client(sync_client=True) as client:
                for found in ours().values():
                    for automation in found:
                        client.delete_automation(automation.id)
                client.delete_deployment(deployment_id)


def test_install_twice_then_each_automation_acts(stack: Stack) -> None:
    started = time.monotonic()
    options = ("--notify-block", stack.block, "--on-connected", stack.deployment)
    first = install(*options, "--failures", "3")
    assert first.exit_code == 0, first.output
    assert first.output.count("created") == 3, first.output
    again = install(*options, "--failures", "3")
    assert again.exit_code == 0, again.output
    assert again.output.count("unchanged") == 3, again.output

    installed = ours()
    assert {name: len(found) for name, found in installed.items()} == dict.fromkeys(NAMES, 1)
    ids = {name: found[0].id for name, found in installed.items()}
    failures, broken, connected = (installed[name][0] for name in NAMES)
    assert failures.trigger.threshold == 3
    assert [a.block_document_id for a in failures.actions] == [stack.block_id]
    assert [a.block_document_id for a in broken.actions] == [stack.block_id]
    assert [a.deployment_id for a in connected.actions] == [stack.deployment_id]

    # A changed option updates the same automation; a dry run first writes nothing.
    dry = install(*options, "--failures", "4", "--dry-run")
    assert dry.exit_code == 0, dry.output
    summary = json.loads(dry.output)
    assert [(a["name"], a["action"]) for a in summary["automations"]] == [
        (FAILURES_NAME, "update"),
        (BROKEN_NAME, "unchanged"),
        (CONNECTED_NAME, "unchanged"),
    ]
    assert summary["notify_block"]["id"] == str(stack.block_id)
    assert summary["on_connected"]["id"] == str(stack.deployment_id)
    assert ours()[FAILURES_NAME][0].trigger.threshold == 3
    changed = install(*options, "--failures", "4")
    assert changed.exit_code == 0, changed.output
    installed = ours()
    assert {name: [a.id for a in found] for name, found in installed.items()} == {
        name: [ids[name]] for name in NAMES
    }
    assert installed[FAILURES_NAME][0].trigger.threshold == 4

    # Three failures of four, then a broken connection: its notification, none for failures.
    tenant = f"t-{stack.run}"
    for n in range(3):
        emit("failed", f"{tenant}-failed-{n}", "versori_5xx")
    flush_events()
    emit("broken", f"{tenant}-broken", "credential_expired")
    flush_events()
    notes = stack.webhook.received
    wait_for(
        "the broken notification", lambda: any(f"{tenant}-broken" in n["subject"] for n in notes)
    )
    assert notes == [
        {
            "subject": f"Onboarding: tenant {tenant}-broken's connection is broken",
            "body": f"Tenant {tenant}-broken's connection (profile {PROFILE}, connector "
            f"{CONNECTOR}) is broken: credential_expired. Its credential lists errors or has "
            "expired: the tenant's admin has to connect again.\n`onboard status` counts the "
            "broken tenants; `onboard export` has each one's error.",
        }
    ]

    # The fourth failure within 10 minutes: one notification.
    emit("failed", f"{tenant}-failed-3", "versori_5xx")
    # Two connected tenants, one with its connection id in the event.
    emit("connected", f"{tenant}-c1", **{"onboarding.connection-id": "conn-111"})
    emit("connected", f"{tenant}-c2")
    flush_events()
    alert = wait_for(
        "the failures notification",
        lambda: [n for n in notes if n["subject"].startswith("Onboarding: 4 tenants failed")],
    )
    assert len(alert) == 1
    assert f"tenant {tenant}-failed-3, profile {PROFILE}" in alert[0]["body"]
    assert "error versori_5xx" in alert[0]["body"]

    runs = wait_for("a flow run for each connected tenant", lambda: runs_of(stack, 2))
    assert sorted((r.parameters for r in runs), key=lambda p: p["tenant_id"]) == [
        {"tenant_id": f"{tenant}-c1", "connector_id": CONNECTOR, "connection_id": "conn-111"},
        {"tenant_id": f"{tenant}-c2", "connector_id": CONNECTOR, "connection_id": None},
    ]
    print(f"installed and acted in {time.monotonic() - started:.1f} s")


def runs_of(stack: Stack, count: int) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[stack.deployment_id]))
        )
    return runs if len(runs) >= count else []


def test_an_unknown_notification_block_exits_2_and_lists_those_there_are(stack: Stack) -> None:
    result = install("--notify-block", f"nope-{stack.run}")
    assert result.exit_code == 2
    assert f"--notify-block: no notification block named 'nope-{stack.run}'" in result.output
    assert f"custom-webhook/{stack.block}" in result.output


def test_a_name_two_block_types_share_exits_2_unless_given_as_type_slash_name(
    stack: Stack,
) -> None:
    shared = f"shared-{stack.run}"
    result = install("--notify-block", shared, "--dry-run")
    assert result.exit_code == 2
    assert f"--notify-block: '{shared}' names 2 notification blocks" in result.output
    assert f"custom-webhook/{shared}, slack-webhook/{shared}" in result.output
    chosen = install("--notify-block", f"slack-webhook/{shared}", "--dry-run")
    assert chosen.exit_code == 0, chosen.output
    assert json.loads(chosen.output)["notify_block"]["type"] == "slack-webhook"


def test_an_unknown_deployment_exits_2_naming_it(stack: Stack) -> None:
    result = install("--on-connected", f"provision-tenant-{stack.run}/nope")
    assert result.exit_code == 2
    assert (
        f"--on-connected: no deployment named 'provision-tenant-{stack.run}/nope'" in result.output
    )


def test_a_deployment_without_the_parameters_exits_2(stack: Stack) -> None:
    result = install("--on-connected", f"provision-tenant-{stack.run}/tenant-only")
    assert result.exit_code == 2
    assert "has no parameter connector_id, connection_id" in result.output


def test_without_a_notify_block_the_alerts_are_not_installed(stack: Stack) -> None:
    result = install("--on-connected", stack.deployment, "--dry-run")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert [a["name"] for a in summary["automations"]] == [CONNECTED_NAME]
    assert [s["name"] for s in summary["skipped"]] == [FAILURES_NAME, BROKEN_NAME]
    assert "no --notify-block" in summary["skipped"][0]["reason"]
