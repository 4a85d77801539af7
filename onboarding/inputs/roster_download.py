"""A roster fetched from a URL, under the rules an operator sets (InputSettings): https only
(plain http to loopback), allowed hosts only, every redirect checked before it is followed, a
byte cap and a deadline for the whole download; errors never quote the URL's query or the
server's answer."""

from __future__ import annotations

import ipaddress
import re
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from onboarding.errors import InputError
from onboarding.net import is_loopback
from onboarding.settings import InputSettings

HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
MAX_REDIRECTS = 5


def _allowed(host: str, allowed: frozenset[str]) -> bool:
    return host in allowed or any(
        a.startswith("*.") and host.endswith(a[1:]) and len(host) > len(a) - 1 for a in allowed
    )


def _checked_url(url: str, settings: InputSettings, label: str) -> httpx.URL:
    """The URL as httpx will request it, or InputError (before any connection) unless it is
    https, or http to a loopback address, to a host ONBOARD_ROSTER_ALLOWED_HOSTS names. `label`
    says which URL ("the roster URL", "redirect 2"); nothing of the URL's query is quoted."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when not a number in 0-65535
        parsed = httpx.URL(url)
        host = (parts.hostname or "").rstrip(".")
        ok = (
            bool(host)
            and (HOSTNAME.match(host) is not None or _is_ip(host))
            and parsed.host.rstrip(".").lower() == host
            and parsed.scheme == parts.scheme.lower()
        )
    except (ValueError, httpx.InvalidURL):
        ok = False
    if not ok:
        raise InputError(f"{label}: not a valid URL (give https://host/path/roster.csv)")
    shown = f"{parts.scheme.lower()}://{host}{f':{port}' if port else ''}"
    if parsed.scheme not in ("http", "https"):
        raise InputError(f"{label} ({shown}): only https URLs are read")
    if parsed.scheme == "http" and not is_loopback(host):
        raise InputError(
            f"{label} ({shown}): plain http is read from this machine (loopback) only; use https"
        )
    if not _allowed(host, settings.allowed_hosts):
        raise InputError(
            f"{label} ({shown}): {host} is not a host rosters may come from; an operator "
            "allows it with ONBOARD_ROSTER_ALLOWED_HOSTS (comma-separated, *.example.com for "
            "subdomains)"
        )
    return parsed


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def download(url: str, source: str, settings: InputSettings) -> tuple[Any, Path]:
    """Download to a temporary folder within ONBOARD_ROSTER_DOWNLOAD_SECONDS (the whole of it:
    connecting, redirects and every byte) and ONBOARD_ROSTER_MAX_BYTES; each redirect is checked
    by the same rules as the URL itself before it is followed."""
    first = _checked_url(url, settings, source)
    tmp = tempfile.TemporaryDirectory(prefix="onboard-roster-")
    path = Path(tmp.name) / ("roster" + Path(urlsplit(url).path).suffix.lower())
    stop = threading.Event()
    outcome: list[BaseException | None] = []

    def work() -> None:
        try:
            _get(first, source, settings, path, stop)
            outcome.append(None)
        except BaseException as err:  # handed to the caller's thread
            outcome.append(err)

    # The transfer runs in a thread of its own so that the deadline holds whatever the server
    # does (one byte just inside every read timeout); a late thread stops at its next read.
    worker = threading.Thread(target=work, name="roster-download", daemon=True)
    worker.start()
    worker.join(settings.roster_download_seconds)
    if worker.is_alive() or not outcome:
        stop.set()
        raise InputError(
            f"{source}: the roster was not downloaded within {settings.roster_download_seconds:g}"
            " s (ONBOARD_ROSTER_DOWNLOAD_SECONDS); try again, or copy it next to the workers"
        )
    if outcome[0] is not None:
        raise outcome[0]
    return tmp, path


def _get(
    url: httpx.URL, source: str, settings: InputSettings, path: Path, stop: threading.Event
) -> None:
    cap = settings.roster_max_bytes
    too_big = InputError(
        f"{source}: larger than {cap} bytes (ONBOARD_ROSTER_MAX_BYTES); split the roster or "
        "raise the cap"
    )
    read = min(30.0, settings.roster_download_seconds)
    try:
        with httpx.Client(
            timeout=httpx.Timeout(read, connect=min(10.0, read)),
            follow_redirects=False,
            headers={"Accept-Encoding": "identity"},
        ) as client:
            for hop in range(MAX_REDIRECTS + 1):
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        if hop == MAX_REDIRECTS:
                            raise InputError(f"{source}: more than {MAX_REDIRECTS} redirects")
                        target = response.headers.get("location", "")
                        try:
                            following = str(url.join(target))
                        except (httpx.InvalidURL, ValueError):
                            following = ":"  # refused as not a valid URL just below
                        url = _checked_url(following, settings, f"{source}: redirect {hop + 1}")
                        continue
                    response.raise_for_status()
                    length = response.headers.get("content-length", "")
                    if length.isdigit() and int(length) > cap:
                        raise too_big
                    total = 0
                    with path.open("wb") as out:
                        for chunk in response.iter_bytes():
                            if stop.is_set():
                                return
                            total += len(chunk)
                            if total > cap:
                                raise too_big
                            out.write(chunk)
                    return
    except httpx.HTTPError as err:
        # httpx's message would repeat the URL, token and all: name the failure by its type.
        status = getattr(getattr(err, "response", None), "status_code", None)
        why = f"HTTP {status}" if status else type(err).__name__
        raise InputError(f"{source}: cannot download the roster ({why})") from None
    except OSError as err:
        raise InputError(f"{source}: cannot save the roster ({err.strerror})") from None
