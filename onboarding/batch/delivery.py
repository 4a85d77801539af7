"""How a tenant's link reaches its admin."""

from __future__ import annotations

from enum import StrEnum


class Delivery(StrEnum):
    STORE = "store"  # the ledger keeps it, for `onboard export`
    EMAIL = "email"  # mailed to the admin
    BOTH = "both"

    @property
    def sends_email(self) -> bool:
        return self is not Delivery.STORE
