"""The core: plain Python, no Prefect (tests/unit/test_core_is_plain.py checks).

One tenant's path, module by module:

    settings        what the environment says (VERSORI_*, ONBOARD_*), each value checked
    input_files     a profile's or roster's file read safely (folder, size, bounded YAML)
    profile         the connector profile: what the initialise call needs, per tenant
    roster          the tenant rows, checked against the profile (roster_formats: the file
                    formats; roster_download: a roster URL under the operator's rules)
    preflight       all of the above checked before a run starts
    ledger          what each tenant has: skip the done, retry the failed, who works on it
                    now (ledger/: schema, records, queries, store)
    tenant_steps    one tenant's steps: initialise through `client` (wire `models`), check
                    the URL (`links`), record it, deliver it (`mail`) or store it
    campaign        the same over several connectors, one email a tenant
    slices          a task run's tenants: claimed in the ledger, who is called again
                    on a retry (`retry_policy`: retry or final, when a batch stops;
                    `pacing`: calls spaced under the profile's rate)
    export          the ledger as CSV or JSON Lines

`errors` holds every error class; `demo` the emulator and SMTP server for the demo and tests.
The Prefect layer reads the same way: tasks/ (the task over a slice), flows/ (batches, fan-out,
events), deployments/ (the CLI and prefect.yaml's deployments).
"""
