"""Bearer-token authentication: the API key names the tenant for the whole request."""

from __future__ import annotations

from flask import g, request

from api.context import ctx
from shoal import keys, sessions, tenants
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
    """A before_request hook: sets g.tenant or answers 401, and takes a token from the tenant's
    request bucket or answers 429 (RateLimited), in one round trip. On a route about one session
    it reads that session in the same round trip (see tenant_session)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send `Authorization: Bearer <api key>`")
    c = ctx()
    session_id = (request.view_args or {}).get("session_id", "")
    reads_session = isinstance(session_id, str) and session_id.startswith("ses_")
    session_key = keys.session(session_id) if reads_session else ""
    tenant, entry = tenants.authenticate_request(c.redis, token.strip(), c.settings, session_key)
    if tenant is None:
        raise Unauthorized("the API key is not valid (revoked, or never issued here)")
    if reads_session:
        g.session_read = (session_id, entry or None)
    g.tenant = tenant


def tenant_session(session_id: str) -> dict[str, str]:
    """The request's session if it is a live one of the request's tenant (404 otherwise),
    from the read require_tenant made with the key when it did."""
    read = g.get("session_read")
    if read is not None and read[0] == session_id:
        return sessions.owned_by(g.tenant, session_id, read[1])
    return sessions.get_for_tenant(ctx().redis, g.tenant, session_id)
