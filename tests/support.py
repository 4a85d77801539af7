"""Test support without Prefect: a run's Campaign of one connector, and one tenant's step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from onboarding.campaign import Campaign, onboard_tenant
from onboarding.client import VersoriClient
from onboarding.connector_run import ConnectorRun
from onboarding.delivery import Delivery
from onboarding.ledger import Ledger
from onboarding.outcomes import StatusChange, TenantOutcome
from onboarding.profile import ConnectorProfile
from onboarding.retry_policy import BatchStop, Tries
from onboarding.roster import Tenant


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
