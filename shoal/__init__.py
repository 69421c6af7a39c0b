"""Shoal's core: the use cases, records, queue, registry, settings and errors that the front door
(api/) and the processes (workers/, pool/) stand on. It imports none of them, nor the tools in
shoal/ops/ and shoal/bench/ (docs/architecture.md, tests/unit/test_layers.py)."""
