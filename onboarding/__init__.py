"""The core: plain Python, no Prefect, no web framework (tests/unit/test_core_is_plain.py
checks; no import cycle either, tests/unit/test_import_graph.py). The map of its modules, in
the order one tenant meets them, is docs/architecture.md (its one copy)."""
