"""A stage for the emulator's Platform API v2 tests (tests/unit/test_emulator_platform.py,
tests/unit/test_emulator_hooks.py): one emulator on a real socket, a plain httpx client to it,
and the steps a test takes on it (a code from the consent page, a connection made with it, an
activation), each one real HTTP request as a client would send it."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from demo.emulator import DEFAULT_API_KEY, EmulatorServer
from demo.emulator_config import (
    DEMO_CONNECTOR,
    DEMO_CRM,
    DEMO_ENVIRONMENT,
    DEMO_SYSTEM,
    DEMO_TEMPLATE_ID,
    EmulatedConnector,
    EmulatedEnvironment,
    EmulatorConfig,
)
from demo.emulator_oauth import CONSENT_PATH

AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
ORG = DEMO_CRM.organisation_id
CRM = DEMO_CRM.connector_id  # the demo environment's one system
SLACK = DEMO_SYSTEM.connector_id  # a second v2 system, for environments of two
ENV = DEMO_ENVIRONMENT.environment_id
TEMPLATE = DEMO_TEMPLATE_ID
SLACK_TEMPLATE = "01M8F12B95S4BX0QFB3TPDWZ1F"
OTHER_TEMPLATE = "01M8F12B95S4BX0QFB3TPDWZ0Y"  # a template of no environment
TWO_ENV = "01M8F12B95S4BX0QFB3TPDWZ1G"
UNKNOWN = "01M8F12B95S4BX0QFB3TPDWZ1H"  # a ULID nothing has
CALLBACK = "https://app.example.com/callback"


def two_systems() -> EmulatorConfig:
    """The demo's environment and one that needs both the CRM and Slack."""
    both = EmulatedEnvironment(
        organisation_id=ORG,
        environment_id=TWO_ENV,
        systems=((CRM, "01M8F12B95S4BX0QFB3TPDWZ1J"), (SLACK, SLACK_TEMPLATE)),
        name="staging",
    )
    return EmulatorConfig(environments=(DEMO_ENVIRONMENT, both))


class Stage:
    """One emulator, a plain HTTP client to it, and the calls a test makes."""

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.base_url, timeout=5.0)

    def code(self, connector: EmulatedConnector = DEMO_CRM) -> tuple[str, str]:
        """A fresh (code, state) for `connector`'s system: initialise, then Allow."""
        body = {
            "credential": {
                "id": connector.credential_id,
                "organisationId": connector.credential_organisation_id,
            },
            "authorizeUrl": f"{self.server.base_url}{CONSENT_PATH}",
            "clientId": connector.client_id,
        }
        kind = "connectors" if connector is DEMO_CONNECTOR else "systems"
        if kind == "systems":
            body["redirectUrl"] = CALLBACK
        path = f"/o/{connector.organisation_id}/{kind}/{connector.connector_id}/oauth2/initialise"
        given = self.http.post(path, json=body, headers=AUTH)
        assert given.status_code == 200, given.text
        state = parse_qs(urlsplit(given.json()["url"]).query)["state"][0]
        back = self.http.post(CONSENT_PATH, data={"state": state, "decision": "allow"})
        assert back.status_code == 303, back.text
        return parse_qs(urlsplit(back.headers["location"]).query)["code"][0], state

    @staticmethod
    def credentials(code: tuple[str, str], redirect_url: str = CALLBACK) -> list[dict[str, Any]]:
        data = {"code": code[0], "state": code[1], "redirectUrl": redirect_url}
        credential = {"organisationId": ORG, "type": "oauth2-code", "data": data}
        return [{"credential": credential}]

    def create(
        self,
        tenant: str,
        *,
        template: str = TEMPLATE,
        connector: EmulatedConnector = DEMO_CRM,
        name: str | None = None,
    ) -> dict[str, Any]:
        """CreateConnection (v2) with a fresh code: the Connection made."""
        body = {
            "connectionTemplateId": template,
            "externalId": tenant,
            "connection": {
                "name": name or f"Tenant {tenant} {template[-2:]}",
                "credentials": self.credentials(self.code(connector)),
            },
        }
        made = self.http.post(f"/o/{ORG}/connections", json=body, headers=AUTH)
        assert made.status_code == 201, made.text
        connection: dict[str, Any] = made.json()
        return connection

    def user(self, tenant: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = self.get("/users", search=tenant).json()["users"]
        [user] = [u for u in found if u["externalId"] == tenant]
        return user

    def get(self, path: str, **params: str) -> httpx.Response:
        return self.http.get(f"/o/{ORG}{path}", params=params, headers=AUTH)

    def put(self, path: str, body: Any) -> httpx.Response:
        return self.http.put(f"/o/{ORG}{path}", json=body, headers=AUTH)

    def delete(self, path: str) -> httpx.Response:
        return self.http.delete(f"/o/{ORG}{path}", headers=AUTH)

    def activate(
        self, user_id: str, links: dict[str, str], environment: str = ENV, **extra: Any
    ) -> httpx.Response:
        """ActivateUser with `links`: connection template id -> existing connection id."""
        body = {
            "userId": user_id,
            "environmentId": environment,
            "connections": [
                {"connectionTemplateId": t, "existingConnectionId": c} for t, c in links.items()
            ],
            **extra,
        }
        return self.http.post(f"/o/{ORG}/activations", json=body, headers=AUTH)

    def break_credential(self, connection_id: str, **health: Any) -> httpx.Response:
        return self.http.post(f"/_emulator/connections/{connection_id}/credential", json=health)

    def calls(self) -> dict[str, int]:
        counted: dict[str, int] = self.http.get("/_emulator/calls").json()["calls"]
        return counted

    def close(self) -> None:
        self.http.close()


def fields(response: httpx.Response) -> list[str]:
    return [f["field"] for f in response.json().get("fields", [])]
