"""When a failed call or tenant is tried again, and when a batch stops: `RetryPolicy`, the one
set of retry numbers (how many tries, the wait before each, how long a Retry-After is waited),
in two instances, `BATCH_RETRY` (the slice tasks) and `BROWSER_RETRY` (the connect service);
and `decide`, the one place a tenant's retry, final failure or batch stop is decided, for every
step (onboard, remind, mail; each connector of a campaign)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum

from onboarding import constants
from onboarding.errors import (
    APITimeoutError,
    AuthenticationError,
    BatchStoppedError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    is_transient,
)
from onboarding.settings import RetrySettings

# Errors that, repeated, would fail every remaining tenant the same way (a revoked key, a
# connector or credential that is gone). One alone proves nothing: a proxy's stray 404, a
# deploy on Versori's side, one tenant's odd template. See BatchStop.
BATCH_WIDE = (AuthenticationError, PermissionDeniedError, NotFoundError)


# How long a call waiting at a closed gate sleeps between looks at the stop (it is also woken
# as soon as the gate's call answers).
GATE_POLL_SECONDS = 0.5


class BatchStop:
    """Decides when a batch stops: after the same batch-wide class of error (401, 403, 404)
    has failed `after` distinct tenants in a row, with no success between them; and gates the
    calls so that, with a wrong key, no more than `after` tenants call Versori in all, whatever
    the concurrency.

    The gate. Calls go one at a time until an answer that is not a 401, 403 or 404 came back
    (the first call of a batch goes alone; the rest start once it answered otherwise); a
    401, 403 or 404 closes the gate again, so that the calls after it wait for the next one's
    answer, and each checks the stop first. Only a 401, 403 or 404 is evidence against the key
    or the connector: any other outcome (a success, another error, a 5xx, a timeout) opens
    the gate, since holding calls back on a 503 or a hanging server would only multiply the
    wait by the batch's size. A call already in flight when the gate closes finishes.

    401 gets no shortcut though the key is organisation-wide: a 401 can also come from a proxy
    or a gateway mid-deploy, and waiting for `after` tenants, one at a time, costs `after - 1`
    calls more. Thread-safe; `reason` is set once, when it stops: `cause` (what happened)
    and what to fix, with `detail` (which tenants, which answer).

    `key_setting` names where the API key came from (VERSORI_API_KEY, or the block
    VERSORI_API_KEY_BLOCK names), `target` what a 403 or 404 was about (a connector of an
    organisation), `ids` where its ids are set (the profile's keys)."""

    def __init__(
        self,
        after: int = constants.STOP_AFTER,
        *,
        key_setting: str = "VERSORI_API_KEY",
        target: str = "the connector",
        ids: str = "the profile's organisation_id and connector_id (system_id for platform-v2)",
    ) -> None:
        self.after = max(1, after)
        self.key_setting = key_setting
        self.target = target
        self.ids = ids
        self.reason = ""
        self.cause = ""
        self.detail = ""
        self.error_code = ""  # the code of the errors that stopped it (Versori's)
        self.interrupted = False
        self._lock = threading.Lock()
        self._gate = threading.Condition(self._lock)
        self._open = False  # an answer other than 401/403/404 came back since the last one
        self._probing = False  # a call goes alone while the gate is closed
        self._kind: type[BaseException] | None = None
        self._tenants: list[str] = []
        # Errors the gate counted as they came back: `decide` passes them on again later.
        self._counted: weakref.WeakSet[BaseException] = weakref.WeakSet()

    def interrupt(self) -> None:
        """Stop now because the operator asked (Ctrl-C): tenants not yet tried are left as
        they are in the ledger, for the next run (see ConnectorRun.not_attempted)."""
        with self._lock:
            self.reason = self.reason or "the run was interrupted"
            self.cause = self.cause or self.reason
            self.interrupted = True
            self._gate.notify_all()

    def halt(self, reason: str) -> None:
        """Stop now, for a reason of the caller's (the batch's parent ended)."""
        with self._lock:
            self.reason = self.reason or reason
            self.cause = self.cause or self.reason
            self._gate.notify_all()

    def succeeded(self) -> None:
        with self._lock:
            self._kind, self._tenants = None, []

    def failed(self, tenant_id: str, exc: BaseException) -> None:
        kind = _batch_wide(exc)
        if kind is None:
            return  # a transient or tenant-specific failure neither adds to a run nor ends one
        with self._lock:
            self._count(kind, tenant_id, exc)

    @contextmanager
    def call(self, tenant_id: str) -> Iterator[None]:
        """Around one call to Versori for `tenant_id`: waits while the gate is closed and
        another call goes alone; raises BatchStoppedError, calling nothing, once the batch
        has stopped. A 401, 403 or 404 the call raises is counted here (before the next call
        is let through), and closes the gate; anything else opens it."""
        alone = self._admit()
        try:
            yield
        except BaseException as exc:
            self._answered(alone, tenant_id, exc)
            raise
        self._answered(alone, tenant_id, None)

    def _admit(self) -> bool:
        """True when this call goes alone (the gate is closed), False when it is open."""
        if self._open and not self.reason:  # the common case, without the lock
            return False
        with self._gate:
            while True:
                if self.reason:
                    raise BatchStoppedError(self.cause)
                if self._open:
                    return False
                if not self._probing:
                    self._probing = True
                    return True
                self._gate.wait(GATE_POLL_SECONDS)

    def _answered(self, alone: bool, tenant_id: str, exc: BaseException | None) -> None:
        kind = _batch_wide(exc) if exc is not None else None
        if not alone and kind is None and self._open:
            return  # nothing changes: the common case, without the lock
        with self._gate:
            if alone:
                self._probing = False
            self._open = kind is None
            if kind is not None and exc is not None:
                self._count(kind, tenant_id, exc)
            self._gate.notify_all()

    def _count(self, kind: type[BaseException], tenant_id: str, exc: BaseException) -> None:
        """One more tenant failed with `kind` (the lock held); each error counts once."""
        if self.reason or exc in self._counted:
            return
        self._counted.add(exc)
        if kind is not self._kind:
            self._kind, self._tenants = kind, []
        if tenant_id not in self._tenants:
            self._tenants.append(tenant_id)
        if len(self._tenants) >= self.after:
            shown = ", ".join(self._tenants)
            self.detail = f"{len(self._tenants)} tenants in a row ({shown}) failed with {exc}"
            self.error_code = str(getattr(exc, "code", ""))
            self.cause, fix = self._explain(kind, exc)
            self.reason = f"{self.cause}: {fix}"
            self._gate.notify_all()

    def _explain(self, kind: type[BaseException], exc: BaseException) -> tuple[str, str]:
        """What happened, and what to fix, for a stop on `kind` (`exc` the last such error)."""
        status = getattr(exc, "status", "")
        if kind is AuthenticationError:
            return f"Versori refused the API key ({status})", f"check {self.key_setting}"
        if kind is PermissionDeniedError:
            return (
                f"Versori refused the API key for {self.target} ({status} permission denied)",
                f"check that {self.key_setting} belongs to that organisation and may use it",
            )
        return (
            f"Versori does not know {self.target} ({status} not found)",
            f"check {self.ids}, and VERSORI_BASE_URL",
        )


def _batch_wide(exc: BaseException) -> type[BaseException] | None:
    return next((k for k in BATCH_WIDE if isinstance(exc, k)), None)


@dataclass(frozen=True)
class RetryPolicy:
    """How a failure is tried again: `tries` in all (the first included), waiting `first_wait`
    before the second, each next wait `factor` times the last, at most `max_wait` (None: no
    cap). `jitter`: up to this fraction of a wait added at random (by Prefect, for the tasks).
    `honour_retry_after_up_to`: a 429's Retry-After up to this many seconds is waited (when
    longer than the backoff), a longer one ends the tries; None: not this policy's wait (the
    batch's is waited out by the connector's pacer, clamped once in the Versori client)."""

    tries: int
    first_wait: float
    factor: float = 2.0
    jitter: float = 0.0
    max_wait: float | None = None
    honour_retry_after_up_to: float | None = None

    @property
    def retries(self) -> int:
        """The tries after the first."""
        return self.tries - 1

    def wait_before(self, n: int) -> float:
        """The wait before try `n` (2 to `tries`; try 1 waits nothing), jitter left out."""
        if not 2 <= n <= self.tries:
            raise ValueError(f"try {n} is not a retry of {self.tries} tries")
        wait = self.first_wait * self.factor ** (n - 2)
        return wait if self.max_wait is None else min(wait, self.max_wait)

    def waits(self) -> list[float]:
        """The wait before each retry, in order (Prefect's `retry_delay_seconds`)."""
        return [self.wait_before(n) for n in range(2, self.tries + 1)]

    def wait_after(self, exc: BaseException, n: int) -> float | None:
        """The wait before try `n`, try `n - 1` having failed with `exc`; None when there is no
        try `n`: `exc` is not transient, the tries are used up, or its Retry-After is longer
        than this policy waits."""
        if n > self.tries or not is_transient(exc):
            return None
        wait = self.wait_before(n)
        cap = self.honour_retry_after_up_to
        if cap is not None and isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            if exc.retry_after > cap:
                return None
            wait = max(wait, exc.retry_after)
        return wait


# A batch: each slice task's Prefect retries (tasks/slice_tasks.py), 1 s, 2 s, 4 s, plus up to
# half as much again at random. A Retry-After is waited out by the connector's pacer instead.
BATCH_RETRY = RetryPolicy(
    tries=constants.TASK_RETRIES + 1,
    first_wait=constants.TASK_RETRY_BACKOFF_SECONDS,
    factor=2.0,
    jitter=constants.TASK_RETRY_JITTER_FACTOR,
)

# A browser waiting: the connect service's Versori calls inside one request, a few quick tries
# only: 0.25 s, then 0.75 s; a Retry-After of at most 2 s waited, a longer one not. Used only
# for InitialiseOAuth2Connection (a new state each time, safe to try again); never for
# CreateConnection, which is tried ONCE on purpose: a one-time OAuth code is never sent twice.
BROWSER_RETRY = RetryPolicy(
    tries=3, first_wait=0.25, factor=3.0, max_wait=2.0, honour_retry_after_up_to=2.0
)


def batch_retry(settings: RetrySettings) -> RetryPolicy:
    """The batch's policy as the environment sets it (the settings root's `retry`):
    BATCH_RETRY itself, unless ONBOARD_RETRY_BACKOFF_SECONDS sets the first wait."""
    if not settings.is_set:
        return BATCH_RETRY
    return replace(BATCH_RETRY, first_wait=settings.retry_backoff_seconds)


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
