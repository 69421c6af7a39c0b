"""Every error response, on every route: {"error": {"code", "message"}} plus x-ms-error-code.

Shoal's own errors (shoal/errors.py) carry their code and status, and a 429 or 503 its
Retry-After (seconds); HTTP errors from Flask and webargs (bad JSON, validation, 404 routes,
405, 413) get the same shape, and so do the errors gunicorn answers itself (api/server.py). The
dynamic-sessions routes speak the reference service's codes, mapped here.
"""

from __future__ import annotations

import logging

import kombu.exceptions
import redis
from flask import Flask, jsonify, request
from flask_smorest import Api
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from api.openapi import Error
from shoal.errors import ShoalError, StoreUnavailable

log = logging.getLogger("shoal.api")

# Native codes as the dynamic-sessions clients know them.
DYNAMIC_SESSIONS_CODES = {
    "ValidationFailed": "SessionRequestValidationFailed",
    "SessionNotFound": "SessionWithIdentifierNotFound",
    "SessionExpired": "SessionWithIdentifierNotFound",
}

HTTP_CODES = {
    400: "ValidationFailed",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "PayloadTooLarge",
    414: "URITooLong",
    415: "UnsupportedMediaType",
    417: "ExpectationFailed",
    422: "ValidationFailed",
    431: "RequestHeaderFieldsTooLarge",
    500: "InternalError",
    501: "NotImplemented",
}


def http_code(status: int, name: str = "") -> str:
    """The error code of an HTTP status that no Shoal error names."""
    return HTTP_CODES.get(status) or name.replace(" ", "") or f"Http{status}"


def error_response(code: str, message: str, status: int, headers: dict | None = None):
    if request.path.startswith("/pools/"):
        if code == "PoolExhausted":
            status = 404  # the reference service answers a full pool with 404
        if code in ("SessionNotFound", "SessionExpired"):
            status = 400  # ... and an unknown identifier with 400
        code = DYNAMIC_SESSIONS_CODES.get(code, code)
    if status not in (429, 503) and headers:
        headers = {k: v for k, v in headers.items() if k != "Retry-After"}
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    response.headers["x-ms-error-code"] = code
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _flatten(messages: object, prefix: str = "") -> list[str]:
    """webargs' nested {"json": {"field": ["msg"]}} as "field: msg" lines."""
    if isinstance(messages, dict):
        out = []
        for key, value in messages.items():
            name = "" if key in ("json", "query", "form", "files", "headers") else str(key)
            out += _flatten(value, f"{prefix}.{name}" if prefix and name else prefix or name)
        return out
    if isinstance(messages, list):
        return [f"{prefix}: {m}" if prefix else str(m) for m in messages if not isinstance(m, dict)]
    return [f"{prefix}: {messages}" if prefix else str(messages)]


class ShoalApi(Api):
    ERROR_SCHEMA = Error  # what /openapi.json documents for every error

    def handle_http_exception(self, error: HTTPException):
        data = getattr(error, "data", None) or {}
        status = 400 if error.code == 422 else (error.code or 500)
        headers = dict(data.get("headers") or {})
        if "messages" in data:
            message = "; ".join(_flatten(data["messages"])) or "invalid request"
        else:
            message = data.get("message") or error.description or error.name
        if status == 413:
            message = (
                f"the request is too large: on this route the body may be at most "
                f"{request.max_content_length} bytes, a form field {request.max_form_memory_size} "
                f"bytes, a form {request.max_form_parts} parts"
            )
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            headers["Allow"] = ", ".join(error.valid_methods)
        if status >= 500:
            log.error("HTTP %s on %s %s: %s", status, request.method, request.path, message)
        return error_response(http_code(status, error.name), message, status, headers)


def register(app: Flask) -> None:
    @app.errorhandler(ShoalError)
    def _shoal_error(exc: ShoalError):
        if exc.status >= 500:
            log.error("%s on %s %s: %s", exc.code, request.method, request.path, exc.message)
        retry = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return error_response(exc.code, exc.message, exc.status, retry)

    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    def _store_unavailable(exc: redis.exceptions.RedisError):
        log.error("Redis unavailable on %s %s: %s", request.method, request.path, exc)
        return _shoal_error(
            StoreUnavailable("Shoal's Redis does not answer (restarting?); retry shortly")
        )

    @app.errorhandler(kombu.exceptions.OperationalError)
    def _queue_unavailable(exc: kombu.exceptions.OperationalError):
        # Celery gave up publishing a task: its broker is Shoal's Redis.
        log.error("task queue unavailable on %s %s: %s", request.method, request.path, exc)
        return _shoal_error(
            StoreUnavailable("Shoal's task queue (Redis) does not answer; retry shortly")
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response("InternalError", "internal error; see the API log", 500)
