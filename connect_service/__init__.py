"""onboard connect-server: durable connect links' pages and the OAuth callback that finishes a
connection. An entry point beside flows/ and deployments/: Starlette and uvicorn, no Prefect;
it imports the core (onboarding/), which never imports it.

    service     what a link page, its button and the callback do (ledger, Versori, events)
    pages       the HTML answers and the headers every answer carries
    events      onboarding.tenant.opened/declined/connected to the Prefect API, off the request
    app         the ASGI app (routes, threads, a page for any error)
    server      checks, then uvicorn (one or more workers)
    listener    the TCP listener its workers share, with a header timeout and size limit
    logs        the log lines, request ids and the masked access log

Its settings (ONBOARD_CONNECT_*, VERSORI_*, the ledger's, the brand's) are sections of the
core's settings root (onboarding/settings/), read once when the service starts, and what a
batch calls to mail a durable link (`issue_connect_link`, `connect_url`) is the core's
onboarding/connections/durable_links.py: the batch never imports this package. The map is
docs/architecture.md.
"""
