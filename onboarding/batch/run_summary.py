"""A run's summary: its counts and a sample of its tenants' rows, as the flows return it, a chunk
stores it in the ledger (`batch_chunks.summary`) for its parent on another machine, and the CLI
prints it. `to_json` and `from_json` are its wire format, versioned (`"version"`): a summary of
an older version (the unversioned dicts the first one wrote, still in ledgers) is read, one of a
newer version refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onboarding.errors import InputError

# The wire format's version: raise it when a field changes meaning or goes away (a new field
# with a default needs no new version), and teach from_json the older ones.
SUMMARY_VERSION = 1

# A row of a run's table (TenantOutcome.rows): tenant_id, connector, status, link_host,
# masked_state, error_code, error_message.
Row = dict[str, str]


@dataclass(frozen=True)
class RunSummary:
    """The counts of a run (or a chunk of one), `outcomes` a sample of its rows (failures
    first, `outcomes_left_out` the rest), and what the run was about. Everything here may be
    shown: no link, state or address."""

    total: int = 0
    failed: int = 0
    skipped: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    # A campaign's counts for each connector (by profile name); empty for one connector.
    by_connector: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    skipped_why: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    outcomes: list[Row] = field(default_factory=list)
    outcomes_left_out: int = 0
    # Failures whose error a retry alone does not change (a 4xx, a refused link).
    failed_not_transient: int = 0
    # Each connector that stopped the batch (by profile name): reason, cause, detail, error_code.
    stopped: dict[str, dict[str, str]] = field(default_factory=dict)
    # What the run was about, where the flow says it (None: not said).
    profile: str | None = None
    roster: str | None = None
    deliver: str | None = None
    connector_id: str | None = None
    connector_names: dict[str, str] = field(default_factory=dict)
    dry_run: bool | None = None
    funnel: dict[str, str] = field(default_factory=dict)
    coverage: dict[str, int] | None = None
    expired: int | None = None
    chunk: int | None = None
    first: int | None = None
    stop: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON, with `"version"`; fields left unsaid (None, or an optional
        count or mapping that is empty) are left out, as the unversioned format did."""
        body: dict[str, Any] = {"version": SUMMARY_VERSION}
        for name in _ABOUT:
            value = getattr(self, name)
            if value is not None and value != {}:
                body[name] = value
        body |= {
            "total": self.total,
            "failed": self.failed,
            "skipped": self.skipped,
            "by_status": dict(self.by_status),
            "by_connector": {name: dict(c) for name, c in self.by_connector.items()},
            "errors": dict(self.errors),
            "skipped_why": dict(self.skipped_why),
            "seconds": self.seconds,
            "outcomes": [dict(r) for r in self.outcomes],
            "outcomes_left_out": self.outcomes_left_out,
        }
        if self.failed_not_transient:
            body["failed_not_transient"] = self.failed_not_transient
        if self.stopped:
            body["stopped"] = {name: dict(s) for name, s in self.stopped.items()}
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RunSummary:
        """A summary from `to_json`'s output, or from the unversioned dict written before it
        (version 0: the same keys, any of them missing). A newer version is refused."""
        version = body.get("version", 0)
        if not isinstance(version, int) or version > SUMMARY_VERSION:
            raise InputError(
                f"a run summary of version {version!r} was written by a newer version of this "
                f"tool (this one reads up to version {SUMMARY_VERSION}); upgrade this one"
            )
        known = {k: v for k, v in body.items() if k in _FIELDS}
        by_status = dict(known.get("by_status", {}))
        known.setdefault("total", sum(by_status.values()))
        known.setdefault("failed", by_status.get("failed", 0))
        known.setdefault("skipped", by_status.get("skipped", 0))
        known["outcomes"] = [dict(r) for r in known.get("outcomes", [])]
        return cls(**known)


_ABOUT = (
    "profile",
    "roster",
    "deliver",
    "connector_id",
    "connector_names",
    "dry_run",
    "chunk",
    "first",
    "stop",
    "expired",
    "funnel",
    "coverage",
)
_FIELDS = frozenset(RunSummary.__dataclass_fields__)
