"""onboard connect-server: durable connect links and the OAuth callback that finishes a
connection. Plain Python and Starlette, no Prefect.

    settings    ONBOARD_CONNECT_BASE_URL, ONBOARD_CONNECT_MINTS_PER_HOUR
    service     what a link page, its button and the callback do (ledger, Versori, events)
    pages       the HTML answers and the headers every answer carries
    events      onboarding.tenant.opened/declined/connected to the Prefect API, off the request
    app         the ASGI app (routes, threads, a page for any error)
    server      checks, then uvicorn (one or more workers)

What the batch calls (one per (tenant, connector) per email): `issue_connect_link` for the
token and `connect_url` for the link an email carries.
"""

from onboarding.connect.service import ConnectService, connect_url, issue_connect_link

__all__ = ["ConnectService", "connect_url", "issue_connect_link"]
