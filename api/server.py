"""How gunicorn serves the API: its limits, and a worker whose own error answers are JSON.

Used as gunicorn's configuration module (`gunicorn -c python:api.server ...`, as `shoal up` and
compose.yaml run it). gunicorn parses the request line and headers before the app sees them and
answers what it refuses itself, with an HTML page. Two things keep every answer in Shoal's error
shape:

- gunicorn's limits sit above the app's (api/request_bounds.py), so a long URL or large headers
  reach the app, which answers 414 or 431 in JSON with a message naming its limit;
- what gunicorn still refuses itself (a request line or a header field past the limits below, a
  malformed request, a broken chunked body) is written by `write_json_error` instead of
  gunicorn's `util.write_error`: same status, JSON body, `x-ms-error-code`.
"""

from __future__ import annotations

import json
import socket

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from api.errors import http_code
from api.request_bounds import MAX_HEADER_BYTES, MAX_HEADER_FIELDS
from api.security_headers import headers_for_error

# gunicorn's settings (read from this module by name).
worker_class = "api.server.JsonErrorWorker"
# gunicorn's largest: a request line is method, target and version, so every target up to
# MAX_TARGET_BYTES (4608) reaches the app, and the app answers 414 up to ~8170 bytes.
limit_request_line = 8190
# Above the app's bounds, so that headers over them reach the app: one field as large as all
# headers may be, more fields than the app takes. gunicorn buffers at most about
# fields * field size (~2.2 MB) of headers before it refuses them itself.
limit_request_fields = MAX_HEADER_FIELDS + 28
limit_request_field_size = MAX_HEADER_BYTES + 1024
# gunicorn >= 25 opens a management socket at one path per user ($XDG_RUNTIME_DIR or ~/.gunicorn),
# which every gunicorn of the user shares and Shoal never uses.
control_socket_disable = True

_MESSAGES = {
    414: "the request line is over gunicorn's limit of {line} bytes",
    431: "the request's headers are over gunicorn's limits ({fields} fields, {size} bytes each)",
    500: "internal error; see the API log",
}
_MAX_DETAIL = 200


def server_error_body(status: int, reason: str, detail: str) -> tuple[str, bytes]:
    """(code, JSON body) for an error gunicorn answers itself."""
    code = http_code(status, reason)
    message = _MESSAGES.get(status, "").format(
        line=limit_request_line, fields=limit_request_fields, size=limit_request_field_size
    )
    detail = detail[:_MAX_DETAIL]
    if status == 500 or not detail:
        message = message or reason
    else:
        message = f"{message}: {detail}" if message else detail
    return code, json.dumps({"error": {"code": code, "message": message}}).encode()


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's `util.write_error(sock, status_int, reason, mesg)`, answering in JSON."""
    code, body = server_error_body(status_int, reason, mesg)
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-ms-error-code: {code}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers_for_error().items())
        + "\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


class JsonErrorWorker(ThreadWorker):
    """gunicorn's gthread worker, with its error answers in JSON. gunicorn has no hook for
    them: its Worker.handle_error chooses the status and message and calls `util.write_error`,
    which this worker's process replaces (tests/unit/test_request_bounds.py runs gunicorn)."""

    def init_process(self) -> None:
        util.write_error = write_json_error
        super().init_process()
