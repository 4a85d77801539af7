"""Which Prefect server this process talks to."""

from __future__ import annotations


def on_temporary_server() -> bool:
    """True when no PREFECT_API_URL is set: Prefect starts a temporary server for this process
    alone, which no other process shares and no Automation watches."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url is None
