"""Bearer-token authentication: a tenant's key names the tenant for the whole request; an admin
key (shoal/admin_keys.py) reaches only the operator's routes (/healthz's details, /metrics)."""

from __future__ import annotations

from flask import g, request

from api.context import ctx
from shoal import admin_keys, keys, sessions, tenants
from shoal.errors import Forbidden, Unauthorized, UnsupportedMediaType


def require_json_body() -> None:
    """A before_request hook for JSON routes: a body in another format is refused, not
    silently read as `{}`."""
    has_body = bool(request.content_length) or request.headers.get("Transfer-Encoding")
    if request.method in ("POST", "PUT", "PATCH") and has_body and not request.is_json:
        raise UnsupportedMediaType(
            f"send the body as JSON with `Content-Type: application/json` "
            f"(got {request.mimetype or 'no Content-Type'})"
        )


ADMIN_ON_TENANT_ROUTE = (
    "this is an admin key: it reaches /healthz's details and /metrics only; tenant routes take "
    "a tenant's key (`shoal keys create --tenant NAME`)"
)


def bearer_token() -> str | None:
    """The request's `Authorization: Bearer` token, None when there is no such header; a header
    in another form is refused (401)."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send `Authorization: Bearer <api key>`")
    return token.strip()


def caller_role() -> str | None:
    """admin_keys.ADMIN or TENANT for the request's key, None without one; a key that is not
    valid is refused (401), not taken for no key: its sender expects more than the public view.
    Takes no token from a tenant's request bucket: an admin route reads no tenant's data."""
    token = bearer_token()
    if token is None:
        return None
    role = admin_keys.role_of(ctx().redis, token)
    if role is None:
        raise Unauthorized("the API key is not valid (revoked, or never issued here)")
    return role


def require_admin() -> None:
    """401 without a valid key, 403 with a tenant's key."""
    role = caller_role()
    if role is None:
        raise Unauthorized("send `Authorization: Bearer <admin key>` (`shoal keys create --admin`)")
    if role != admin_keys.ADMIN:
        raise Forbidden(
            "this route needs an admin key (`shoal keys create --admin`), not a tenant's"
        )


def require_tenant() -> None:
    """A before_request hook: sets g.tenant or answers 401 (403 for an admin key), and takes a
    token from the tenant's request bucket or answers 429 (RateLimited), in one round trip. On a
    route about one session it reads that session in the same round trip (see tenant_session)."""
    token = bearer_token()
    if token is None:
        raise Unauthorized("send `Authorization: Bearer <api key>`")
    c = ctx()
    session_id = (request.view_args or {}).get("session_id", "")
    reads_session = isinstance(session_id, str) and session_id.startswith("ses_")
    session_key = keys.session(session_id) if reads_session else ""
    tenant, entry = tenants.authenticate_request(c.redis, token, c.settings, session_key)
    if tenant is None:
        if admin_keys.is_admin(c.redis, token):
            raise Forbidden(ADMIN_ON_TENANT_ROUTE)
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
