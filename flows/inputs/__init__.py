"""A run's inputs: its parameters' choices, the profiles and roster it names, the secrets it
reads from Prefect blocks."""
