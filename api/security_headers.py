"""The security headers on every response: JSON, errors, the API docs page and its assets, and
the errors gunicorn answers itself (api/server.py).

- `X-Content-Type-Options: nosniff`: a browser never runs an answer as something it is not (an
  output that looks like HTML served as JSON).
- `Content-Security-Policy`: JSON loads nothing (`default-src 'none'`); the docs page
  (api/docs_page.py) loads scripts, styles and images from this origin only, and fetches only
  /openapi.json. `frame-ancestors 'none'` and `X-Frame-Options: DENY`: no page frames Shoal's.
- `Strict-Transport-Security` on every answer, not only the TLS listener's: browsers ignore it
  over plain HTTP (RFC 6797, 8.1), and an API behind a proxy that terminates TLS cannot tell
  which listener the client used.
- `Referrer-Policy: no-referrer`: no URL of Shoal's (session ids) leaks to another site.
- `Cache-Control: no-store` unless a view sets its own (the docs' static assets): answers carry
  tenants' outputs and keys' results, and no cache between client and API may keep them.
"""

from __future__ import annotations

from flask import Flask, Response

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
HSTS = "max-age=31536000"

STATIC_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Strict-Transport-Security": HSTS,
    "Cross-Origin-Resource-Policy": "same-origin",
}


def headers_for_error() -> dict[str, str]:
    """Every header, for an answer written outside Flask (gunicorn's own errors)."""
    return {**STATIC_HEADERS, "Content-Security-Policy": API_CSP, "Cache-Control": "no-store"}


def add_security_headers(response: Response) -> Response:
    for name, value in STATIC_HEADERS.items():
        response.headers[name] = value
    response.headers.setdefault("Content-Security-Policy", API_CSP)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def register(app: Flask) -> None:
    app.after_request(add_security_headers)
