"""What the `onboard` commands print: a run's outcomes (its table, its failures grouped by
error, the closing line saying what next), an interrupted run's report, `onboard status`'s
table, and the console's log filter. deployments/cli.py parses the options and calls these."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from contextlib import closing
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from onboarding.batch.run_summary import Row, RunSummary

if TYPE_CHECKING:
    from onboarding.batch.run_request import RunInputs
    from onboarding.ledger import Ledger, Record, RunProgress

out = Console()
err = Console(stderr=True)


def quiet_task_logs(verbose: bool) -> None:
    """One INFO line per task run drowns the progress lines in a batch of thousands; and each
    tenant's failure, which the command prints at its end grouped by error, is left out of
    the console (not of the run's logs on the Prefect server). --verbose shows them all."""
    if verbose:
        return
    import prefect  # noqa: F401  # its logging set up, console handler included

    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler":
            handler.addFilter(SaidAtTheEnd())


class SaidAtTheEnd(logging.Filter):
    """Leaves out of the console the lines `onboard run` says again at its end, once: each
    tenant's failure (the slice task's warning; Prefect's "Task run failed with" and
    "Finished in state Failed" lines for an error of ours) and the batch's stop. A failure
    that is not one of ours (a bug, a crash) stays, traceback and all."""

    _FAILED = re.compile(r"Finished in state Failed\('Task run encountered an exception (\w+):")

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "onboarding_stop", False):
            return False
        if not record.name.startswith("prefect.task_runs") or record.levelno < logging.WARNING:
            return True
        if record.msg == "%s %s failed%s: %s: %s":  # tasks/slice_tasks.py, one per tenant
            return False
        from onboarding.errors import OnboardingError

        if record.exc_info and isinstance(record.exc_info[1], OnboardingError):
            return False
        failed = self._FAILED.match(record.getMessage())
        return not (failed and failed.group(1) in _names_of(OnboardingError))


def _names_of(cls: type[Exception]) -> set[str]:
    """The names of `cls` and every subclass of it loaded so far."""
    names = {cls.__name__}
    for sub in cls.__subclasses__():
        names |= _names_of(sub)
    return names


def report_interrupted_run(inputs: RunInputs, ledger_url: str) -> None:
    """What `onboard run` prints when interrupted: how far the roster got, per connector, read
    from the ledger at `ledger_url` (the truth, whatever the flow managed to say). Counts
    only: no link, state or address."""
    from onboarding.ledger import Ledger, run_progress

    assert inputs.roster is not None
    ids = {t.tenant_id for t in inputs.roster}
    lines = []
    with closing(Ledger(ledger_url)) as ledger:
        for connector in inputs.profiles:
            records = ledger.iter_records(connector.target_id)
            seen = Counter(run_progress(r.status) for r in records if r.tenant_id in ids)
            lines.append(_interrupted_counts(seen, len(ids)))
    again = "run the same command again to finish (it skips what is done)"
    if len(inputs.profiles) == 1:
        out.print(f"Interrupted: {lines[0]}; {again}.", highlight=False, soft_wrap=True)
        return
    out.print(f"Interrupted; {again}. How far each connector got:", highlight=False)
    for connector, line in zip(inputs.profiles, lines, strict=True):
        out.print(f"  {connector.name}: {line}", highlight=False, soft_wrap=True)


def _interrupted_counts(seen: Counter[RunProgress], total: int) -> str:
    from onboarding.ledger import RunProgress

    done, failed, begun = (
        seen[k] for k in (RunProgress.DONE, RunProgress.FAILED, RunProgress.BEGUN)
    )
    rest = total - done - failed - begun
    in_progress = f", {begun} in progress when stopped" if begun else ""
    not_started = f", the rest ({rest}) not started" if rest else ""
    return f"{done} of {total} tenant(s) delivered, {failed} failed{in_progress}{not_started}"


def print_outcomes(summary: RunSummary, everything: bool) -> None:
    """A run's outcome: every tenant in a table (`everything`: a dry run, reminders, the
    demo), else its failures grouped by error, one line a group; then the counts."""
    names: dict[str, str] = summary.connector_names
    campaign = bool(summary.by_connector)
    if everything:
        _print_table(sorted(summary.outcomes, key=lambda r: r["tenant_id"]), campaign, names)
    else:
        for line in failure_lines(summary):
            out.print(line, highlight=False, markup=False, soft_wrap=True)
    if summary.outcomes_left_out:
        out.print(
            f"…and {summary.outcomes_left_out} more tenant(s) not listed here: "
            "`onboard status` and `onboard export` show the ledger."
        )
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.by_status.items()))
    out.print(
        f"[bold]{summary.total}[/] tenant(s) in {summary.seconds} s: {counts or 'nothing to do'}",
        highlight=False,
    )
    for why, n in summary.skipped_why.items():
        out.print(f"  {n} skipped: {why}", highlight=False)
    for name, by_status in summary.by_connector.items():
        counts = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
        out.print(f"  {_named(name, names)}: {counts}", highlight=False)
    if summary.coverage:
        c = summary.coverage
        out.print(
            f"Ledger: {c['fully']} tenant(s) connected to every one of these connectors, "
            f"{c['partly']} to some, {c['none']} to none.",
            highlight=False,
        )


def _print_table(rows: list[Row], campaign: bool, names: dict[str, str]) -> None:
    if not rows:
        return
    table = Table(title="Tenants")
    columns = ["tenant", "connector", "status", "link host", "state", "error"]
    for column in columns if campaign else [c for c in columns if c != "connector"]:
        # Only the error wraps: ids and hosts are copied, so each stays whole on one line.
        table.add_column(column, no_wrap=column != "error")
    for r in rows:
        style = "red" if r["status"] == "failed" else ""
        error = r["error_message"] or r["error_code"]
        connector = _named(r.get("connector", ""), names)
        cells = [r["tenant_id"], connector, r["status"], r["link_host"]]
        cells = cells if campaign else [cells[0], *cells[2:]]
        table.add_row(*cells, r["masked_state"], error, style=style)
    out.print(table)


# Tenant ids a failure line shows, at most.
SHOWN_IDS = 5


def failure_lines(summary: RunSummary) -> list[str]:
    """The failed tenants grouped by error, one line a group (its connector named in a
    campaign), largest first. A connector that stopped the batch is one line: the tenants
    that got the error that stopped it, and those not called after it."""
    names: dict[str, str] = summary.connector_names
    stops: dict[str, dict[str, str]] = summary.stopped
    groups: dict[tuple[str, str, str], list[str]] = {}
    answered: dict[str, tuple[str, list[str]]] = {}  # a stopped connector's: message, ids
    not_called: dict[str, list[str]] = {}
    for r in summary.outcomes:
        if r["status"] != "failed":
            continue
        connector = r.get("connector", "")
        # A run of one connector names none in its rows: its stop is the only one.
        stop = stops.get(connector) or (next(iter(stops.values()), None) if not connector else None)
        said = r["error_message"] or r["error_code"]
        if stop is not None and r["error_code"] == "not_attempted":
            not_called.setdefault(connector, []).append(r["tenant_id"])
        elif stop is not None and r["error_code"] == stop["error_code"]:
            answered.setdefault(connector, (said, []))[1].append(r["tenant_id"])
        else:
            groups.setdefault((connector, r["error_code"], said), []).append(r["tenant_id"])
    lines = []
    for connector in dict.fromkeys([*answered, *not_called]):
        stop = stops.get(connector) or next(iter(stops.values()))
        message, ids = answered.get(connector, ("", []))
        untried = not_called.get(connector, [])
        parts = [f"{len(ids)} answered {message} ({_ids(ids)})"] if ids else []
        parts += [f"{len(untried)} not called after that"] if untried else []
        where = f"{_named(connector, names)}: " if connector else ""
        total = _tenants(len(ids) + len(untried))
        lines.append(f"{where}{total} failed because {stop['cause']}: " + ", ".join(parts))
    for (connector, code, message), ids in sorted(groups.items(), key=lambda g: -len(g[1])):
        where = f"{_named(connector, names)}: " if connector else ""
        said = message if code in message else f"{code}: {message}"
        lines.append(f"{where}{_tenants(len(ids))} failed: {said} ({_ids(ids)})")
    return lines


def _ids(ids: list[str]) -> str:
    more = f", +{len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
    return ", ".join(ids[:SHOWN_IDS]) + more


def _tenants(n: int) -> str:
    return f"{n} tenant" if n == 1 else f"{n} tenants"


def what_next(summary: RunSummary) -> str:
    """The closing line of a run with failures: what stopped it and what to fix, or whether
    the next run can be expected to do better by itself."""
    failed = summary.failed
    stops = summary.stopped
    if stops:
        names = summary.connector_names
        campaign = len(names) > 1
        reasons = "; ".join(
            (f"{_named(name, names)}: " if campaign else "") + stop["reason"]
            for name, stop in stops.items()
        )
        return (
            f"The batch stopped: {reasons}. Fix that, then run the same command again to retry "
            f"the {failed} failed tenant(s); until it is fixed, a run fails them the same way."
        )
    lasting = summary.failed_not_transient
    if lasting:
        return (
            f"The next `onboard run` tries the failed tenants again, but {lasting} of them "
            "failed for a reason a retry alone does not change: fix what their error says first."
        )
    return "The next `onboard run` retries the failed tenants."


def _named(name: str, names: dict[str, str]) -> str:
    """A connector of a run's summary (by its profile's name) as people read it, with its
    display name from the summary's `connector_names`."""
    return connector_label(name, names.get(name, ""))


def connector_label(name: str, display_name: str) -> str:
    """'acme-crm (Acme CRM)': the name the ledger and files use, and the one people read."""
    return name if not display_name or display_name == name else f"{name} ({display_name})"


def send_connected_event(record: Record) -> None:
    """The event the record-connection flow sends, built as it builds it (with no flow run to
    relate it to), posted to the Prefect API's /events with httpx: importing Prefect's client
    alone takes longer (1.3 to 2.7 s) than this whole command should."""
    api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not api:
        out.print("No event sent: no Prefect server is configured (PREFECT_API_URL is not set).")
        return
    import httpx

    from onboarding.batch.outcomes import StatusChange
    from onboarding.batch.tenant_events import api_headers, tenant_event

    change = StatusChange(
        record.tenant_id,
        record.connector_id,
        record.profile,
        "connected",
        connection_id=record.connection_id,
    )
    event, headers = tenant_event(change), api_headers()
    try:
        response = httpx.post(f"{api}/events", json=[event], headers=headers, timeout=10)
        reason = "" if response.is_success else f"HTTP {response.status_code}"
    except httpx.HTTPError as error:
        reason = type(error).__name__
    if reason:
        err.print(
            f"The event was not sent to {api} ({reason}); the ledger has the connection.",
            highlight=False,
            soft_wrap=True,
        )
    else:
        out.print(f"Event {event['event']} sent to {api}.", highlight=False, soft_wrap=True)


def status_table(ledger: Ledger, labels: dict[str, str]) -> Table:
    """Counts by status, a column per connector, headed by its label."""
    per_connector = [ledger.counts_by_status(cid) for cid in labels]
    statuses = sorted({s for counts in per_connector for s in counts})
    table = Table()
    table.add_column("status")
    for cid, label in labels.items():
        table.add_column(label if label == cid else f"{label}\n{cid}", justify="right")
    for name in statuses:
        table.add_row(name, *(str(counts.get(name, 0)) for counts in per_connector))
    table.add_row("[bold]total[/]", *(f"[bold]{sum(c.values())}[/]" for c in per_connector))
    return table


def print_status(ledger: Ledger, connectors: list[str], names: dict[str, str]) -> None:
    """`onboard status`: the ledger's counts by status of `connectors` and of those `names`
    labels (by id; every connector the ledger holds when both are empty), how many tenants
    are connected to all, some, none of them, the links past their time, each funnel."""
    from onboarding.clock import utcnow
    from onboarding.db_url import redact
    from onboarding.ledger import funnel_lines

    # Redacted: the URL may hold a password, in its user part or its query.
    where = f"Ledger {redact(ledger.url)}"
    recorded = ledger.connector_profiles()
    ids = list(dict.fromkeys([*connectors, *names])) or list(recorded)
    if not ids:
        out.print(f"{where} holds no records yet.", highlight=False, soft_wrap=True)
        return
    # Each connector by the name people read (the profile's display_name with --profile,
    # else the profile's name the ledger keeps), its id beside it.
    labels = {i: names.get(i) or recorded.get(i) or i for i in ids}
    out.print(f"{where}:", highlight=False, soft_wrap=True)
    out.print(status_table(ledger, labels))
    if len(ids) > 1:
        c = ledger.connection_coverage(ids)
        out.print(
            f"Tenants connected to all {len(ids)} connectors: {c['fully']}; to some: "
            f"{c['partly']}; to none: {c['none']}.",
            highlight=False,
        )
    stale = ledger.count_past_expiry(ids, utcnow())
    if stale:
        out.print(f"{stale} link(s) are past their expiry and not connected.")
    out.print("Funnel (linked → delivered → opened → started → connected):", highlight=False)
    for cid, funnel in ledger.funnel(ids).items():
        out.print(
            f"  {labels.get(cid, cid)}: {funnel_lines(funnel)}", highlight=False, soft_wrap=True
        )
