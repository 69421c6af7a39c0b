"""Bearer-token authentication: the API key names the tenant for the whole request."""

from __future__ import annotations

from flask import g, request

from api.context import ctx
from shoal import tenants
from shoal.errors import Unauthorized, UnsupportedMediaType


def require_json_body() -> None:
    """A before_request hook for JSON routes: a body in another format is refused, not
    silently read as `{}`."""
    has_body = bool(request.content_length) or request.headers.get("Transfer-Encoding")
    if request.method in ("POST", "PUT", "PATCH") and has_body and not request.is_json:
        raise UnsupportedMediaType(
            f"send the body as JSON with `Content-Type: application/json` "
            f"(got {request.mimetype or 'no Content-Type'})"
        )


def require_tenant() -> None:
    """A before_request hook: sets g.tenant or answers 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send `Authorization: Bearer <api key>`")
    tenant = tenants.authenticate(ctx().redis, token.strip())
    if tenant is None:
        raise Unauthorized("the API key is not valid (revoked, or never issued here)")
    g.tenant = tenant
