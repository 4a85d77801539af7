"""When a failed tenant is tried again, and when a batch stops: the one place either is
decided, for every step (onboard, remind, one connector or a campaign's)."""

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
    worth_retrying,
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
        they are in the ledger, for the next run (see OnboardingJob.not_attempted)."""
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


class Verdict(Enum):
    RETRY = "retry"  # transient: the slice's next attempt calls the tenant again
    FINAL = "final"  # recorded failed now; the next run picks it up


@dataclass(frozen=True)
class RetryRule:
    """When a tenant's failure is tried again within the run. `deadline` bounds a tenant's
    whole time in the run (calls and waits): no new try starts after it, so a tenant takes
    at most `deadline` plus one call (VERSORI_CALL_DEADLINE). After a timeout, one more try at
    most: a server that hangs is not called into again and again."""

    deadline: float = constants.TENANT_DEADLINE_SECONDS
    timeouts: int = 1


def verdict(
    exc: BaseException, *, last_attempt: bool, elapsed: float, timeouts: int, rule: RetryRule
) -> Verdict:
    """Retry or final, for one tenant's failure: the one place this is decided."""
    if last_attempt or not worth_retrying(exc) or elapsed >= rule.deadline:
        return Verdict.FINAL
    if isinstance(exc, APITimeoutError) and timeouts > rule.timeouts:
        return Verdict.FINAL
    return Verdict.RETRY
