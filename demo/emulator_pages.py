"""Versori's lists as the emulator pages them: `first` (1..100, default 20; else 400) items
after the `after` cursor, with PageInfo (`totalCount`, `next`, `prev`). A cursor is opaque to
the client: the list's kind and the sequence number of the last item given, so a cursor of one
list is refused by another (400)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from demo.versori_rules import error_response, field_error

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


def _cursor(kind: str, position: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode().rstrip("=")


def _position(kind: str, cursor: str) -> int | None:
    """The position a cursor of this list stands for; None if it is not one."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    prefix, _, number = text.rpartition(":")
    if prefix != kind or not number.isdigit():
        return None
    return int(number)


def paged(
    request: Request,
    kind: str,
    matching: list[dict[str, Any]],
    member: str,
    wire: Callable[[dict[str, Any]], dict[str, Any]],
) -> Response:
    """One page of `matching` (already in list order) under `member`, with PageInfo: `first`
    items after the `after` cursor, `next` the cursor of the last one ("" at the end)."""
    raw_first = request.query_params.get("first")
    if raw_first is None:
        first = DEFAULT_PAGE_SIZE
    elif raw_first.isdigit() and 1 <= int(raw_first) <= MAX_PAGE_SIZE:
        first = int(raw_first)
    else:
        return bad_query("first", f"must be an integer from 1 to {MAX_PAGE_SIZE}")
    start = 0
    after = request.query_params.get("after")
    if after:
        # A cursor is the position (sequence number) of the last item given; the page goes on
        # from there even if items were made (or a list is newest first) in between.
        position = _position(kind, after)
        if position is None:
            return bad_query("after", "is not a cursor of this list")
        found = (i + 1 for i, item in enumerate(matching) if _seq(item) == position)
        start = next(found, -1)
        if start < 0:
            # That item is gone (DeleteConnection): go on after where it stood. Only v2 lists
            # lose items, and they are oldest first.
            later = (i for i, item in enumerate(matching) if _seq(item) > position)
            start = next(later, len(matching))
    page = matching[start : start + first]
    more = start + first < len(matching)
    return JSONResponse(
        {
            member: [wire(item) for item in page],
            "totalCount": len(matching),
            "next": _cursor(kind, _seq(page[-1])) if more and page else "",
            "prev": "",
        }
    )


def _seq(item: dict[str, Any]) -> int:
    """An item's position in the lists: the sequence number it was made with."""
    return int(item["seq"])


def bad_query(name: str, message: str) -> JSONResponse:
    return error_response(
        400,
        "validation_failed",
        "query parameters are invalid",
        fields=[field_error(name, message)],
    )
