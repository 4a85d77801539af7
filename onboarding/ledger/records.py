"""What the ledger hands back: a tenant's record, a superseded link, a callback's result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from onboarding.ledger.schema import Status


@dataclass(frozen=True)
class SupersededLink:
    state: str
    tenant_id: str
    connector_id: str
    created_at: datetime | None
    superseded_at: datetime


@dataclass(frozen=True)
class Record:
    tenant_id: str
    connector_id: str
    profile: str
    tenant_name: str
    admin_email: str
    status: Status
    url: str | None
    state: str | None
    created_at: datetime | None
    expires_at: datetime | None
    delivered_at: datetime | None
    connected_at: datetime | None
    delivery_channel: str | None
    attempts: int
    error_code: str | None
    error_message: str | None
    run_id: str | None
    updated_at: datetime
    tenant_fields: dict[str, str] | None = None
    message_id: str | None = None
    last_sent_at: datetime | None = None
    reminders: int = 0
    connection_id: str | None = None
    end_user_id: str | None = None
    activation_id: str | None = None
    activated_at: datetime | None = None
    reconnect_of: str | None = None
    checked_at: datetime | None = None
    # Derived from `state` (see state_digest): not part of a record's identity.
    state_hash: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_row(cls, row: Any) -> Record:
        return cls.from_values(row._mapping)

    @classmethod
    def from_values(cls, mapping: Mapping[str, Any]) -> Record:
        """A record from its values by column (a row's mapping, or a part of a wider one)."""
        values = _aware(mapping)
        values["status"] = Status(values["status"])
        values["reminders"] = values["reminders"] or 0
        return cls(**values)


# The columns of `onboard export`, in order (onboarding/export.py). Each is a Record field but
# opened_at: the first time a person opened one of the tenant's connect links, read from those;
# and connector_name: the name of the profile that wrote the record (Record.profile; the
# ledger keeps the profile's `name`, not its display_name). Never a hash, a token or a connect
# link's CSRF value.
EXPORT_KEYS = (
    "tenant_id",
    "connector_id",
    "connector_name",
    "status",
    "url",
    "state",
    "created_at",
    "expires_at",
    "attempts",
    "error_code",
    "error_message",
    "connection_id",
    "connected_at",
    "delivered_at",
    "opened_at",
    "last_sent_at",
    "reminders",
    "activation_id",
    "activated_at",
    "checked_at",
)


def aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything written here is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def aware_values(row: Any) -> dict[str, Any]:
    """A row's values by column, its datetimes made aware (see aware)."""
    return _aware(row._mapping)


def _aware(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: aware(value) if isinstance(value, datetime) else value
        for key, value in mapping.items()
    }


def utc(value: datetime) -> datetime:
    # SQLite stores the wall time and drops the offset, so a +02:00 time must become UTC first.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ConnectOutcome(StrEnum):
    CONNECTED = "connected"  # recorded now
    UNKNOWN = "unknown"  # no tenant was ever given this state
    SUPERSEDED = "superseded"  # a newer link replaced it
    EXPIRED = "expired"  # its link is past its expiry
    USED = "used"  # the tenant is connected already: a state is accepted once


@dataclass(frozen=True)
class ConnectResult:
    outcome: ConnectOutcome
    record: Record | None = None
    superseded: SupersededLink | None = None


def superseded_from_row(row: Any) -> SupersededLink:
    values = aware_values(row)
    values.pop("state_hash", None)
    return SupersededLink(**values)
