"""The Flask app factory: nothing happens at import time."""

from __future__ import annotations

import logging

from flask import Flask

from api import (
    docs_page,
    dynamic_sessions,
    dynamic_spec,
    errors,
    health,
    mcp_endpoint,
    openapi,
    request_bounds,
    security_headers,
    v1_batches,
    v1_files,
    v1_pools,
    v1_sessions,
)
from shoal.context import make_context
from shoal.settings import Settings, load


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load()
    app = Flask("shoal")
    app.config.update(
        API_TITLE="Shoal",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        API_SPEC_OPTIONS=openapi.spec_options(),
    )
    app.extensions["shoal"] = make_context(settings)
    api = errors.ShoalApi(app, spec_kwargs={"extra_plugins": [openapi.ErrorResponsesPlugin()]})
    openapi.register_components(api.spec)
    errors.register(app)
    request_bounds.register(app)
    security_headers.register(app)
    app.register_blueprint(health.blp)
    app.register_blueprint(docs_page.blp)
    app.register_blueprint(dynamic_sessions.blp)
    app.register_blueprint(mcp_endpoint.blp)
    api.register_blueprint(v1_sessions.blp)
    api.register_blueprint(v1_files.blp)
    api.register_blueprint(v1_pools.blp)
    api.register_blueprint(v1_batches.blp)
    dynamic_spec.document(app, api.spec, settings, dynamic_sessions.blp.name)
    logging.getLogger("shoal").setLevel(logging.INFO)
    # The MCP SDK logs each request's session manager starting and stopping (api/mcp_endpoint.py
    # makes one per request): its warnings and errors are enough.
    logging.getLogger("mcp").setLevel(logging.WARNING)
    return app
