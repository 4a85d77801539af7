"""A run's summary: its counts and a sample of its tenants' outcomes, published as a table
and a markdown artifact, and the run's final state."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from onboarding.batch.outcomes import OutcomeStatus, TenantOutcome
from onboarding.batch.run_summary import RunSummary
from onboarding.errors import is_transient

TABLE_ROWS_MAX = 1000


class OutcomeCounts:
    """A batch's counts, and a sample of its outcomes for the table: every failure up to `keep`,
    then others until `keep` rows in all. Memory stays flat however many tenants go by; the
    ledger (`onboard export`) has every tenant."""

    def __init__(self, keep: int = TABLE_ROWS_MAX) -> None:
        self.keep = keep
        self.by_status: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        # Why tenants were skipped (already delivered; another run holds it), where it is said.
        self.skipped_why: Counter[str] = Counter()
        # A campaign's counts for each connector (by name), from its tenants' parts.
        self.by_connector: dict[str, Counter[str]] = {}
        self.rows_seen = 0  # table rows offered: one per tenant, or per (tenant, connector)
        # Failures (per tenant and connector) whose error a retry alone does not change (a
        # 4xx, a refused link): the next run tries them again, but fails them the same way.
        self.failed_not_transient = 0
        # Each connector that stopped the batch (by profile name): its reason, what caused
        # it, which tenants, and the error code (flows/batching/slices.stops_of).
        self.stopped: dict[str, dict[str, str]] = {}
        self._failed: list[dict[str, str]] = []
        self._others: list[dict[str, str]] = []

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    def add(self, outcome: TenantOutcome) -> None:
        self.by_status[outcome.status.value] += 1
        if outcome.status is OutcomeStatus.SKIPPED and outcome.error_message:
            self.skipped_why[outcome.error_message] += 1
        for part in outcome.parts:
            self.by_connector.setdefault(part.connector, Counter())[part.status.value] += 1
        for part in outcome.parts or (outcome,):
            cause = part.cause
            if (
                part.status is OutcomeStatus.FAILED
                and cause is not None
                and not is_transient(cause)
            ):
                self.failed_not_transient += 1
        for row in outcome.rows():
            if row["error_code"]:
                self.errors[row["error_code"]] += 1
            self._keep(row)

    def merge(self, summary: RunSummary) -> None:
        """Fold in another batch's summary (a chunk's), sample included."""
        self.by_status.update(summary.by_status)
        self.errors.update(summary.errors)
        self.skipped_why.update(summary.skipped_why)
        for name, counts in summary.by_connector.items():
            self.by_connector.setdefault(name, Counter()).update(counts)
        for row in summary.outcomes:
            self._keep(row)
        self.rows_seen += summary.outcomes_left_out
        self.failed_not_transient += summary.failed_not_transient
        self.stopped.update(summary.stopped)

    def _keep(self, row: dict[str, str]) -> None:
        self.rows_seen += 1
        failed = row["status"] == "failed"
        if failed and len(self._failed) < self.keep:
            self._failed.append(row)
        elif not failed and len(self._failed) + len(self._others) < self.keep:
            self._others.append(row)

    def rows(self) -> list[dict[str, str]]:
        """Failures first, each part in tenant order; at most `keep`."""
        ordered = sorted(self._failed, key=lambda r: r["tenant_id"])
        ordered += sorted(self._others, key=lambda r: r["tenant_id"])
        return ordered[: self.keep]

    @classmethod
    def of(cls, outcomes: Iterable[TenantOutcome]) -> OutcomeCounts:
        tally = cls()
        for outcome in outcomes:
            tally.add(outcome)
        return tally


def summarise(tally: OutcomeCounts, seconds: float, **about: Any) -> RunSummary:
    """A run's result: counts, and `outcomes`, the table's sample (every tenant up to 1,000);
    `about`: RunSummary's fields saying what the run was about (profile, dry_run, ...)."""
    rows = tally.rows()
    return RunSummary(
        **about,
        total=tally.total,
        failed=tally.by_status.get("failed", 0),
        skipped=tally.by_status.get("skipped", 0),
        by_status=dict(tally.by_status),
        by_connector={name: dict(counts) for name, counts in tally.by_connector.items()},
        errors=dict(tally.errors),
        skipped_why=dict(tally.skipped_why),
        seconds=round(seconds, 2),
        outcomes=rows,
        outcomes_left_out=max(0, tally.rows_seen - len(rows)),
        failed_not_transient=tally.failed_not_transient,
        stopped=dict(tally.stopped),
    )


def publish(key: str, title: str, source: str, summary: RunSummary) -> None:
    """The table and summary artifacts, under keys stable per profile so the UI keeps history.
    Connectors are named as people read them: by display name (`connector_names`, from each
    profile's name), and a stopped batch says why and what to fix."""
    campaign = bool(summary.by_connector)
    names = summary.connector_names
    rows = [
        {
            "tenant": o["tenant_id"],
            **({"connector": _named(o.get("connector", ""), names)} if campaign else {}),
            "status": o["status"],
            "link host": o["link_host"],
            "state": o["masked_state"],
            "error": f"{o['error_code']}: {o['error_message']}" if o["error_code"] else "",
        }
        for o in summary.outcomes
    ]
    cut = summary.outcomes_left_out
    create_table_artifact(
        key=key,
        table=rows,
        description=f"Tenants of {source}"
        + (f" (first {len(rows)}, failures first; `onboard export` has all)" if cut else ""),
    )
    lines = [
        f"# {title}{' (dry run)' if summary.dry_run else ''}",
        "",
        f"{source}: {summary.total} tenant(s) in {summary.seconds} s.",
        "",
        "| status | tenants |",
        "| --- | --- |",
        *(f"| {status} | {n} |" for status, n in sorted(summary.by_status.items())),
        *(f"\n{n} skipped: {why}." for why, n in summary.skipped_why.items()),
    ]
    for name, stop in summary.stopped.items():
        lines += ["", f"**The batch stopped** ({_named(name, names)}): {stop['reason']}."]
        if stop["detail"]:
            lines.append(f"{stop['detail']}; no tenant after them was called.")
    if campaign:
        statuses = sorted({s for counts in summary.by_connector.values() for s in counts})
        lines += ["", f"| connector | {' | '.join(statuses)} |", "|---" * (len(statuses) + 1) + "|"]
        lines += [
            f"| {_named(name, names)} | {' | '.join(str(counts.get(s, 0)) for s in statuses)} |"
            for name, counts in summary.by_connector.items()
        ]
    if summary.funnel:
        lines += [
            "",
            "Funnel in the ledger (linked → delivered → opened → started → connected):",
            "",
        ]
        lines += [f"- {name}: {line}" for name, line in summary.funnel.items()]
    if summary.coverage:
        c = summary.coverage
        lines += [
            "",
            f"Ledger, over these {len(summary.by_connector) or 1} connector(s): "
            f"{c['fully']} tenant(s) fully connected, {c['partly']} partly, "
            f"{c['none']} not at all.",
        ]
    if summary.errors:
        lines += ["", "| error | tenants |", "| --- | --- |"]
        lines += [f"| {code} | {n} |" for code, n in Counter(summary.errors).most_common()]
    create_markdown_artifact(key=key.replace("-", "-summary-", 1), markdown="\n".join(lines))


def final_state(summary: RunSummary, done: str) -> State[dict[str, Any]]:
    """Completed when no tenant failed; Failed, after every tenant was tried, when any did.
    Its data, the flow's result, is the summary's wire format (RunSummary.to_json): a run's
    result is read by other processes (the CLI, a deployment's caller)."""
    data = summary.to_json()
    if summary.stopped:
        # The cause alone: what to fix is in the log and the summary artifact (a CLI run
        # prints it once, at its end, and Prefect prints this message too).
        causes = "; ".join(dict.fromkeys(s["cause"] for s in summary.stopped.values()))
        return Failed(
            message=f"{summary.failed} of {summary.total} tenant(s) failed: the batch "
            f"stopped because {causes}",
            data=data,
        )
    if summary.failed:
        return Failed(
            message=f"{summary.failed} of {summary.total} tenant(s) failed; "
            "the next run retries them",
            data=data,
        )
    why = "; ".join(f"{n} skipped: {w}" for w, n in summary.skipped_why.items())
    message = f"{summary.total} tenant(s) {done}" + (f" ({why})" if why else "")
    return Completed(message=message, data=data)


def _named(connector: str, names: dict[str, str]) -> str:
    """A connector as people read it: its profile's display name, where the summary has it."""
    return names.get(connector, connector)
