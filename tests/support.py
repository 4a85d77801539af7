"""Test support without Prefect: a run's Campaign of one connector, and one tenant's step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from onboarding.batch.campaign import Campaign, onboard_tenant
from onboarding.batch.connector_run import ConnectorRun
from onboarding.batch.delivery import Delivery
from onboarding.batch.outcomes import StatusChange, TenantOutcome
from onboarding.batch.retry_policy import BatchStop, Tries
from onboarding.inputs.profile import ConnectorProfile
from onboarding.inputs.roster import Tenant
from onboarding.ledger import Ledger
from onboarding.versori.client import VersoriClient


def campaign_of(
    profile: ConnectorProfile,
    ledger: Ledger,
    client: VersoriClient | None = None,
    *,
    deliver: Delivery = Delivery.STORE,
    on_status: Callable[[StatusChange], None] | None = None,
    stop: BatchStop | None = None,
    **options: Any,
) -> Campaign:
    """The Campaign a run of this one profile opens (flows/batching/resources.py), minus Prefect;
    `options` go to the Campaign (mailer, templates, rule, remind_before...)."""
    connector = ConnectorRun(profile=profile, client=client, ledger=ledger, deliver=deliver)
    if on_status is not None:
        connector.on_status = on_status
    if stop is not None:
        connector.stop = stop
    return Campaign([connector], deliver, **options)


def onboard(campaign: Campaign, tenant: Tenant) -> TenantOutcome:
    """One tenant's step on its last attempt: every failure final, in the outcome."""
    return onboard_tenant(campaign, tenant, Tries())
