"""`onboard sync`: each profile's tenants read back from Versori (end users, connections and
their credentials' health, activations) and the ledger brought in line: connected, broken,
disconnected, activated. See docs/sync.md."""
