"""The connect service's log lines (connect_service/logs.py): the access line's masking, the
request id (taken or made, in the header, on error pages, in lines logged on a worker thread),
the text and JSON formats, and the page a request cut off at shutdown gets instead of
uvicorn's plain-text 500. The real process: tests/e2e/test_connect_server_process.py."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from asgi_correlation_id import correlation_id
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient will move to another httpx package: not ours.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from connect_service import pages
from connect_service.logs import (
    ACCESS_LOGGER,
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    log_config,
    log_requests,
    masked_target,
    safe_request_id,
)

pytestmark = pytest.mark.timeout(60)

TOKEN = "Zq3kT0p9_aB-cD4eF5gH6iJ7kL8mN9oP0qR1sT2uV3w"  # 43 characters, as token_urlsafe(32)
TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ "
    r"\[[^\]]+\] .+"
)


@pytest.mark.parametrize(
    ("path", "query", "shown"),
    [
        (f"/c/{TOKEN}", "", "/c/Zq3k…"),
        (f"/c/{TOKEN}", "x", "/c/Zq3k…?x"),
        (f"/c/{TOKEN}/seen", "", "/c/Zq3k…/seen"),
        ("/c/short", "", "/c/…"),
        ("/healthz", "", "/healthz"),
        (
            "/callback",
            "state=STATEsecret12345&code=CODEsecret67890",
            "/callback?state=STAT…&code=CODE…",
        ),
        (
            "/callback",
            "state=STATEsecret12345&error=access_denied&error_description=User+said+no",
            "/callback?state=STAT…&error=access_denied&error_description=User+said+no",
        ),
        ("/x", "csrf=CSRFsecret0000&token=TOKENsecret000", "/x?csrf=CSRF…&token=TOKE…"),
        # Any other value is masked too; a key that is no plain name is masked as a value.
        ("/x", "session_state=abcdefghijkl&s", "/x?session_state=abcd…&s"),
        (f"/x?{TOKEN}", "", "/x?Zq3k…"),
        ("/", f"{TOKEN}=1", "/?Zq3k…=…"),
        # A token pasted as a path of its own.
        (f"/{TOKEN}", "", "/Zq3k…"),
    ],
)
def test_the_access_line_masks_tokens_states_codes(path: str, query: str, shown: str) -> None:
    if "?" in path:
        path, query = path.split("?", 1)
    assert masked_target(path, query) == shown


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("4f0c0d7b2a8e4f6c9d1b3a5e7c9f1a2b", True),  # uuid4 hex, nginx's $request_id
        ("8d5f3c2a-1b4e-4c6d-9e8f-0a1b2c3d4e5f", True),  # a UUID
        ("support-case-1234", True),
        ("short", False),
        ("x" * 65, False),
        ("has space 12345", False),
        ('quote"1234567', False),
        ("<script>alert(1)</script>", False),
        ("line\nbreak12345", False),
        ("-leading-dash", False),
    ],
)
def test_only_a_short_safe_request_id_is_taken(value: str, safe: bool) -> None:
    assert safe_request_id(value) is safe


def _line(formatter: logging.Formatter, request_id: str | None, **extra: Any) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger("tests.connect_logs.format")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    token = correlation_id.set(request_id)
    try:
        logger.warning("tenant %s: something", "t1", extra=extra)
    finally:
        correlation_id.reset(token)
        logger.removeHandler(handler)
    return stream.getvalue().rstrip("\n")


def test_a_text_line_has_time_level_logger_and_request_id() -> None:
    line = _line(TextFormatter(), "abc12345def")
    assert TEXT_LINE.fullmatch(line), line
    assert " WARNING tests.connect_logs.format [abc12345def] tenant t1: something" in line
    assert _line(TextFormatter(), None).split(" ")[3] == "[-]"  # outside a request


def test_a_json_line_is_one_object_with_the_fields() -> None:
    line = _line(JsonFormatter(), "abc12345def", status=404, color_message="\x1b[1m")
    record = json.loads(line)
    assert record["level"] == "WARNING"
    assert record["logger"] == "tests.connect_logs.format"
    assert record["message"] == "tenant t1: something"
    assert record["request_id"] == "abc12345def"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert record["status"] == 404  # what a record adds (the access line's fields)
    assert "color_message" not in record  # uvicorn's colored copy of its message


def test_the_log_config_routes_every_logger_through_one_handler() -> None:
    config = log_config("warning", "json")
    assert config["root"] == {"handlers": ["stderr"], "level": "WARNING"}
    assert config["formatters"]["line"]["()"].endswith(".JsonFormatter")
    assert config["handlers"]["stderr"]["filters"] == ["request_id"]
    assert config["loggers"]["uvicorn.access"] == {"handlers": [], "propagate": False}
    assert log_config()["formatters"]["line"]["()"].endswith(".TextFormatter")


class _Lines(logging.Handler):
    """The lines of the access logger and this test's logger, with their request ids."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, name: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.name == name]


@pytest.fixture
def lines() -> Iterator[_Lines]:
    handler = _Lines()
    loggers = [logging.getLogger(ACCESS_LOGGER), logging.getLogger("tests.connect_logs.app")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def _app() -> Starlette:
    log = logging.getLogger("tests.connect_logs.app")

    def work() -> str:  # on a worker thread, as the service's calls are
        log.info("working")
        return "done"

    async def threaded(request: Request) -> Response:
        return PlainTextResponse(await run_in_threadpool(work))

    async def refused(request: Request) -> Response:
        page = pages.callback_refused("unknown")
        return HTMLResponse(page.html(), status_code=page.status)

    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    async def on_error(request: Request, exc: Exception) -> Response:
        page = pages.internal_error()
        return HTMLResponse(page.html(), status_code=page.status)

    app = Starlette(
        routes=[
            Route("/threaded", threaded),
            Route("/callback", refused),
            Route("/broken", broken),
        ],
        exception_handlers={Exception: on_error},
    )
    return log_requests(app)


def test_the_request_id_is_taken_or_made_and_answered(lines: _Lines) -> None:
    client = TestClient(_app())
    given = client.get("/threaded", headers={"X-Request-ID": "support-case-1234"})
    assert given.headers["x-request-id"] == "support-case-1234"
    made = client.get("/threaded", headers={"X-Request-ID": "not safe <b>"})
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", client.get("/threaded").headers["x-request-id"])
    # The line logged on the worker thread carries the request's id.
    worked = [r.request_id for r in lines.of("tests.connect_logs.app")]  # type: ignore[attr-defined]
    assert worked[:2] == ["support-case-1234", made.headers["x-request-id"]]


def test_every_answer_has_an_id_and_an_error_page_shows_it(lines: _Lines) -> None:
    client = TestClient(_app(), raise_server_exceptions=False)
    refused = client.get("/callback?state=STATEsecret12345&code=CODEsecret67890")
    rid = refused.headers["x-request-id"]
    assert refused.status_code == 400 and f"Reference: {rid}</p>" in refused.text
    missing = client.get("/nothing-here")
    assert missing.status_code == 404 and missing.headers["x-request-id"]
    # Past Starlette's own error middleware too: its handler's page has the header.
    broken = client.get("/broken")
    assert broken.status_code == 500
    assert f"Reference: {broken.headers['x-request-id']}" in broken.text
    access = lines.of(ACCESS_LOGGER)
    assert [r.status for r in access] == [400, 404, 500]  # type: ignore[attr-defined]
    first = access[0]
    assert first.request_id == rid  # type: ignore[attr-defined]
    assert first.getMessage().endswith(" ms")
    assert '"GET /callback?state=STAT…&code=CODE…" 400 ' in first.getMessage()
    for record in access:
        assert "secret" not in record.getMessage()


def test_a_page_without_an_error_shows_no_reference() -> None:
    token = correlation_id.set("abc12345def")
    try:
        assert "Reference" not in pages.connected("Acme", "CRM").html()
        assert "Reference: abc12345def" in pages.not_found().html()
    finally:
        correlation_id.reset(token)
    assert "Reference" not in pages.not_found().html()  # outside a request


def test_a_request_cut_off_at_shutdown_gets_the_fallback_page(lines: _Lines) -> None:
    """uvicorn cancels a request still running when the grace is over; its plain-text 500
    would follow. The fallback page goes out instead, with the request id."""

    async def slow(request: Request) -> Response:
        await run_in_threadpool(time.sleep, 0.5)
        return PlainTextResponse("too late")

    app = log_requests(
        Starlette(routes=[Route("/slow", slow)]),
        fallback=lambda: HTMLResponse(pages.internal_error().html(), status_code=500),
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    async def cut_off() -> None:
        scope = {
            "type": "http", "method": "GET", "path": "/slow", "raw_path": b"/slow",
            "query_string": b"", "headers": [], "client": ("127.0.0.1", 5), "scheme": "http",
            "server": ("127.0.0.1", 80), "root_path": "", "http_version": "1.1",
            "asgi": {"version": "3.0"},
        }  # fmt: skip
        task = asyncio.create_task(app(scope, receive, send))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cut_off())
    start, body = sent[0], sent[1]
    assert start["status"] == 500
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    assert b"Something went wrong" in body["body"]
    assert f"Reference: {headers['x-request-id']}".encode() in body["body"]
    assert [r.status for r in lines.of(ACCESS_LOGGER)] == [500]  # type: ignore[attr-defined]
