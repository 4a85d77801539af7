"""The task's retry decision: transient failures only, without sleeping in Prefect's retry
condition (a Retry-After is waited out by the connector's pacer, before its next call)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from onboarding import constants
from onboarding.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    LinkCheckError,
    NotFoundError,
    RateLimitedError,
    RetryableStatusError,
    ServerError,
)
from tasks import slice_tasks


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    calls: list[float] = []
    monkeypatch.setattr(time, "sleep", calls.append)
    return calls


def decide(exc: BaseException) -> bool:
    state: Any = Failed(data=exc)
    return slice_tasks.retry_transient(slice_tasks.onboard_slice_task, None, state)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (ServerError(503, "unavailable", "down"), True),
        (ServerError(500, "internal", "boom"), True),
        (RetryableStatusError(408, "timeout", "slow"), True),
        (RetryableStatusError(425, "too_early", "early"), True),
        (RateLimitedError(429, "rate_limited", "slow down"), True),
        (APIConnectionError("refused"), True),
        (APITimeoutError("timed out"), True),
        (BadRequestError(400, "validation_failed", "bad"), False),
        (AuthenticationError(401, "unauthenticated", "key"), False),
        (NotFoundError(404, "not_found", "none"), False),
        (LinkCheckError(["has no state"]), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_transient_failures_are_retried(
    exc: BaseException, retried: bool, slept: list[float]
) -> None:
    assert decide(exc) is retried
    assert slept == []


def test_a_retry_after_is_not_slept_in_the_retry_condition(slept: list[float]) -> None:
    assert decide(RateLimitedError(429, "rate_limited", "slow", retry_after=7.0)) is True
    assert slept == [], "the pacer holds calls off; Prefect's engine thread is not blocked"


def test_a_completed_state_is_not_retried(slept: list[float]) -> None:
    state: Any = Completed(data=1)
    assert slice_tasks.retry_transient(slice_tasks.onboard_slice_task, None, state) is False  # type: ignore[arg-type]


def test_a_slice_is_retried_when_some_of_its_tenants_may_be_retried(slept: list[float]) -> None:
    from onboarding.batch.outcomes import TenantOutcome
    from onboarding.batch.tenant_slices import SliceFailed

    failed = TenantOutcome("t2", "failed", error_code="rate_limited")
    ok = TenantOutcome("t1", "delivered")
    retry: dict[str, BaseException] = {
        "t2": RateLimitedError(429, "rate_limited", "slow", retry_after=4.0)
    }
    assert decide(SliceFailed("tenants 1-2", [ok, failed], retry)) is True
    assert slept == []
    final = TenantOutcome("t2", "failed", error_code="validation_failed")
    assert decide(SliceFailed("tenants 1-2", [ok, final], {})) is False


def test_task_declares_retries_with_backoff_and_jitter() -> None:
    for task in (slice_tasks.onboard_slice_task, slice_tasks.remind_slice_task):
        check_policy(task)


def check_policy(task: Any) -> None:
    assert task.retries == constants.TASK_RETRIES
    assert task.retry_delay_seconds == [1.0, 2.0, 4.0]
    assert task.retry_jitter_factor == constants.TASK_RETRY_JITTER_FACTOR
    assert task.cache_policy is NO_CACHE, "a side-effecting task must never be served from cache"
