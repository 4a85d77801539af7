"""What Versori's view of one tenant makes of its ledger record: pure decisions, no I/O.

The rules (docs/sync.md draws them):
- a working connection for the tenant and system: `activated` if the tenant's activation on the
  profile's environment holds it, else `connected` (recorded with its id, even when it was made
  outside our links);
- a connection whose credential lists errors, or whose `expiresAt` has passed: `broken`, its id
  kept so that the reconnect updates it in place;
- no connection where the ledger held one: `disconnected` (a reconnect makes a new one).
A tenant with no connection that never had one keeps its status (a link may be on its way)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from onboarding.ledger import HELD_STATUSES, Held, Settled, Status

# Why a tenant is asked to connect again (records.reconnect_of).
BROKEN = Status.BROKEN.value
DISCONNECTED = Status.DISCONNECTED.value


@dataclass(frozen=True)
class SeenConnection:
    """A connection Versori holds for the tenant and system."""

    id: str
    # Why its credential does not work (its validation errors, or "expired at ..."); None when
    # it works or was never validated (Versori lists no errors then: unknown is not broken).
    broken: str | None = None
    broken_code: str = "credential_errors"


@dataclass(frozen=True)
class Seen:
    """What sync read of one tenant in one system."""

    connection: SeenConnection | None
    # The tenant's activation on the profile's environment, if it holds this connection.
    activation_id: str | None = None


def credential_problem(
    errors: list[str] | None, expires_at: datetime | None, now: datetime
) -> tuple[str, str] | None:
    """(code, reason) when a credential does not work: it lists validation errors, or it has
    expired. None when it works, or was never validated (`errors` absent)."""
    if errors:
        return "credential_errors", "; ".join(errors)[:500]
    if expires_at is not None and expires_at <= now:
        return "credential_expired", f"the credential expired at {expires_at.isoformat()}"
    return None


def decide(held: Held, seen: Seen) -> Settled | None:
    """The record's new status and columns, or None when the ledger already agrees."""
    found = seen.connection
    if found is None:
        return _gone(held)
    if found.broken is not None:
        return _broken(held, found)
    if seen.activation_id is not None:
        if held.status is Status.ACTIVATED and (held.connection_id, held.activation_id) == (
            found.id,
            seen.activation_id,
        ):
            return None
        return Settled(
            Status.ACTIVATED,
            connection_id=found.id,
            activation_id=seen.activation_id,
            columns=(*_WORKING, "activation_id"),
        )
    if held.status is Status.CONNECTED and held.connection_id == found.id:
        return None
    return Settled(
        Status.CONNECTED,
        connection_id=found.id,
        activation_id=None,
        columns=(*_WORKING, "activation_id"),
    )


# What a working connection clears or sets.
_WORKING = ("connection_id", "error_code", "error_message", "reconnect_of")


def _gone(held: Held) -> Settled | None:
    if held.connection_id is None and held.status not in HELD_STATUSES:
        return None  # never had one (or already recorded gone)
    which = f"connection {held.connection_id}" if held.connection_id else "the connection"
    gone = ("connection_gone", f"{which} is no longer in Versori")
    if held.status in HELD_STATUSES or held.status is Status.BROKEN:
        status = Status.DISCONNECTED
    else:
        status = held.status  # a reconnect in flight: it now makes a new connection
    return Settled(
        status,
        connection_id=None,
        activation_id=None,
        error_code=gone[0],
        error_message=gone[1],
        reconnect_of=DISCONNECTED,
        columns=("connection_id", "activation_id", "error_code", "error_message", "reconnect_of"),
    )


def _broken(held: Held, found: SeenConnection) -> Settled | None:
    if held.status is Status.BROKEN and held.connection_id == found.id:
        return None
    if held.status not in HELD_STATUSES and held.connection_id == found.id:
        return None  # asked to reconnect already (a link is out): leave it be
    return Settled(
        Status.BROKEN,
        connection_id=found.id,
        error_code=found.broken_code,
        error_message=found.broken,
        reconnect_of=BROKEN,
        columns=("connection_id", "error_code", "error_message", "reconnect_of"),
    )
