"""A run's batch on Prefect: its shared parts opened (clients, mailer, pacer, events), its
tenants in slices as task runs, or fanned out to a deployment's runs in chunks."""
