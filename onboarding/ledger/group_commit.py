"""Group commit: rows that many threads write at once, committed together by one writer thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# How long the writer lets rows gather when nobody waits for them (a batch that stores its
# links hands each one over and goes on to its next call): about 15 links at 300 a second.
LINGER_SECONDS = 0.05
# The most rows in one transaction.
GROUP_MAX = 500
# A writer with nothing to do for this long ends; the next row starts another.
IDLE_SECONDS = 2.0


class Written:
    """A row handed to GroupCommit.submit: `wait()` until it is committed (raising the error
    that kept it out of the ledger); `then`, given to submit, ran before `wait` returns."""

    __slots__ = ("_error", "_owner", "done", "row", "then", "urgent")

    def __init__(
        self, row: dict[str, Any], then: Callable[[], None] | None, owner: GroupCommit
    ) -> None:
        self.row = row
        self.then = then
        self.done = threading.Event()
        self.urgent = False
        self._error: Exception | None = None
        self._owner = owner

    def wait(self) -> None:
        """Until the row is committed; raises its error if it could not be."""
        if not self.done.is_set():
            self._owner.hurry(self)
            self.done.wait()
        if self._error is not None:
            raise self._error


class GroupCommit:
    """Rows that many threads write at once, committed together: one writer thread takes every
    row handed to it since its last transaction and commits them in one (an executemany).

    `write` returns once its row is committed (so a crash never loses a row a caller was told
    is written); `submit` returns at once, with a `Written` to wait on later, and the writer
    lets such rows gather for up to LINGER_SECONDS, so that a batch whose threads never wait
    for their rows commits them in groups of a dozen or more. A row someone waits for is
    committed at once, with what is there.

    Measured (record_link, fresh ledger, CPU a row): SQLite 114 us alone, 41 in groups of 16,
    34 in groups of 256; PostgreSQL 550, 78 and 38. A group that fails is written again row
    by row, so one bad row fails only its own caller. The same (tenant_id, connector_id)
    twice in one group would supersede the wrong state: the second waits for the next one."""

    def __init__(
        self,
        flush: Callable[[list[dict[str, Any]]], None],
        *,
        linger: float = LINGER_SECONDS,
        name: str = "ledger-writer",
    ) -> None:
        self._flush = flush
        self._linger = linger
        self._name = name
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._pending: list[Written] = []
        self._urgent = False
        self._writer: threading.Thread | None = None

    def write(self, row: dict[str, Any]) -> None:
        """Commit `row`; returns once it is committed, or raises why it could not be."""
        self.submit(row).wait()

    def submit(self, row: dict[str, Any], then: Callable[[], None] | None = None) -> Written:
        """Hand `row` to the writer and return at once. `then` is called (in the writer's
        thread) once the row is committed, never when it failed; it must not raise."""
        written = Written(row, then, self)
        with self._lock:
            self._pending.append(written)
            if self._writer is None:
                self._start_writer()
            elif len(self._pending) in (1, GROUP_MAX):  # it waits for a first row, or a full group
                self._work.notify()
        return written

    def _start_writer(self) -> None:
        """(The lock held.)"""
        self._writer = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._writer.start()

    def hurry(self, written: Written) -> None:
        """Someone waits for `written`: commit what is there without lingering."""
        with self._lock:
            written.urgent = self._urgent = True
            self._work.notify()

    def _run(self) -> None:
        group: list[Written] = []
        try:
            while (next_group := self._next_group()) is not None:
                group = next_group
                self._commit(group)
                group = []
        finally:  # only on something like SystemExit: fail its rows, and let a new writer go on
            for written in group:
                if not written.done.is_set():
                    written._error = RuntimeError("the ledger's writer thread ended")
                    written.done.set()
            with self._lock:
                if self._writer is threading.current_thread():
                    self._writer = None
                    if self._pending:
                        self._start_writer()

    def _next_group(self) -> list[Written] | None:
        """The rows of the next transaction, once there are some (None: idle too long, end)."""
        with self._lock:
            idle_until = time.monotonic() + IDLE_SECONDS
            while not self._pending:
                left = idle_until - time.monotonic()
                if left <= 0:
                    self._writer = None
                    return None
                self._work.wait(left)
            linger_until = time.monotonic() + self._linger
            while not self._urgent and len(self._pending) < GROUP_MAX:
                left = linger_until - time.monotonic()
                if left <= 0:
                    break
                self._work.wait(left)
            group: list[Written] = []
            later: list[Written] = []
            keys: set[tuple[str, str]] = set()
            for written in self._pending:
                key = (written.row["tenant_id"], written.row["connector_id"])
                (later if key in keys or len(group) >= GROUP_MAX else group).append(written)
                keys.add(key)
            self._pending = later
            self._urgent = any(w.urgent for w in later)
            return group

    def _commit(self, group: list[Written]) -> None:
        """One transaction for the group (row by row if it fails); then each row's `then`, and
        its waiter woken. Never raises: a waiter must never be left waiting."""
        try:
            self._flush([w.row for w in group])
        except Exception:
            for written in group:
                try:
                    self._flush([written.row])
                except Exception as err:
                    written._error = err
        for written in group:
            if written._error is None and written.then is not None:
                try:
                    written.then()
                except Exception:
                    log.exception("after committing a row, its follow-up failed")
            written.done.set()
