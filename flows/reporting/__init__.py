"""What a run tells the Prefect UI: tenant events, progress, its summary and table artifacts."""
