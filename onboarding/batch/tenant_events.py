"""A tenant's status change as a Prefect event, in the body the API's `POST /events` takes,
and the headers that authenticate it there. One shape for a batch's events (flows/reporting),
the connect service's and `onboard mark-connected`'s, none of which imports Prefect to send
them. An event carries ids, the status and an error code: never a link, a state or an email
address."""

from __future__ import annotations

import base64
import os
import uuid
from typing import Any

from onboarding.batch.outcomes import StatusChange
from onboarding.clock import utcnow

# Ledger statuses whose event name reads better short.
EVENT_NAMES = {"link_created": "linked"}


def event_name(status: str) -> str:
    return f"onboarding.tenant.{EVENT_NAMES.get(status, status)}"


def tenant_event(
    change: StatusChange, related: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    """The event about the resource `onboarding.tenant.<tenant_id>`, `related` to a flow run
    when there is one."""
    resource = {
        "prefect.resource.id": f"onboarding.tenant.{change.tenant_id}",
        "prefect.resource.name": change.tenant_id,
        "onboarding.connector-id": change.connector_id,
        "onboarding.profile": change.profile,
    }
    if change.connection_id:
        resource["onboarding.connection-id"] = change.connection_id
    return {
        "id": str(uuid.uuid4()),
        "occurred": utcnow().isoformat(),
        "event": event_name(change.status),
        "resource": resource,
        "related": related or [],
        "payload": {"error_code": change.error_code} if change.error_code else {},
    }


def api_headers(api_key: str | None = None) -> dict[str, str]:
    """As Prefect's client authenticates: a server's PREFECT_API_AUTH_STRING first, else an
    API key (`api_key`, else PREFECT_API_KEY)."""
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    if auth:
        return {"Authorization": f"Basic {base64.b64encode(auth.encode()).decode()}"}
    key = api_key or os.environ.get("PREFECT_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}
