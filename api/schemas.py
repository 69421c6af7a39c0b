"""Request and response schemas of the native API (/v1); the OpenAPI document is built from them."""

from __future__ import annotations

from flask import current_app
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates

from shoal import webhooks
from shoal.errors import ShoalError
from shoal.protocol import MAX_CODE_BYTES
from shoal.sessions import MAX_FORKS


def _settings():
    return current_app.extensions["shoal"].settings


def code_problem(code: str) -> str | None:
    """Why `code` cannot be sent to a guest, or None: over MAX_CODE_BYTES, or not valid Unicode
    (JSON allows lone surrogates, which no interpreter can read)."""
    try:
        size = len(code.encode())
    except UnicodeEncodeError:
        return "code is not valid Unicode text (it holds a lone surrogate)"
    if size > MAX_CODE_BYTES:
        return f"code is over the {MAX_CODE_BYTES}-byte limit"
    return None


def check_callback_url(value: str | None) -> None:
    """400 for a callback URL that is malformed or resolves to a forbidden address (SSRF)."""
    if value is not None:
        try:
            webhooks.check_url(_settings(), value)
        except ShoalError as exc:
            raise ValidationError(exc.message) from None


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


class SessionCreate(StrictSchema):
    pool = fields.String(load_default="default", validate=validate.Length(1, 64))


class SessionOut(Schema):
    id = fields.String()
    pool = fields.String()
    host = fields.String(metadata={"description": "the worker host running its VM"})
    state = fields.String(metadata={"description": "creating | active | sleeping | waking | lost"})
    identifier = fields.String(allow_none=True)
    created_at = fields.String()
    last_used_at = fields.String()
    expires_at = fields.String(
        metadata={"description": "when it ends if left idle (asleep: its retention's end)"}
    )
    reason = fields.String(metadata={"description": "why a lost session was lost"})
    slept_at = fields.String(metadata={"description": "a sleeping session: when it fell asleep"})
    sleep_expires_at = fields.String(
        metadata={"description": "a sleeping session: when it is deleted unless woken"}
    )
    forked_from = fields.String(metadata={"description": "a fork: the session it was forked of"})


class SessionList(Schema):
    sessions = fields.List(fields.Nested(SessionOut))


class ForkCreate(StrictSchema):
    count = fields.Integer(
        load_default=1,
        validate=validate.Range(1, MAX_FORKS),
        metadata={"description": f"how many forks, 1 to {MAX_FORKS}"},
    )


class ExecutionCreate(StrictSchema):
    code = fields.String(required=True)
    language = fields.String(load_default="python", validate=validate.OneOf(["python", "shell"]))
    timeout_s = fields.Integer(load_default=None, allow_none=True)
    wait = fields.Boolean(load_default=True)
    max_output = fields.Integer(load_default=4096, validate=validate.Range(min=0))
    callback_url = fields.String(
        load_default=None,
        allow_none=True,
        metadata={"description": "POSTed the finished execution, signed (docs/async.md)"},
    )

    @validates("callback_url")
    def _callback_url(self, value: str | None, **_: object) -> None:
        check_callback_url(value)

    @validates("code")
    def _code_size(self, value: str, **_: object) -> None:
        problem = code_problem(value)
        if problem:
            raise ValidationError(problem)

    @validates("timeout_s")
    def _timeout(self, value: int | None, **_: object) -> None:
        limit = _settings().max_timeout_s
        if value is not None and not 1 <= value <= limit:
            raise ValidationError(f"must be between 1 and {limit} seconds")

    @validates("max_output")
    def _max_output(self, value: int, **_: object) -> None:
        cap = _settings().max_output_cap
        if value > cap:
            raise ValidationError(f"must be at most {cap} characters")


class ErrorDetail(Schema):
    name = fields.String()
    value = fields.String()
    traceback = fields.String()


class ExecutionOut(Schema):
    id = fields.String()
    session_id = fields.String()
    language = fields.String()
    status = fields.String(
        metadata={
            "description": "queued | running | succeeded | failed | timed_out | cancelled | lost"
        }
    )
    stdout = fields.String()
    stderr = fields.String()
    stdout_truncated = fields.Boolean(
        metadata={"description": "stdout was cut at max_output characters"}
    )
    stderr_truncated = fields.Boolean(
        metadata={"description": "stderr was cut at max_output characters"}
    )
    result = fields.Dict(allow_none=True, metadata={"description": "last value by MIME type"})
    result_truncated = fields.Boolean(
        metadata={
            "description": "the result was cut: a text part at max_output characters, or a part "
            "dropped (an image over the rich-output budget, JSON over max_output); null when "
            "nothing of it was kept. output_notes says what"
        }
    )
    outputs = fields.List(
        fields.Dict(),
        metadata={
            "description": "displayed outputs, in order: {type, data: {mime: value}}, plus "
            "truncated: true on one that was cut or had parts dropped"
        },
    )
    outputs_truncated = fields.Boolean(
        metadata={
            "description": "an output was cut or had parts dropped, or outputs after the "
            "rich-output budget was spent were dropped"
        }
    )
    output_notes = fields.List(
        fields.String(),
        metadata={"description": "what was cut or dropped from the result and outputs, and why"},
    )
    error = fields.Nested(ErrorDetail, allow_none=True)
    exit_code = fields.Integer(allow_none=True)
    interpreter_restarted = fields.Boolean()
    created_at = fields.String()
    started_at = fields.String(allow_none=True)
    finished_at = fields.String(allow_none=True)
    duration_ms = fields.Float(allow_none=True)
    callback_url = fields.String(metadata={"description": "only when one was given"})
    webhook = fields.Dict(
        metadata={"description": "the callback's delivery: id, status and every attempt"}
    )
