"""`onboard mark-connected` records in the core, in this process, with no Prefect flow run; its
`onboarding.tenant.connected` event goes to the Prefect API only when one is configured, as
the record-connection flow builds it."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from demo.processes import free_port
from deployments.cli import app
from onboarding.ledger import Ledger, Status
from tests.unit.test_ledger import get, link

runner = CliRunner()
SECRET = "st-0123456789abcdefghij"


@pytest.fixture
def ledger_with_a_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ledger]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("ONBOARD_DB_URL", url)
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"):
        monkeypatch.delenv(name, raising=False)
    ledger = Ledger(url)
    link(ledger, "t1", state=SECRET, admin_email="admin@t1.example.com")
    try:
        yield ledger
    finally:
        ledger.close()


class _EventsApi(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict[str, str], Any]]]  # each server's own (below)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers), json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def events_api() -> Iterator[tuple[str, list[tuple[str, dict[str, str], Any]]]]:
    """A stand-in for the Prefect API's POST /events, on a real socket."""
    received: list[tuple[str, dict[str, str], Any]] = []
    handler = type("Handler", (_EventsApi,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api", received
    finally:
        server.shutdown()
        server.server_close()


def test_records_from_stdin_and_says_no_event_was_sent(ledger_with_a_link: Ledger) -> None:
    result = runner.invoke(
        app, ["mark-connected", "--state", "-", "--connection-id", "c-1"], input=SECRET + "\n"
    )
    assert result.exit_code == 0, result.output
    assert "Tenant t1 is connected to zendesk-demo." in result.stdout
    assert "No event sent: no Prefect server is configured (PREFECT_API_URL is not set)." in (
        result.stdout
    )
    record = get(ledger_with_a_link, "t1")
    assert (record.status, record.connection_id) == (Status.CONNECTED, "c-1")

    replay = runner.invoke(app, ["mark-connected", "--state", SECRET])
    assert replay.exit_code == 1
    assert "Not recorded: state st-0… was already used" in replay.stderr
    assert SECRET not in replay.output
    unknown = runner.invoke(app, ["mark-connected", "--state", "no-such-state"])
    assert unknown.exit_code == 1 and "no tenant owns state" in unknown.stderr


@pytest.mark.parametrize(
    ("variable", "value", "authorization"),
    [
        ("PREFECT_API_KEY", "pnu_cloud-key", "Bearer pnu_cloud-key"),
        ("PREFECT_API_AUTH_STRING", "admin:pw", "Basic " + base64.b64encode(b"admin:pw").decode()),
    ],
)
def test_posts_the_event_the_flow_would_send(
    ledger_with_a_link: Ledger,
    events_api: tuple[str, list[tuple[str, dict[str, str], Any]]],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    authorization: str,
) -> None:
    from flows.inputs.options import TenantEvents
    from flows.reporting.events import TenantEventSender
    from onboarding.batch.outcomes import StatusChange

    api, received = events_api
    monkeypatch.setenv("PREFECT_API_URL", api + "/")
    monkeypatch.setenv(variable, value)
    result = runner.invoke(app, ["mark-connected", "--state", SECRET])
    assert result.exit_code == 0, result.output
    assert f"Event onboarding.tenant.connected sent to {api}." in result.stdout
    assert value not in result.output
    [(path, headers, [event])] = received
    assert path == "/api/events" and headers["Authorization"] == authorization

    # The flow's sender, outside any flow run (nothing to relate the event to), as reference.
    sender = TenantEventSender(TenantEvents.ALL)
    sender(StatusChange("t1", "01M8F12B95S4BX0QFB3TPDWZ0Q", "zendesk-demo", "connected"))
    expected = sender._queue[0]
    assert set(event) == set(expected)
    assert {k: event[k] for k in expected if k not in ("id", "occurred")} == {
        k: v for k, v in expected.items() if k not in ("id", "occurred")
    }
    assert SECRET not in json.dumps(event) and "admin@" not in json.dumps(event)


def test_an_unreachable_api_is_said_in_a_line_and_the_connection_stays_recorded(
    ledger_with_a_link: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    monkeypatch.setenv("PREFECT_API_URL", api)
    monkeypatch.setenv("PREFECT_API_KEY", "pnu_secret")
    result = runner.invoke(app, ["mark-connected", "--state", SECRET])
    assert result.exit_code == 0, result.output
    assert f"The event was not sent to {api} (ConnectError); the ledger has the connection." in (
        result.stderr
    )
    assert "pnu_secret" not in result.output and "Traceback" not in result.output
    assert get(ledger_with_a_link, "t1").status is Status.CONNECTED
