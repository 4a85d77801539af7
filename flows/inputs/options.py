"""The choices a run's parameters offer beyond the core's (`onboarding.batch.delivery.Delivery`):
Prefect's ideas, so they live here. Plain enums: the CLI imports them without Prefect."""

from __future__ import annotations

from enum import StrEnum


class FanOut(StrEnum):
    """Where a batch runs: all of it in the batch's own flow run (in_process), or split into
    chunks that run as runs of a deployment, spread over its work pool's workers."""

    IN_PROCESS = "in_process"
    DEPLOYMENT = "deployment"


class TenantEvents(StrEnum):
    """Which tenant status changes are reported as events: every one, failures only, none;
    auto: every one on a Prefect server, failures only on Prefect's temporary server (it lives
    as long as the run, no Automation watches it, and its in-memory broker drops events past
    a few hundred a second)."""

    AUTO = "auto"
    ALL = "all"
    FAILURES = "failures"
    OFF = "off"

    def wants(self, status: str) -> bool:
        return self is TenantEvents.ALL or (self is TenantEvents.FAILURES and status == "failed")
