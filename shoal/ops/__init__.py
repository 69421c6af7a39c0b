"""Operator tools, above the core: what an operator runs (such as building guest images).

The core (the modules directly in shoal/, imported by the API and by the worker processes) never
imports this package; the tools here import the core.
"""
