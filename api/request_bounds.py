"""The size of a request, bounded before any of it is used (docs/limits.md, "Requests").

One hook runs first on every request, before authentication and before any view reads the body:

- a request target (path and query) over MAX_TARGET_BYTES is 414, headers over
  MAX_HEADER_FIELDS fields or MAX_HEADER_BYTES bytes are 431;
- the body limit depends on the route: a JSON body `SHOAL_MAX_JSON_BODY_BYTES` (never below
  JSON_BODY_FLOOR), `POST /v1/batches` `SHOAL_MAX_BATCH_BODY_BYTES`, a file upload
  `SHOAL_MAX_UPLOAD_BYTES` plus multipart framing (the upload views stream it and check it
  themselves). A Content-Length over the limit is 413 before a byte of the body is read; a
  chunked body is cut off at the limit (werkzeug stops reading there and answers 413);
- a JSON body is read (up to its limit) and its structure checked (api/json_bounds.py) before
  any parser sees it.

gunicorn's own limits sit above these (api/server.py), so these answers come first, in JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar
from urllib.parse import quote

from flask import Flask, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from api.json_bounds import check_json_shape
from shoal.errors import HeadersTooLarge, PayloadTooLarge, URITooLong
from shoal.protocol import MAX_CODE_BYTES
from shoal.settings import Settings

# The guest takes file paths of up to 4096 characters (vm-images/agent/files.py MAX_PATH_CHARS):
# the bound leaves room for a 4096-byte path plus the longest route and query around it.
MAX_TARGET_BYTES = 4608
MAX_HEADER_FIELDS = 100
MAX_HEADER_BYTES = 16 << 10  # names and values of all headers together

# The largest valid JSON request: code at MAX_CODE_BYTES with every byte escaped as \u00XX (six
# bytes each, the worst JSON escaping: control characters), plus the other fields of the body
# (a 2048-character callback URL escaped the same way is 12 KiB).
JSON_ESCAPE_WORST = 6
JSON_ENVELOPE_BYTES = 64 << 10
JSON_BODY_FLOOR = JSON_ESCAPE_WORST * MAX_CODE_BYTES + JSON_ENVELOPE_BYTES
# A multipart upload carries its file plus boundaries and part headers.
MULTIPART_SLACK = 1 << 20

JSON, BATCH, UPLOAD = "json", "batch", "upload"
View = TypeVar("View", bound=Callable)


def json_body_limit(settings: Settings) -> int:
    """SHOAL_MAX_JSON_BODY_BYTES, raised to JSON_BODY_FLOOR: a valid request always fits."""
    return max(settings.max_json_body_bytes, JSON_BODY_FLOOR)


def batch_body_limit(settings: Settings) -> int:
    """SHOAL_MAX_BATCH_BODY_BYTES, never below what one item of the largest code needs."""
    return max(settings.max_batch_body_bytes, JSON_BODY_FLOOR)


def body_limit(settings: Settings, kind: str) -> int:
    if kind == UPLOAD:
        return settings.max_upload_bytes + MULTIPART_SLACK
    if kind == BATCH:
        return batch_body_limit(settings)
    return json_body_limit(settings)


def streamed_upload(view: View) -> View:
    """Marks a view that streams its body as a file, under SHOAL_MAX_UPLOAD_BYTES."""
    view.shoal_body = UPLOAD  # type: ignore[attr-defined]
    return view


def batch_body(view: View) -> View:
    """Marks a view that takes a batch submission, under SHOAL_MAX_BATCH_BODY_BYTES."""
    view.shoal_body = BATCH  # type: ignore[attr-defined]
    return view


def body_kind() -> str:
    """JSON, BATCH or UPLOAD: how the request's route takes its body (JSON when no route
    matched)."""
    view = current_app.view_functions.get(request.endpoint or "")
    return getattr(view, "shoal_body", JSON)


def request_target(environ: dict) -> str:
    """The request target as the client sent it (gunicorn: RAW_URI; werkzeug: REQUEST_URI)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return raw
    query = environ.get("QUERY_STRING", "")
    path = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/")
    return f"{path}?{query}" if query else path


def check_target_and_headers(environ: dict) -> None:
    """URITooLong or HeadersTooLarge when the request's URL or headers are over the bounds."""
    target = len(request_target(environ).encode("latin-1", "replace"))
    if target > MAX_TARGET_BYTES:
        raise URITooLong(
            f"the URL is {target} bytes long; at most {MAX_TARGET_BYTES} (path and query)"
        )
    headers = [
        (name, value)
        for name, value in environ.items()
        if name.startswith("HTTP_") or name in ("CONTENT_TYPE", "CONTENT_LENGTH")
    ]
    if len(headers) > MAX_HEADER_FIELDS:
        raise HeadersTooLarge(
            f"the request has {len(headers)} header fields; at most {MAX_HEADER_FIELDS}"
        )
    size = sum(len(name) + len(str(value)) for name, value in headers)
    if size > MAX_HEADER_BYTES:
        raise HeadersTooLarge(
            f"the request's headers are {size} bytes; at most {MAX_HEADER_BYTES} in all"
        )


def too_large(limit: int, length: int | None = None) -> PayloadTooLarge:
    size = f" ({length} bytes)" if length is not None else ""
    if body_kind() == UPLOAD:
        cap = current_app.extensions["shoal"].settings.max_upload_bytes
        return PayloadTooLarge(f"the upload{size} is over the {cap}-byte upload limit")
    return PayloadTooLarge(f"the request body{size} is over this route's {limit}-byte limit")


def bound_request() -> None:
    """The before_request hook described in the module's docstring."""
    check_target_and_headers(request.environ)
    kind = body_kind()
    limit = body_limit(current_app.extensions["shoal"].settings, kind)
    request.max_content_length = limit
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit, length)
    if kind != UPLOAD and request.is_json:
        check_json_shape(read_json_body(limit))


def read_json_body(limit: int) -> bytes:
    """The body, read once and kept for the parsers (webargs and Flask both read it with
    get_data(cache=True)). werkzeug stops a body without Content-Length at the limit, silently:
    one more byte from the server's stream tells a body of exactly `limit` bytes from a longer
    one."""
    try:
        body = request.get_data(cache=True)
    except RequestEntityTooLarge:
        raise too_large(limit) from None
    unknown_length = request.content_length is None
    if unknown_length and len(body) >= limit and request.environ["wsgi.input"].read(1):
        raise too_large(limit)
    return body


def register(app: Flask) -> None:
    """Installs the hook ahead of every other before_request hook (blueprints' run after)."""
    app.config["MAX_CONTENT_LENGTH"] = json_body_limit(app.extensions["shoal"].settings)
    app.before_request_funcs.setdefault(None, []).insert(0, bound_request)
