"""The ledger's records written out, links included, as CSV or JSON Lines: the output holds live
links, so a file is written readable by its owner only."""

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
    with the columns EXPORT_KEYS; returns how many."""
    from onboarding.ledger import EXPORT_KEYS

    writer = csv.DictWriter(stream, fieldnames=EXPORT_KEYS, lineterminator="\n")
    if format is ExportFormat.CSV:
        writer.writeheader()
    n = 0
    for record in ledger.iter_records(connector_id):
        row = {key: _plain(getattr(record, key)) for key in EXPORT_KEYS}
        if format is ExportFormat.CSV:
            writer.writerow(row)
        else:
            stream.write(json.dumps(row) + "\n")
        n += 1
    return n


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
