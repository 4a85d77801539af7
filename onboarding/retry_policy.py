"""When a failed tenant is tried again, and when a batch stops: `decide`, the one place either
is decided, for every step (onboard, remind, mail; each connector of a campaign)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum

from onboarding import constants
from onboarding.errors import (
    APITimeoutError,
    AuthenticationError,
    NotFoundError,
    PermissionDeniedError,
    is_transient,
)

# Errors that, repeated, would fail every remaining tenant the same way (a revoked key, a
# connector or credential that is gone). One alone proves nothing: a proxy's stray 404, a
# deploy on Versori's side, one tenant's odd template. See BatchStop.
BATCH_WIDE = (AuthenticationError, PermissionDeniedError, NotFoundError)


class BatchStop:
    """Decides when a batch stops: after the same batch-wide class of error (401, 403, 404)
    has failed `after` distinct tenants in a row, with no success between them.

    401 gets no shortcut though the key is organisation-wide: a 401 can also come from a proxy
    or a gateway mid-deploy, and waiting for `after` tenants costs at most `after - 1` calls
    more (plus those in flight). Thread-safe; `reason` is set once, when it stops."""

    def __init__(self, after: int = constants.STOP_AFTER) -> None:
        self.after = max(1, after)
        self.reason = ""
        self.interrupted = False
        self._lock = threading.Lock()
        self._kind: type[BaseException] | None = None
        self._tenants: list[str] = []

    def interrupt(self) -> None:
        """Stop now because the operator asked (Ctrl-C): tenants not yet tried are left as
        they are in the ledger, for the next run (see ConnectorRun.not_attempted)."""
        with self._lock:
            self.reason = self.reason or "the run was interrupted"
            self.interrupted = True

    def halt(self, reason: str) -> None:
        """Stop now, for a reason of the caller's (the batch's parent ended)."""
        with self._lock:
            self.reason = self.reason or reason

    def succeeded(self) -> None:
        with self._lock:
            self._kind, self._tenants = None, []

    def failed(self, tenant_id: str, exc: BaseException) -> None:
        kind = next((k for k in BATCH_WIDE if isinstance(exc, k)), None)
        if kind is None:
            return  # a transient or tenant-specific failure neither adds to a run nor ends one
        with self._lock:
            if self.reason:
                return
            if kind is not self._kind:
                self._kind, self._tenants = kind, []
            if tenant_id not in self._tenants:
                self._tenants.append(tenant_id)
            if len(self._tenants) >= self.after:
                shown = ", ".join(self._tenants)
                self.reason = f"{len(self._tenants)} tenants in a row ({shown}) failed with {exc}"


class RetryLater(Exception):
    """Raised by a tenant's step for a failure `decide` said to try again: the slice keeps the
    tenant for its next attempt. Anything else a step raises is decided where it is caught."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Verdict(Enum):
    RETRY = "retry"  # transient: the slice's next attempt tries the tenant again
    FINAL = "final"  # recorded failed now; the next run picks it up
    STOP = "stop"  # final, and the batch stops: its untried tenants are not attempted


@dataclass(frozen=True)
class RetryRule:
    """When a tenant's failure is tried again within the run. `deadline` bounds a tenant's
    whole time in the run (calls and waits): no new try starts after it, so a tenant takes
    at most `deadline` plus one call (VERSORI_CALL_DEADLINE). After a timeout, one more try at
    most: a server that hangs is not called into again and again."""

    deadline: float = constants.TENANT_DEADLINE_SECONDS
    timeouts: int = 1


@dataclass(frozen=True)
class Tries:
    """Where a tenant stands in its tries: on the task's last attempt or not, seconds since
    its first try began, and how many of its earlier tries timed out."""

    last_attempt: bool = True
    elapsed: float = 0.0
    timeouts: int = 0


def decide(
    exc: BaseException,
    tenant_id: str,
    tries: Tries,
    rule: RetryRule,
    stop: BatchStop | None = None,
) -> Verdict:
    """Retry, final, or stop the batch, for one tenant's failure: the one place any of these
    is decided, for every step (onboard, remind, mail, each connector of a campaign). `stop`
    (the connector's) takes the failure as evidence; a stopped batch retries nothing."""
    if stop is not None:
        stop.failed(tenant_id, exc)
        if stop.reason:
            return Verdict.STOP
    if tries.last_attempt or not is_transient(exc) or tries.elapsed >= rule.deadline:
        return Verdict.FINAL
    if isinstance(exc, APITimeoutError) and tries.timeouts >= rule.timeouts:
        return Verdict.FINAL
    return Verdict.RETRY
