"""Pacing (onboarding/batch/call_pacing.py): calls evenly spaced a little under the rate, never a
burst (after a stall, an idle spell or a 429), across the threads of a process and across the
processes that share a ledger; the brake a 429 applies to them all."""

from __future__ import annotations

import random
import threading
import time
from bisect import bisect_right
from itertools import pairwise
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from onboarding.batch.call_pacing import GUARD_WINDOW, PACE_SHARE, Pacer, Spacing
from onboarding.ledger import Ledger


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def most_in_a_second(times: list[float], window: float = 1.0) -> int:
    """The most calls any sliding window (t - window, t] holds."""
    ordered = sorted(times)
    return max(
        (i + 1 - bisect_right(ordered, t - window) for i, t in enumerate(ordered)), default=0
    )


def test_a_brake_holds_every_caller_until_it_ends() -> None:
    t = FakeTime()
    pacer = Pacer(clock=t.clock, sleep=t.sleep)
    pacer.wait_before_call()
    pacer.hold_off(2.0)
    pacer.hold_off(0.5)  # a shorter brake never shortens a longer one
    pacer.wait_before_call()
    pacer.wait_before_call()
    assert t.slept == [2.0]
    assert pacer.hold_offs == 2


def test_no_rate_means_no_wait() -> None:
    t = FakeTime()
    pacer = Pacer(clock=t.clock, sleep=t.sleep)
    for _ in range(5):
        pacer.wait_before_call()
    assert t.slept == []


def test_calls_are_spaced_a_little_under_the_rate() -> None:
    t = FakeTime()
    spacing = Spacing(10.0, clock=t.clock, sleep=t.sleep)
    calls = []
    for _ in range(30):
        spacing.wait_before_call()
        calls.append(t.now)
    gaps = {round(b - a, 6) for a, b in pairwise(calls)}
    assert gaps == {round(1 / (10 * PACE_SHARE), 6)}
    assert most_in_a_second(calls) <= 10


def test_no_catch_up_burst_after_a_stall() -> None:
    t = FakeTime()
    spacing = Spacing(50.0, clock=t.clock, sleep=t.sleep)
    calls = []
    for _ in range(10):
        spacing.wait_before_call()
        calls.append(t.now)
    t.now += 5.0  # every worker was stuck on slow calls
    for _ in range(60):
        spacing.wait_before_call()
        calls.append(t.now)
    after = calls[10:]
    assert min(b - a for a, b in pairwise(after)) >= spacing.interval - 1e-9
    assert most_in_a_second(calls) <= 50


def test_after_a_429_calls_resume_at_the_pace_not_all_at_once() -> None:
    t = FakeTime()
    spacing = Spacing(50.0, clock=t.clock, sleep=t.sleep)
    calls = []
    for _ in range(5):
        spacing.wait_before_call()
        calls.append(t.now)
    spacing.hold_off(1.0)
    held = t.now
    for _ in range(20):
        spacing.wait_before_call()
        calls.append(t.now)
    resumed = calls[5:]
    assert resumed[0] >= held + 1.0
    assert min(b - a for a, b in pairwise(resumed)) >= spacing.interval - 1e-9


@settings(max_examples=200, deadline=None)
@given(
    rate=st.one_of(
        st.sampled_from([1.0, 7.5, 10.0, 50.0, 200.0]),
        st.floats(min_value=0.5, max_value=500.0),
    ),
    gaps=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=300),
    holds=st.sets(st.integers(min_value=0, max_value=299), max_size=5),
)
def test_no_second_ever_holds_more_than_the_rate(
    rate: float, gaps: list[float], holds: set[int]
) -> None:
    """Whatever the callers do (arrive together, stall, pause) and whatever 429s come back,
    no sliding one-second window holds more calls than the rate."""
    t = FakeTime()
    spacing = Spacing(rate, clock=t.clock, sleep=t.sleep)
    calls = []
    for i, gap in enumerate(gaps):
        t.now += gap
        if i in holds:
            spacing.hold_off(1.0)
        spacing.wait_before_call()
        calls.append(t.now)
    assert most_in_a_second(calls) <= max(1, int(rate))
    # Never two calls closer than the pace (a slot handed out twice, a stretch's last slot
    # landing on the next stretch's first through float drift).
    assert min((b - a for a, b in pairwise(calls)), default=spacing.interval) >= (
        spacing.interval * (1 - 1e-9)
    )


def test_two_processes_on_one_ledger_share_the_rate(tmp_path: Path) -> None:
    """Two pacers on one ledger (as two runs, two chunks or two workers of a profile):
    together, spaced as one, in real time."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    rate, calls = 50.0, 60
    sent: list[float] = []
    lock = threading.Lock()

    def process() -> None:
        spacing = Spacing(rate, name="onboarding-rate-p", times=Ledger(url))
        for _ in range(calls):
            spacing.wait_before_call()
            with lock:
                sent.append(time.monotonic())

    Ledger(url).close()  # the schema, once
    threads = [threading.Thread(target=process) for _ in range(2)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - started
    assert most_in_a_second(sent) <= rate
    assert took >= (2 * calls - 1) / (rate * PACE_SHARE) - 0.05, "the two shared one pace"


def test_a_429_in_one_process_holds_off_the_other(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    first = Spacing(50.0, name="p", times=Ledger(url))
    second = Spacing(50.0, name="p", times=Ledger(url))
    first.wait_before_call()
    first.hold_off(1.0)
    started = time.monotonic()
    first.wait_before_call()  # the brake, then a new stretch after it
    second.wait_before_call()
    assert time.monotonic() - started >= 1.0 - 0.05


def test_threads_that_wake_late_never_bunch_more_than_the_rate_into_the_guard_window() -> None:
    """On a busy machine a thread wakes 5-30 ms after its slot, next to the one after it:
    the guard on calls really sent keeps any GUARD_WINDOW at the rate."""
    rng = random.Random(7)
    t = FakeTime()

    def wakes_late(seconds: float) -> None:
        t.now += seconds + rng.choice([0.0, 0.0, 0.005, 0.03])

    spacing = Spacing(50.0, clock=t.clock, sleep=wakes_late)
    calls = []
    for _ in range(600):
        spacing.wait_before_call()
        calls.append(t.now)
    assert most_in_a_second(calls, GUARD_WINDOW) <= 50
