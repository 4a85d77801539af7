"""RetryPolicy: the one set of retry numbers, a batch's and a waiting browser's."""

from __future__ import annotations

import pytest

from onboarding import constants
from onboarding.batch.retry_policy import BATCH_RETRY, BROWSER_RETRY, RetryPolicy, batch_retry
from onboarding.errors import AuthenticationError, RateLimitedError, ServerError
from onboarding.settings import RetrySettings


def _rate_limited(retry_after: float | None) -> RateLimitedError:
    return RateLimitedError(429, "rate_limited", "slow down", retry_after=retry_after)


def test_the_batch_waits_one_two_four_seconds_with_half_again_of_jitter() -> None:
    assert BATCH_RETRY.retries == constants.TASK_RETRIES == 3
    assert BATCH_RETRY.waits() == [1.0, 2.0, 4.0]
    assert BATCH_RETRY.jitter == constants.TASK_RETRY_JITTER_FACTOR == 0.5
    assert BATCH_RETRY.honour_retry_after_up_to is None  # the pacer waits a Retry-After out


def test_the_batch_policy_takes_its_first_wait_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert batch_retry(RetrySettings()) is BATCH_RETRY
    monkeypatch.setenv("ONBOARD_RETRY_BACKOFF_SECONDS", "0.25")
    faster = batch_retry(RetrySettings())
    assert faster.waits() == [0.25, 0.5, 1.0]
    assert (faster.tries, faster.jitter) == (BATCH_RETRY.tries, BATCH_RETRY.jitter)


def test_a_browser_waits_a_quarter_then_three_quarters_of_a_second() -> None:
    assert BROWSER_RETRY.tries == 3
    assert BROWSER_RETRY.waits() == [0.25, 0.75]
    assert BROWSER_RETRY.wait_after(ServerError(503, "unavailable", "busy"), 2) == 0.25
    assert BROWSER_RETRY.wait_after(ServerError(503, "unavailable", "busy"), 3) == 0.75
    assert BROWSER_RETRY.wait_after(ServerError(503, "unavailable", "busy"), 4) is None
    assert BROWSER_RETRY.wait_after(AuthenticationError(401, "unauthorized", "no"), 2) is None


def test_a_retry_after_is_honoured_up_to_its_cap_and_no_further() -> None:
    assert BROWSER_RETRY.wait_after(_rate_limited(None), 2) == 0.25
    assert BROWSER_RETRY.wait_after(_rate_limited(0.1), 2) == 0.25  # the backoff is longer
    assert BROWSER_RETRY.wait_after(_rate_limited(1.5), 2) == 1.5
    assert BROWSER_RETRY.wait_after(_rate_limited(2.0), 3) == 2.0
    assert BROWSER_RETRY.wait_after(_rate_limited(2.5), 2) is None  # longer: not waited here


def test_waits_grow_by_the_factor_up_to_the_cap() -> None:
    policy = RetryPolicy(tries=5, first_wait=1.0, factor=3.0, max_wait=5.0)
    assert policy.waits() == [1.0, 3.0, 5.0, 5.0]
    with pytest.raises(ValueError):
        policy.wait_before(1)
    with pytest.raises(ValueError):
        policy.wait_before(6)
