"""The ledger's revisions, one file each (see onboarding/ledger/migrations/__init__.py). Alembic
loads them from their files, not as this package's modules."""
