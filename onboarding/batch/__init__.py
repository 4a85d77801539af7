"""One run's work: its tenants' slices, each tenant's campaign, retries, pacing and outcomes."""
