"""Network helpers shared by the Versori client, the mail sender, roster downloads and the
profile and authorize-URL checks."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str | None) -> bool:
    """Whether `host` names this machine: localhost (any case, with or without its root dot), or
    a loopback IP (127.0.0.0/8, ::1, bracketed or not)."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
