"""Native API: sessions and their executions (/v1)."""

from __future__ import annotations

from flask import g, request, url_for
from flask_smorest import Blueprint

from api.auth import require_json_body, require_tenant, tenant_session
from api.context import ctx
from api.schemas import (
    ExecutionCreate,
    ExecutionOut,
    ForkCreate,
    SessionCreate,
    SessionList,
    SessionOut,
)
from shoal import executions, sessions, webhooks
from shoal.use_cases import executions as execution_cases
from shoal.use_cases import sessions as session_cases

blp = Blueprint("v1_sessions", __name__, url_prefix="/v1", description="Sessions and executions")
blp.before_request(require_tenant)
blp.before_request(require_json_body)


@blp.post("/sessions")
@blp.arguments(SessionCreate, required=False)  # no body: the default pool
@blp.response(201, SessionOut)
def create_session(body: dict):
    entry = session_cases.create_session(ctx(), g.tenant, body["pool"])
    return sessions.public_view(entry)


@blp.get("/sessions")
@blp.response(200, SessionList)
def list_sessions():
    return {
        "sessions": [
            sessions.public_view(e) for e in sessions.list_for_tenant(ctx().redis, g.tenant)
        ]
    }


@blp.get("/sessions/<session_id>")
@blp.response(200, SessionOut)
def get_session(session_id: str):
    return sessions.public_view(tenant_session(session_id))


@blp.delete("/sessions/<session_id>")
@blp.response(204)
def delete_session(session_id: str):
    entry = tenant_session(session_id)
    session_cases.delete_session(ctx(), entry)


@blp.post("/sessions/<session_id>/sleep")
@blp.response(202, SessionOut)
def sleep_session(session_id: str):
    """Save the session's VM to disk and free it; `state` turns `sleeping` once the image is
    complete. The next request wakes it (docs/api.md, "Sleeping sessions")."""
    entry = session_cases.sleep_session(ctx(), tenant_session(session_id))
    return sessions.public_view(entry)


@blp.post("/sessions/<session_id>/wake")
@blp.response(202, SessionOut)
def wake_session(session_id: str):
    """Restore a sleeping session's VM ahead of the next request; `state` turns `active` once
    it runs."""
    entry = session_cases.wake_session(ctx(), tenant_session(session_id))
    return sessions.public_view(entry)


@blp.post("/sessions/<session_id>/fork")
@blp.arguments(ForkCreate, required=False)  # no body: one fork
@blp.response(201, SessionList)
def fork_session(body: dict, session_id: str):
    """New sessions whose variables, imports, files and working directory are this session's
    at one instant; it runs on. Each counts against the tenant's session cap (docs/api.md,
    "Forks")."""
    forks = session_cases.fork_session(ctx(), g.tenant, tenant_session(session_id), body["count"])
    return {"sessions": [sessions.public_view(fork) for fork in forks]}


@blp.post("/sessions/<session_id>/executions")
@blp.arguments(ExecutionCreate)
@blp.response(200, ExecutionOut)
@blp.alt_response(202, schema=ExecutionOut, description="queued (wait false)")
def create_execution(body: dict, session_id: str):
    c = ctx()
    entry = tenant_session(session_id)
    if body["timeout_s"] is None:
        body["timeout_s"] = c.settings.default_timeout_s
    record = execution_cases.run_execution(
        c, entry, body, request.headers.get("Idempotency-Key", ""), wait=body["wait"]
    )
    view = webhooks.execution_view(c.redis, record)
    if record["status"] in executions.FINAL:
        return view
    location = url_for("v1_sessions.get_execution", execution_id=record["id"])
    return view, 202, {"Location": location}


@blp.get("/executions/<execution_id>")
@blp.response(200, ExecutionOut)
def get_execution(execution_id: str):
    record = executions.get_for_tenant(ctx().redis, g.tenant, execution_id)
    return webhooks.execution_view(ctx().redis, record)


@blp.post("/executions/<execution_id>/cancel")
@blp.response(200, ExecutionOut)
def cancel_execution(execution_id: str):
    c = ctx()
    record = executions.get_for_tenant(c.redis, g.tenant, execution_id)
    return webhooks.execution_view(c.redis, execution_cases.cancel_execution(c, record))
