"""Group commit: writes that many threads make at once, committed together."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class GroupCommit:
    """Writes that many threads make at once, committed together: each caller returns only
    once its own row is committed (so a crash never loses a row a caller was told is written),
    but the rows that arrived while one transaction ran go in the next one, as one executemany.

    Measured (SQLite, record_link): 0.51 ms of CPU a row one at a time, 0.16 in groups of 4,
    0.07 in groups of 16; a batch of 16 threads forms groups of that size by itself. Written
    here because SQLAlchemy has no group commit, and a queue with a writer thread would cost
    a thread switch per row. A group that fails is written again row by row, so one bad row
    fails only its own caller."""

    def __init__(self, flush: Callable[[list[dict[str, Any]]], None]) -> None:
        self._flush = flush
        self._lock = threading.Lock()
        self._pending: list[_Waiter] = []
        self._leading = False

    def write(self, row: dict[str, Any]) -> None:
        me = _Waiter(row)
        with self._lock:
            self._pending.append(me)
            lead = not self._leading
            self._leading = True
        if not lead:
            me.wake.wait()  # committed, or handed the lead
        while not me.committed:
            self._commit_one_group(me)
        if me.error is not None:
            raise me.error

    def _commit_one_group(self, leader: _Waiter) -> None:
        """Commit what is pending, then hand the lead to a waiting caller (so that no caller
        serves the others for ever), or keep it while the leader's own row is still waiting."""
        with self._lock:
            group: list[_Waiter] = []
            later: list[_Waiter] = []
            keys: set[tuple[str, str]] = set()
            for waiter in self._pending:
                key = (waiter.row["tenant_id"], waiter.row["connector_id"])
                # The same tenant twice in one group would supersede the wrong state.
                (later if key in keys else group).append(waiter)
                keys.add(key)
            self._pending = later
        try:
            self._flush([w.row for w in group])
        except Exception:
            for waiter in group:
                try:
                    self._flush([waiter.row])
                except Exception as err:
                    waiter.error = err
        with self._lock:
            for waiter in group:
                waiter.committed = True
                if waiter is not leader:
                    waiter.wake.set()
            if not leader.committed:
                return  # its row was held back: it leads the next group itself
            if self._pending:
                self._pending[0].wake.set()  # not committed: it wakes up as the leader
            else:
                self._leading = False


@dataclass(slots=True, eq=False)
class _Waiter:
    row: dict[str, Any]
    wake: threading.Event = field(default_factory=threading.Event)
    committed: bool = False
    error: Exception | None = None
