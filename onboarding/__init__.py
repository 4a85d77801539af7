"""The core: plain Python, no Prefect (tests/unit/test_core_is_plain.py checks; no import
cycle either, tests/unit/test_import_graph.py).

One tenant's path, module by module:

    settings        what the environment says (VERSORI_*, ONBOARD_*), each value checked
    run_inputs      the run's parameters checked once, into its inputs:
      input_files     a profile's or roster's file read safely (folder, size, bounded YAML)
      profile         the connector profile: what the initialise call needs, per tenant
      roster          the tenant rows, checked against the profiles (roster_formats: the
                      file formats; roster_download: a roster URL under the operator's rules)
    slices          a task run's tenants: claimed in the ledger, who is tried again
                    (`retry_policy.decide`: retry, final, or stop the batch)
    campaign        one tenant's step over the run's connectors (one or several):
      connector_run   each connector's link: made (or reused) through `client` (wire
                      `models`), checked (`links`), recorded in the `ledger`, its calls spaced
                      under the profile's rate (`pacing`)
      mail            then one email with every link the tenant still needs
    outcomes        what became of the tenant: its row in the run's table, its status changes
                    (`events`: each change as a Prefect event's body)
    connection      later, the `state` an OAuth callback received: the tenant connected
    connect         or the connect service (`onboard connect-server`): a durable link's page,
                    its button minting a fresh state, the callback calling CreateConnection
    export          the ledger as CSV or JSON Lines

`errors` holds every error class. The Prefect layers read the same way: tasks/ (the task over
a slice), flows/ (entry points on top; inputs, batching, reporting and running beneath),
deployments/ (the CLI and prefect.yaml's deployments). The emulator and the demo's SMTP server
are in demo/, beside the core.
"""
