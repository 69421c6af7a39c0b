"""The request's view of the core's Context (shoal/context.py), built once per app."""

from __future__ import annotations

from flask import current_app

from shoal.context import Context


def ctx() -> Context:
    return current_app.extensions["shoal"]
