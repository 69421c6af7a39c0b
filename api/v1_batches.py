"""Native API: batches of independent executions (/v1/batches), docs/async.md."""

from __future__ import annotations

from flask import g, url_for
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate, validates

from api.auth import require_tenant
from api.context import ctx
from api.request_bounds import batch_body
from api.schemas import StrictSchema, check_callback_url
from shoal import batches
from shoal.use_cases import batches as batch_cases

blp = Blueprint("v1_batches", __name__, url_prefix="/v1", description="Batches")
blp.before_request(require_tenant)


class BatchCreate(StrictSchema):
    pool = fields.String(
        load_default=None,
        validate=validate.Length(1, 64),
        metadata={"description": "default: `default`, or from_session's pool"},
    )
    from_session = fields.String(
        load_default=None,
        validate=validate.Length(1, 64),
        metadata={
            "description": "a session of yours: each item without a session_id runs in a fork "
            "of it (its variables and files as they were), ended after the item"
        },
    )
    items = fields.List(
        fields.Raw(),
        required=True,
        validate=validate.Length(min=1),
        metadata={
            "description": "each {code, language, timeout_s, max_output, files: {name: base64}, "
            "collect: [glob], session_id}; an invalid item is kept with status `invalid`; at "
            f"most {batches.MAX_ITEMS} items (413 PayloadTooLarge beyond)"
        },
    )
    max_parallel = fields.Integer(
        load_default=batches.DEFAULT_PARALLEL, validate=validate.Range(1, batches.MAX_PARALLEL)
    )
    callback_url = fields.String(load_default=None, allow_none=True)

    @validates("callback_url")
    def _callback_url(self, value: str | None, **_: object) -> None:
        check_callback_url(value)


class BatchQuery(Schema):
    limit = fields.Integer(
        load_default=batches.DEFAULT_PAGE, validate=validate.Range(1, batches.MAX_PAGE)
    )
    cursor = fields.String(load_default=None)
    status = fields.String(load_default=None)


class BatchItemOut(Schema):
    index = fields.Integer()
    status = fields.String(
        metadata={"description": "pending | running | invalid | error | an execution status"}
    )
    execution = fields.Dict(allow_none=True, metadata={"description": "the /v1 execution"})
    files = fields.Dict(metadata={"description": "collected files: path -> base64"})
    files_truncated = fields.Boolean(
        metadata={
            "description": "files matched `collect` but were left out (limits); `error` names them"
        }
    )
    error = fields.String(allow_none=True)


class BatchOut(Schema):
    id = fields.String()
    pool = fields.String()
    from_session = fields.String(allow_none=True)
    status = fields.String(metadata={"description": "running | completed | cancelled"})
    max_parallel = fields.Integer()
    callback_url = fields.String(allow_none=True)
    created_at = fields.String()
    finished_at = fields.String(allow_none=True)
    total = fields.Integer()
    counts = fields.Dict(metadata={"description": "items per status"})
    items = fields.List(fields.Nested(BatchItemOut))
    next_cursor = fields.String(allow_none=True)
    webhook = fields.Dict(metadata={"description": "the callback's delivery, when one was given"})


@blp.post("/batches")
@blp.arguments(BatchCreate)
@blp.response(202, BatchOut)
@batch_body
def create_batch(body: dict):
    c = ctx()
    meta = batch_cases.submit_batch(c, g.tenant, **body)
    location = url_for("v1_batches.get_batch", batch_id=meta["id"])
    return batches.view(c.redis, meta), 202, {"Location": location}


@blp.get("/batches/<batch_id>")
@blp.arguments(BatchQuery, location="query")
@blp.response(200, BatchOut)
def get_batch(query: dict, batch_id: str):
    c = ctx()
    return batches.view(c.redis, batches.get_for_tenant(c.redis, g.tenant, batch_id), **query)


@blp.post("/batches/<batch_id>/cancel")
@blp.response(200, BatchOut)
def cancel_batch(batch_id: str):
    c = ctx()
    meta = batches.get_for_tenant(c.redis, g.tenant, batch_id)
    batch_cases.cancel_batch(c, meta)
    return batches.view(c.redis, meta)
