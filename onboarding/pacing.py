"""Pacing of initialise calls within one process: an optional shared limiter (across processes
and machines, supplied by the flow layer) and a brake that a 429 applies to every worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Pacer:
    """Before each call, `wait_turn()`: wait out any brake, then take a slot from the shared
    limiter. After a 429, `brake(seconds)`: every worker of the process holds off until then,
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
        self.brakes = 0

    def wait_turn(self) -> None:
        while (delay := self._not_before - self._clock()) > 0:
            self._sleep(delay)
        if self._acquire is not None:
            self._acquire()

    def brake(self, seconds: float) -> None:
        with self._lock:
            self._not_before = max(self._not_before, self._clock() + max(seconds, 0.0))
            self.brakes += 1
