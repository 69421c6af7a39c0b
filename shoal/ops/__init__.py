"""Operator tools: the `shoal` command, the local stack (`up`/`down`), host daemons, TLS and the
guest-image builder.

They stand above everything else: they may start the API and the workers, but nothing in the
core (`shoal/`), `api/`, `workers/` or `pool/` imports them (tests/unit/test_layers.py).
"""
