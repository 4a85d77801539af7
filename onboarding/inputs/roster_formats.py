"""The roster's file formats, read as (line, raw row) pairs: CSV, JSON Lines and JSON streamed
row by row, YAML parsed whole under a bound. What a row must hold is checked in roster.py."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onboarding.errors import InputError, Problem
from onboarding.files import load_yaml_with_lines

# A YAML roster is parsed whole (CSV, JSON Lines are streamed): past these, use one of those.
YAML_MAX_BYTES = 16 * 1024 * 1024
YAML_MAX_NODES = 500_000


def csv_header(path: Path, source: str) -> list[str]:
    try:
        with _open_text(path, source) as f:
            header = next(csv.reader(f), None)
    except UnicodeDecodeError as err:  # the first read decodes a whole chunk, not just line 1
        raise _not_utf8(source, err) from err
    if not header:
        raise InputError([Problem(source, 1, "", "empty file; the first line names the columns")])
    return [h.strip() for h in header]


def _open_text(path: Path, source: str) -> Any:
    try:
        return path.open(encoding="utf-8-sig", newline="")
    except OSError as err:
        raise InputError(f"{source}: cannot read it ({err.strerror})") from err


def raw_records(path: Path, fmt: str, source: str) -> Iterator[tuple[int, Any]]:
    """(line, raw row) pairs, streamed where the format allows it."""
    try:
        if fmt == "csv":
            yield from _csv_records(path, source)
        elif fmt == "jsonl":
            yield from _jsonl_records(path, source)
        elif fmt == "json":
            yield from _json_records(path, source)
        else:
            yield from _yaml_records(path, source)
    except UnicodeDecodeError as err:
        raise _not_utf8(source, err) from err


def _not_utf8(source: str, err: UnicodeDecodeError) -> InputError:
    return InputError(
        [Problem(source, None, "", f"not UTF-8 text (byte {err.start}); save it as UTF-8")]
    )


def _csv_records(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    # csv.reader, not DictReader: DictReader skips blank lines inside next(), which would make
    # every row after a blank line report the blank line's number.
    with _open_text(path, source) as f:
        reader = csv.reader(f)
        try:
            columns = [h.strip() for h in next(reader, [])]
            start = reader.line_num + 1
            for cells in reader:
                if any(cells):
                    row: dict[str | None, Any] = dict(zip(columns, cells, strict=False))
                    if len(cells) > len(columns):
                        row[None] = cells[len(columns) :]
                    yield start, row
                start = reader.line_num + 1
        except csv.Error as err:
            raise InputError([Problem(source, reader.line_num, "", f"bad CSV: {err}")]) from err


def _jsonl_records(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    with _open_text(path, source) as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise InputError([Problem(source, number, "", f"bad JSON: {err.msg}")]) from None
            except (RecursionError, ValueError) as err:
                raise InputError([Problem(source, number, "", _json_limit(err))]) from None
            yield number, row


def _json_limit(err: BaseException) -> str:
    """What is wrong when the JSON decoder stops short of a syntax error."""
    if isinstance(err, RecursionError):
        return "bad JSON: nested too deeply"
    return "bad JSON: a number with too many digits"


# Long: a streaming JSON reader state machine; split, its state would be passed around.
def _json_records(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    # json.load gives no line numbers; walking the top-level array with raw_decode does.
    text = path.read_text(encoding="utf-8-sig")
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def fail(pos: int, message: str) -> InputError:
        return InputError([Problem(source, text.count("\n", 0, pos) + 1, "", message)])

    def tenants_value(pos: int) -> int:
        # Where the top-level "tenants" value starts (the last one, as json.loads keeps); a search
        # for the text '"tenants"' could land on a nested key or a string value instead.
        found, pos = pos, skip(pos + 1)
        while not text.startswith("}", pos):
            key, end = decoder.raw_decode(text, pos)
            pos = skip(skip(end) + 1)  # past the ':'
            if key == "tenants":
                found = pos
            _value, end = decoder.raw_decode(text, pos)
            pos = skip(end)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
        return found

    pos = skip(0)
    wrapped = text.startswith("{", pos)
    if wrapped:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            raise fail(err.pos, f"bad JSON: {err.msg}") from None
        except (RecursionError, ValueError) as err:
            raise fail(pos, _json_limit(err)) from None
        if not isinstance(document.get("tenants"), list):
            raise fail(pos, 'expected a JSON array of tenants, or {"tenants": [...]}')
        pos = tenants_value(pos)  # the document parsed, so this walk cannot fail
    if not text.startswith("[", pos):
        raise fail(pos, 'expected a JSON array of tenants, or {"tenants": [...]}')
    pos = skip(pos + 1)
    while not text.startswith("]", pos):
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise fail(err.pos, f"bad JSON: {err.msg}") from None
        except (RecursionError, ValueError) as err:
            raise fail(pos, _json_limit(err)) from None
        yield text.count("\n", 0, pos) + 1, item
        pos = skip(end)
        if text.startswith(",", pos):
            pos = skip(pos + 1)
            if text.startswith("]", pos):
                raise fail(pos, "bad JSON: a , before ]")
        elif not text.startswith("]", pos):
            raise fail(pos, "expected , or ] after a tenant")
    if not wrapped and skip(pos + 1) < len(text):
        # e.g. two arrays one after the other: the second would be dropped without a word.
        raise fail(skip(pos + 1), "unexpected text after the array of tenants")


def _yaml_records(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    data, lines = load_yaml_with_lines(
        path, source, max_bytes=YAML_MAX_BYTES, max_nodes=YAML_MAX_NODES, what="roster"
    )
    prefix: tuple[str | int, ...] = ()
    if isinstance(data, dict) and isinstance(data.get("tenants"), list):
        data, prefix = data["tenants"], ("tenants",)
    if not isinstance(data, list):
        raise InputError([Problem(source, 1, "", "expected a YAML list of tenants")])
    for i, item in enumerate(data):
        yield lines.get((*prefix, i), 0), item
