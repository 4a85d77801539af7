"""What a sync comes to: its summary (the flow's result, a plain dict that the CLI prints and a
deployment's caller reads), an event per tenant status change, its artifacts (a markdown
summary with each connector's funnel drawn, a table of the changes, a funnel per connector)
and its final state. Ids, statuses, codes and Versori's reasons: never a link, a state, an
email address or a secret (a URL in a reason is cut out)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from flows.inputs.options import TenantEvents
from flows.inputs.parameters import connector_label
from flows.reporting.events import TenantEventSender
from flows.reporting.funnel_picture import funnel_image, funnel_table
from onboarding.batch.outcomes import StatusChange
from onboarding.inputs.profile import ConnectorProfile
from onboarding.ledger import Funnel, Status
from onboarding.sync.versori_sync import SyncChange, SyncReport

TABLE_ROWS_MAX = 1000
REFUSALS_KEPT = 20  # refusals listed in the summary (all are counted by code)
REASON_MAX = 200
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
# The table's order: what needs a person first.
_FIRST = {Status.BROKEN: 0, Status.DISCONNECTED: 1}


def scrub(text: str | None, limit: int = REASON_MAX) -> str:
    """Versori's words as a table or summary shows them: on one line, any URL cut out (one may
    carry a code or a token), at most `limit` characters."""
    plain = " ".join(_URL.sub("<url>", text or "").split())
    return plain if len(plain) <= limit else plain[: limit - 1] + "…"


def summarise_sync(
    report: SyncReport, profiles: Sequence[ConnectorProfile], funnels: dict[str, Funnel]
) -> dict[str, Any]:
    """The sync's summary, JSON-ready: per profile its tenants, its changes by new status (and
    where from), activations landed, Versori calls and seconds; the activations made and
    refused (by Versori's code); each connector's funnel in the ledger after it."""
    activated: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    refusals: list[dict[str, str]] = []
    tenants_activated = 0
    for tenant_id, done in report.activations:
        if done.activation_id is not None:
            tenants_activated += 1
            activated.update(done.connectors)
        elif done.refused is not None:
            code, message = done.refused
            refused[code] += 1
            if len(refusals) < REFUSALS_KEPT:
                refusals.append({"tenant_id": tenant_id, "code": code, "message": scrub(message)})
    names = {p.target_id: p for p in profiles}
    finished = report.finished_at or report.started_at
    rows = []
    for synced in report.profiles:
        profile = names.get(synced.connector_id)
        rows.append(
            {
                "profile": synced.profile,
                "display_name": profile.display_name if profile else synced.profile,
                "connector_id": synced.connector_id,
                "api": synced.api,
                "tenants": synced.tenants,
                "changes": dict(Counter(c.after.value for c in synced.changes)),
                "from": _sources(synced.changes),
                "raced": synced.raced,
                "activated": activated.get(synced.connector_id, 0),
                "versori_calls": synced.versori_calls,
                "seconds": round(synced.seconds, 2),
            }
        )
    reads = sum(p.versori_calls for p in report.profiles)
    return {
        "dry_run": report.dry_run,
        "started_at": report.started_at.isoformat(),
        "seconds": round((finished - report.started_at).total_seconds(), 2),
        "versori_calls": report.versori_calls,
        "activation_calls": max(0, report.versori_calls - reads),
        "tenants": sum(p.tenants for p in report.profiles),
        "changes": report.counts(),
        "activated": tenants_activated,
        "refused": dict(refused),
        "refusals": refusals,
        "profiles": rows,
        "funnel": {
            p.name: funnels[p.target_id].as_dict() for p in profiles if p.target_id in funnels
        },
    }


def _sources(changes: Iterable[SyncChange]) -> dict[str, dict[str, int]]:
    """New status -> {status it came from: tenants}."""
    found: dict[str, Counter[str]] = {}
    for change in changes:
        found.setdefault(change.after.value, Counter())[change.before.value] += 1
    return {after: dict(before) for after, before in found.items()}


def send_events(
    report: SyncReport, profiles: Sequence[ConnectorProfile], level: TenantEvents
) -> tuple[int, int]:
    """`onboarding.tenant.<status>` for each tenant whose status sync changed (connected,
    activated, broken, disconnected; a record whose connection went while a reconnect link was
    out keeps its status, so no event), then `onboarding.tenant.activated` for each record an
    activation landed on. (sent, lost)."""
    names = {p.target_id: p.name for p in profiles}
    with TenantEventSender(level) as sender:
        for change in report.changes:
            if change.after is change.before:
                continue
            sender(
                StatusChange(
                    change.tenant_id,
                    change.connector_id,
                    change.profile,
                    change.after.value,
                    change.error_code or "",
                    change.connection_id,
                )
            )
        for tenant_id, done in report.activations:
            for connector_id in done.connectors:
                sender(
                    StatusChange(
                        tenant_id,
                        connector_id,
                        names.get(connector_id, connector_id),
                        Status.ACTIVATED.value,
                    )
                )
    return sender.sent, sender.lost


def change_rows(report: SyncReport, profiles: Sequence[ConnectorProfile]) -> list[dict[str, str]]:
    """The table's rows: refused activations, then broken, disconnected, then the others, each
    in tenant order; then the activations made."""
    names = {p.target_id: p.name for p in profiles}
    refused = [
        {
            "tenant": tenant_id,
            "connector": "(its environment)",
            "change": "connected, activation refused",
            "reason": f"{done.refused[0]}: {scrub(done.refused[1])}",
        }
        for tenant_id, done in sorted(report.activations, key=lambda a: a[0])
        if done.refused is not None
    ]
    changes = [
        {
            "tenant": c.tenant_id,
            "connector": names.get(c.connector_id, c.profile),
            "change": f"{c.before.value} → {c.after.value}"
            if c.after is not c.before
            else f"{c.before.value} (kept; its connection is gone)",
            "reason": scrub(c.reason),
        }
        for c in sorted(report.changes, key=lambda c: (_FIRST.get(c.after, 2), c.tenant_id))
    ]
    made = [
        {
            "tenant": tenant_id,
            "connector": names.get(connector_id, connector_id),
            "change": "connected → activated",
            "reason": f"activation {done.activation_id}",
        }
        for tenant_id, done in sorted(report.activations, key=lambda a: a[0])
        for connector_id in done.connectors
    ]
    return refused + changes + made


def artifact_key(kind: str, profiles: Sequence[ConnectorProfile]) -> str:
    """`<kind>-<profile>`, or `<kind>-<profile>-<profile>…` for several: stable per profile
    (or set of them), so the UI keeps each one's history; Prefect's rule (lowercase letters,
    digits, dashes) kept by the profiles' slugs."""
    return f"{kind}-{'-'.join(p.slug for p in profiles)}"[:200].rstrip("-")


def publish_sync(
    summary: dict[str, Any],
    report: SyncReport,
    profiles: Sequence[ConnectorProfile],
    funnels: dict[str, Funnel],
) -> None:
    """The artifacts: `sync-summary-<profile>` (markdown: each connector's funnel drawn, its
    changes by status, activations and refusals with Versori's codes, Versori calls, the
    time), `sync-<profile>` (table: each change), `funnel-<profile>` per connector (markdown:
    the funnel drawn, and in numbers)."""
    label = connector_label(list(profiles))
    rows = change_rows(report, profiles)
    cut = len(rows) - TABLE_ROWS_MAX
    would = "would change" if report.dry_run else "changed"
    create_table_artifact(
        key=artifact_key("sync", profiles),
        table=rows[:TABLE_ROWS_MAX]
        or [{"tenant": "", "connector": "", "change": "no change", "reason": ""}],
        description=f"Tenants whose status sync {would}: {label}"
        + (
            f" (the first {TABLE_ROWS_MAX} of {len(rows)}; `onboard export` has all)"
            if cut > 0
            else ""
        ),
    )
    create_markdown_artifact(
        key=artifact_key("sync-summary", profiles),
        markdown=summary_markdown(summary, profiles, funnels),
        description=f"Sync with Versori: {label}",
    )
    for profile in profiles:
        funnel = funnels.get(profile.target_id)
        if funnel is None:
            continue
        title = connector_label([profile])
        create_markdown_artifact(
            key=artifact_key("funnel", [profile]),
            markdown="\n".join(
                [f"# {title}", "", funnel_image(title, funnel), "", *funnel_table(funnel)]
            ),
            description=f"Funnel of {title} in the ledger, after a sync",
        )


def summary_markdown(
    summary: dict[str, Any], profiles: Sequence[ConnectorProfile], funnels: dict[str, Funnel]
) -> str:
    dry = summary["dry_run"]
    changed = sum(summary["changes"].values())
    lines = [
        f"# Sync with Versori: {connector_label(list(profiles))}{' (dry run)' if dry else ''}",
        "",
        f"{summary['tenants']:,} tenant(s) read back from Versori in {summary['seconds']:g} s "
        f"with {summary['versori_calls']:,} Versori call(s): {changed:,} "
        f"{'would change' if dry else 'changed'}"
        + (
            "."
            if dry
            else f", {summary['activated']:,} activated, "
            f"{sum(summary['refused'].values()):,} activation(s) refused."
        ),
    ]
    if dry:
        lines += ["", "A dry run: nothing was written, to the ledger or to Versori."]
    by_connector = {p.target_id: p for p in profiles}
    for row in summary["profiles"]:
        profile = by_connector.get(row["connector_id"])
        title = connector_label([profile]) if profile else row["profile"]
        lines += ["", f"## {title}", ""]
        funnel = funnels.get(row["connector_id"])
        if funnel is not None:
            lines += [funnel_image(title, funnel), ""]
        lines.append(
            f"{row['api']} · {row['tenants']:,} tenant(s) · {row['versori_calls']:,} Versori "
            f"call(s) · {row['seconds']:g} s"
            + (f" · {row['activated']:,} activated" if row["activated"] else "")
            + (f" · {row['raced']} raced (read again next time)" if row["raced"] else "")
        )
        lines.append("")
        if row["changes"]:
            lines += [
                f"| {'would be' if dry else 'now'} | tenants | from |",
                "| --- | ---: | --- |",
            ]
            for status, n in sorted(row["changes"].items(), key=lambda s: -s[1]):
                sources = row["from"].get(status, {})
                came = ", ".join(
                    f"{s} {k:,}" for s, k in sorted(sources.items(), key=lambda x: -x[1])
                )
                lines.append(f"| {status} | {n:,} | {came} |")
        else:
            lines.append("No change: the ledger agrees with Versori.")
        if funnel is not None:
            lines += [
                "",
                "The funnel in numbers (the ledger, after the sync):",
                "",
                *funnel_table(funnel),
            ]
    if summary["refused"]:
        lines += [
            "",
            "## Activations refused",
            "",
            "Versori refused these activations; each tenant stays connected and the next sync "
            "tries again.",
            "",
            "| Versori's code | tenants |",
            "| --- | ---: |",
            *(f"| {code} | {n:,} |" for code, n in Counter(summary["refused"]).most_common()),
            "",
            "| tenant | code | Versori said |",
            "| --- | --- | --- |",
            *(f"| {r['tenant_id']} | {r['code']} | {r['message']} |" for r in summary["refusals"]),
        ]
    lines += [
        "",
        f"Versori calls: {summary['versori_calls']:,} in all"
        + (
            f" ({summary['activation_calls']:,} for activations)"
            if summary["activation_calls"]
            else ""
        )
        + f"; wall time {summary['seconds']:g} s.",
    ]
    return "\n".join(lines)


def sync_state(summary: dict[str, Any]) -> State[dict[str, Any]]:
    """Completed, its message the counts; Failed when Versori refused an activation (the
    tenant stays connected, not live; the next sync tries again). Its data, the flow's result,
    is `summary`."""
    changed = sum(summary["changes"].values())
    counts = ", ".join(f"{s} {n}" for s, n in sorted(summary["changes"].items()))
    message = (
        f"{summary['tenants']} tenant(s) synced: {changed} "
        f"{'would change' if summary['dry_run'] else 'changed'}"
        + (f" ({counts})" if counts else "")
        + f", {summary['activated']} activated; {summary['versori_calls']} Versori call(s) "
        f"in {summary['seconds']:g} s"
    )
    refused = summary["refused"]
    if refused:
        codes = ", ".join(f"{code} {n}" for code, n in Counter(refused).most_common())
        return Failed(
            message=f"{sum(refused.values())} activation(s) refused by Versori ({codes}); "
            f"the next sync tries them again. {message}",
            data=summary,
        )
    return Completed(message=message, data=summary)
