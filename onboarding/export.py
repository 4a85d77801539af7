"""The ledger's records written out, links included, as CSV or JSON Lines: the output holds live
links, so a file is written readable by its owner only. No hash, connect-link token or CSRF value
is ever written (EXPORT_KEYS)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # the CLI imports ExportFormat for its options: not the ledger with it
    from onboarding.ledger import Ledger


class ExportFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"


def write_records(
    ledger: Ledger,
    stream: TextIO,
    format: ExportFormat,
    connector_id: str | Sequence[str] | None = None,
) -> int:
    """Every record of the ledger (of `connector_id` only, if given) to `stream`, one a line,
    with the columns EXPORT_KEYS; returns how many. connector_name is the name of the profile
    that wrote the record (the ledger keeps that, not the profile's display_name). opened_at,
    the first open of any of the tenant's connect links for that connector (empty when none
    was opened), is read for every tenant in one query before the records are streamed."""
    from onboarding.ledger import EXPORT_KEYS

    opened = first_opens(ledger, connector_id)
    writer = csv.DictWriter(stream, fieldnames=EXPORT_KEYS, lineterminator="\n")
    if format is ExportFormat.CSV:
        writer.writeheader()
    n = 0
    for record in ledger.iter_records(connector_id):
        derived = {
            "opened_at": opened.get((record.tenant_id, record.connector_id)),
            "connector_name": record.profile,
        }
        row = {
            key: _plain(derived[key] if key in derived else getattr(record, key))
            for key in EXPORT_KEYS
        }
        if format is ExportFormat.CSV:
            writer.writerow(row)
        else:
            stream.write(json.dumps(row) + "\n")
        n += 1
    return n


def first_opens(
    ledger: Ledger, connector_id: str | Sequence[str] | None = None
) -> dict[tuple[str, str], datetime]:
    """(tenant_id, connector_id) -> when a person first opened one of its connect links, for
    every tenant that opened one (of these connectors)."""
    from sqlalchemy import func, select

    from onboarding.ledger.connect_links import connect_links as links
    from onboarding.ledger.engine import reconnecting
    from onboarding.ledger.records import aware

    first = func.min(links.c.opened_first_at)
    query = (
        select(links.c.tenant_id, links.c.connector_id, first)
        .where(links.c.opened_first_at.is_not(None))
        .group_by(links.c.tenant_id, links.c.connector_id)
    )
    if connector_id:  # as iter_records: None or none is every connector
        ids = [connector_id] if isinstance(connector_id, str) else list(connector_id)
        query = query.where(links.c.connector_id.in_(ids))

    @reconnecting
    def read() -> dict[tuple[str, str], datetime]:
        opens: dict[tuple[str, str], datetime] = {}
        with ledger.engine.connect() as conn:
            for tenant_id, connector, at in conn.execute(query):
                opens[(tenant_id, connector)] = aware(at) or at
        return opens

    return read()


def private_file(path: Path) -> TextIO:
    """`path` opened for writing, readable by its owner only (0600): it holds live links. An
    existing file is truncated and made 0600 too."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return open(fd, "w", newline="", encoding="utf-8")


def _plain(value: Any) -> Any:
    """A record's value as CSV and JSON show it: dates in ISO 8601, enums by their value."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, StrEnum):
        return value.value
    return value
