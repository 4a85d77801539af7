"""Flow `record-connection`: the app's OAuth callback reports that a tenant connected."""

from __future__ import annotations

from contextlib import closing
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed
from pydantic import SecretStr

from flows.inputs.options import TenantEvents
from flows.reporting.events import TenantEventSender
from onboarding.batch.outcomes import StatusChange
from onboarding.connections.record_connection import record_connection
from onboarding.errors import (
    ExpiredStateError,
    StateUsedError,
    SupersededStateError,
    UnknownStateError,
)
from onboarding.ledger import Ledger
from onboarding.settings import load_settings
from onboarding.versori.authorize_url import mask_state


@flow(name="record-connection", flow_run_name="record-connection", log_prints=False)
def record_connection_flow(
    state: SecretStr, connection_id: str | None = None
) -> State[dict[str, Any]]:
    """Mark the tenant whose link carried `state` as connected. A state is accepted once, while
    its link is the tenant's current one and unexpired; any other state fails the run with a
    message saying why, and nothing is recorded.

    Args:
        state: The `state` your OAuth callback received. A secret while its link is live
            (whoever holds both can bind the tenant): the UI's form and run page mask it, and
            a run started in-process (`onboard mark-connected`) stores it masked.
        connection_id: Versori's id of the new connection, if you have it.
    """
    logger = get_run_logger()
    secret = state.get_secret_value().strip()
    with closing(Ledger(load_settings().ledger.db_url)) as ledger:
        try:
            record = record_connection(ledger, secret, connection_id)
        except (UnknownStateError, SupersededStateError, ExpiredStateError, StateUsedError) as err:
            logger.error("%s", err)
            return Failed(message=str(err), data={"code": err.code, "error": str(err)})
    with TenantEventSender(TenantEvents.ALL) as events:
        events(
            StatusChange(
                record.tenant_id,
                record.connector_id,
                record.profile,
                "connected",
                connection_id=record.connection_id,
            )
        )
    logger.info(
        "Tenant %s is connected to %s (state %s)",
        record.tenant_id,
        record.profile,
        mask_state(secret),
    )
    return Completed(
        message=f"tenant {record.tenant_id} connected",
        data={
            "tenant_id": record.tenant_id,
            "connector_id": record.connector_id,
            "status": record.status.value,
            "connection_id": record.connection_id,
        },
    )
