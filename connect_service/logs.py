"""What `onboard connect-server` logs, and how: one line per record with its time (UTC), level,
logger and request id, as text or JSON (`--log-format`); a request id for each request; one
access line per request, its secrets masked.

The request id: an incoming `X-Request-ID` when it is a short safe token (a proxy's), else a new
one (uuid4 hex); it is in every line logged during the request (`RequestIdFilter`), in the
`X-Request-ID` header of every answer and on every error page (pages.py), so that a support
email quoting it finds the request's lines. asgi-correlation-id keeps it: its middleware reads
or makes the id, sets it in a contextvar for the request's task (run_in_threadpool copies the
context, so the service's own lines on a worker thread carry it too) and adds the header.

Nothing secret in a line: the access line masks a link's token (`/c/abcd…`) and every query
value but an OAuth error's; the service logs masked states only.

uvicorn applies `log_config()` in each worker (it is passed as Config.log_config)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from asgi_correlation_id import CorrelationIdMiddleware, correlation_id
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from onboarding.versori.authorize_url import mask_state

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
ACCESS_LOGGER = "connect_service.access"
# A proxy's id (nginx's $request_id, a UUID, a trace id): 8 to 64 letters, digits, '.', '_',
# '-'. Anything else (longer, spaces, quotes, markup) is replaced, not repeated in a log line.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{7,63}")
# Query values shown as they are: the provider's error answer. Every other value is masked.
_PLAIN_QUERY_KEYS = frozenset({"error", "error_description", "error_uri"})
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,32}")
# A path segment this long is a token pasted in the wrong place: masked like one.
_LONG_SEGMENT = 17

access_log = logging.getLogger(ACCESS_LOGGER)

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]


def current_request_id() -> str | None:
    """The id of the request being answered (None outside one)."""
    return correlation_id.get()


def safe_request_id(value: str) -> bool:
    return _SAFE_ID.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


# --- log lines ------------------------------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """On the handler: every record that reaches it gets `request_id` ("-" outside a
    request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = correlation_id.get() or "-"
        return True


def _utc_time(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
    return when.replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """`2025-01-02T03:04:05.678Z INFO connect_service.access [<request id>] message`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_time(record)


class JsonFormatter(_JsonFormatter):
    """One JSON object a line: time, level, logger, message, request_id, and what a record
    adds (the access line's method, path, status, duration_ms, client; exc_info)."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            # uvicorn's colored copy of its message.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_time(record)


def log_config(level: LogLevel = "info", fmt: LogFormat = "text") -> dict[str, Any]:
    """A logging.config.dictConfig dict: every logger (uvicorn's too) through one stderr
    handler. uvicorn's access logger stays off: RequestLog writes the masked access line."""
    name = level.upper()
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"line": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "line",
                "filters": ["request_id"],
            }
        },
        "root": {"handlers": ["stderr"], "level": name},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"level": name},
            "uvicorn.access": {"handlers": [], "propagate": False},
            # A line per HTTP call to Versori or Prefect at INFO: the service logs its own.
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
        },
    }


# --- masking ------------------------------------------------------------------------------


def masked_target(path: str, query: str = "") -> str:
    """A request's path and query as the access line shows them: a link's token, any long
    path segment and every query value but an OAuth error's masked (first 4 characters and
    "…"); a key that is not a plain short name masked too. Raw (percent-encoded) text is
    masked as it came, so no decoded control character reaches a line."""
    parts = path.split("/")
    shown = "/".join(
        mask_state(part) if len(part) >= _LONG_SEGMENT or (n == 2 and parts[1] == "c") else part
        for n, part in enumerate(parts)
    )
    if not query:
        return shown
    pairs = []
    for pair in query.split("&"):
        key, eq, value = pair.partition("=")
        plain = key.lower() in _PLAIN_QUERY_KEYS
        key = key if _PLAIN_KEY.fullmatch(key) else mask_state(key)
        pairs.append(key + eq + (value if plain else mask_state(value)))
    return f"{shown}?{'&'.join(pairs)}"


# --- the middleware ---------------------------------------------------------------------------


class RequestLog:
    """One access line per HTTP request, when its answer is done: client, method, masked
    path, status, duration. A pure ASGI middleware (no BaseHTTPMiddleware: that would run
    the app in another task).

    `fallback` makes the answer for a request cancelled before it answered: uvicorn cancels
    what still runs when --grace-seconds are over, and would send its plain-text 500."""

    def __init__(self, app: ASGIApp, fallback: Callable[[], ASGIApp] | None = None) -> None:
        self.app = app
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            if not status and self.fallback is not None:
                with contextlib.suppress(Exception):
                    await self.fallback()(scope, receive, watch)
            raise
        finally:
            self._log(scope, status, time.perf_counter() - started)

    @staticmethod
    def _log(scope: Scope, status: int, seconds: float) -> None:
        raw = scope.get("raw_path") or scope["path"].encode()
        path = masked_target(raw.decode("latin-1"), scope["query_string"].decode("latin-1"))
        client = scope.get("client")
        host = client[0] if client else "-"
        method = scope["method"]
        ms = round(seconds * 1000, 1)
        fields = {
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": ms,
            "client": host,
        }
        access_log.info(
            '%s "%s %s" %s %.1f ms', host, method, path, status or "-", ms, extra=fields
        )


def log_requests(app: Starlette, fallback: Callable[[], ASGIApp] | None = None) -> Starlette:
    """`app` with a request id and an access line for each request (see RequestLog for
    `fallback`). Around the whole app, Starlette's error middleware included: one added with
    add_middleware runs inside it, and a page its handler makes would go out without
    X-Request-ID. So the app's stack is built here: add no middleware after this."""
    inner = RequestLog(app.build_middleware_stack(), fallback)
    app.middleware_stack = CorrelationIdMiddleware(
        inner,
        header_name=REQUEST_ID_HEADER,
        generator=new_request_id,
        validator=safe_request_id,
        transformer=None,
    )
    return app
