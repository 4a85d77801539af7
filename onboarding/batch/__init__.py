"""One run's work: its inputs checked together (run_request), its tenants' slices, each
tenant's campaign, retries, pacing and outcomes."""
