"""Pacing of initialise calls within one process: an optional limiter (local spacing, or one
shared across processes and machines, supplied by the flow layer) and a hold-off that a 429
applies to every worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Pacer:
    """Before each call, `wait_before_call()`: wait out any hold-off, then take a slot from the
    shared limiter. After a 429, `hold_off(seconds)`: every worker of the process waits until then,
    so a rate-limited API sees the whole process slow down, not just one tenant retry."""

    def __init__(
        self,
        acquire: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._acquire = acquire
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._not_before = 0.0
        self.hold_offs = 0

    def wait_before_call(self) -> None:
        while (delay := self._not_before - self._clock()) > 0:
            self._sleep(delay)
        if self._acquire is not None:
            self._acquire()

    def hold_off(self, seconds: float) -> None:
        with self._lock:
            self._not_before = max(self._not_before, self._clock() + max(seconds, 0.0))
            self.hold_offs += 1


# After a stall, callers may catch up by up to this many seconds' worth of calls, no more: well
# below a second's burst, which is what a rate-limited API is usually sized for.
CATCH_UP_SECONDS = 0.5


class Spacing:
    """Lets callers through at most `rate` a second, evenly spaced, across threads.

    Written here rather than taken from a library: the kept rate limiters (aiolimiter, limits)
    are for asyncio or count windows, and this needs a blocking, thread-safe spacer whose
    catch-up after a stall is bounded; it is a dozen lines."""

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_at = 0.0

    def __call__(self) -> None:
        # One thread at a time is spaced; the others queue on the lock, which is the pace.
        with self._lock:
            wait = self._next_at - self._clock()
            if wait > 0:
                self._sleep(wait)
            self._next_at = max(self._clock() - CATCH_UP_SECONDS, self._next_at) + 1.0 / self.rate
