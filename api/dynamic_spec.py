"""The dynamic-sessions routes (/pools/{pool}/..., api/dynamic_sessions.py) in /openapi.json.

Those routes speak the reference service's contract (docs/api.md) and validate their requests
themselves, so they stay a plain Flask blueprint; this module only describes them: one entry per
view, documented at the view's own URL rule (`document` refuses a route without an entry). The
response shapes are those of api/dynamic_shapes.py; the error responses are added to every
operation by api/openapi.py.
"""

from __future__ import annotations

from apispec import APISpec
from flask import Flask
from marshmallow import Schema, fields, validate

from api.dynamic_sessions import IDENTIFIER, LIST_PAGE
from shoal.protocol import DEFAULT_MAX_OUTPUT, MAX_CODE_BYTES
from shoal.settings import Settings

TAG = "dynamic_sessions"
TAG_DESCRIPTION = (
    "The dynamic-sessions API (Azure Container Apps' contract, both generations): configure a "
    "client with the pool management endpoint /pools/{pool}"
)
_TRUNCATED = "Shoal's: the reference service has no such field (its clients ignore it)"


# --- response shapes (api/dynamic_shapes.py) --------------------------------------------------
class LegacyExecutionProperties(Schema):
    id_ = fields.String(data_key="$id", required=True)
    status = fields.String(required=True, validate=validate.OneOf(["Success", "Failure"]))
    stdout = fields.String(required=True)
    stderr = fields.String(
        required=True, metadata={"description": "on a failure, the traceback or the reason"}
    )
    result = fields.Raw(
        required=True,
        allow_none=True,
        metadata={
            "description": 'the last value as JSON when it is JSON data, else its repr; "" when '
            'none; a figure is {"type": "image", "format": "png", "base64_data": ...}'
        },
    )
    executionTimeInMilliseconds = fields.Integer(required=True)
    stdoutTruncated = fields.Boolean(required=True, metadata={"description": _TRUNCATED})
    stderrTruncated = fields.Boolean(required=True, metadata={"description": _TRUNCATED})
    resultTruncated = fields.Boolean(
        required=True,
        metadata={
            "description": "the result or a displayed output was cut or dropped. " + _TRUNCATED
        },
    )
    outputNotes = fields.List(
        fields.String(),
        required=True,
        metadata={"description": "what was cut or dropped, and why. " + _TRUNCATED},
    )


class LegacyExecution(Schema):
    id_ = fields.String(data_key="$id", required=True)
    properties = fields.Nested(LegacyExecutionProperties, required=True)


class CurrentExecutionResult(Schema):
    stdout = fields.String(required=True)
    stderr = fields.String(required=True)
    executionResult = fields.String(
        required=True, allow_none=True, metadata={"description": "the last value's repr"}
    )
    executionTimeInMilliseconds = fields.Integer(required=True)
    stdoutTruncated = fields.Boolean(required=True, metadata={"description": _TRUNCATED})
    stderrTruncated = fields.Boolean(required=True, metadata={"description": _TRUNCATED})
    executionResultTruncated = fields.Boolean(required=True, metadata={"description": _TRUNCATED})
    outputNotes = fields.List(fields.String(), required=True, metadata={"description": _TRUNCATED})


class CurrentExecution(Schema):
    id = fields.String(required=True)
    identifier = fields.String(required=True)
    executionType = fields.String(required=True)
    status = fields.String(
        required=True,
        metadata={
            "description": "NotStarted | Running | Succeeded | Failed | Canceled; a shell "
            "command's exit code once it ended"
        },
    )
    result = fields.Nested(
        CurrentExecutionResult,
        required=True,
        allow_none=True,
        metadata={"description": "null until the execution ends"},
    )


class LegacyFileProperties(Schema):
    id_ = fields.String(data_key="$id", required=True)
    filename = fields.String(required=True)
    size = fields.Integer(required=True)
    lastModifiedTime = fields.String(required=True)


class LegacyFile(Schema):
    id_ = fields.String(data_key="$id", required=True)
    properties = fields.Nested(LegacyFileProperties, required=True)


class LegacyFileList(Schema):
    id_ = fields.String(data_key="$id", required=True)
    value = fields.List(fields.Nested(LegacyFile), required=True)


class CurrentFile(Schema):
    name = fields.String(required=True)
    type = fields.String(required=True, validate=validate.OneOf(["File", "Directory"]))
    contentType = fields.String(required=True, allow_none=True)
    sizeInBytes = fields.Integer(required=True)
    lastModifiedAt = fields.String(required=True)


class CurrentFileList(Schema):
    value = fields.List(fields.Nested(CurrentFile), required=True)
    nextLink = fields.String(required=True, allow_none=True)


class IdentifierSession(Schema):
    identifier = fields.String(required=True)
    createdAt = fields.String(required=True)
    lastAccessedAt = fields.String(required=True)
    expireAt = fields.String(required=True)
    etag = fields.String(required=True)


class IdentifierSessionList(Schema):
    sessions = fields.List(fields.Nested(IdentifierSession), required=True)


class ManagementSession(Schema):
    identifier = fields.String(required=True)
    createdAt = fields.String(required=True)
    lastAccessedAt = fields.String(required=True)
    expiresAt = fields.String(required=True)
    etag = fields.String(required=True)


class ManagementSessionList(Schema):
    value = fields.List(fields.Nested(ManagementSession), required=True)
    count = fields.Integer(required=True)
    nextLink = fields.String(required=True, allow_none=True)


class NameVersion(Schema):
    name = fields.String(required=True)
    version = fields.String(required=True)


class PoolMetadata(Schema):
    pool = fields.String(required=True)
    image = fields.String(required=True)
    runtimes = fields.List(fields.Nested(NameVersion), required=True)
    packages = fields.List(fields.Nested(NameVersion), required=True)


# --- parameters -------------------------------------------------------------------------------
def _query(name: str, description: str, schema: dict, required: bool = False) -> dict:
    return {
        "in": "query",
        "name": name,
        "required": required,
        "description": description,
        "schema": schema,
    }


POOL = {
    "in": "path",
    "name": "pool",
    "required": True,
    "description": "the pool (pools.toml)",
    "schema": {"type": "string"},
}
FILE_NAME = {
    "in": "path",
    "name": "name",
    "required": True,
    "description": "the file's path under /mnt/data (or under `path`); it may hold slashes",
    "schema": {"type": "string"},
}
API_VERSION = _query(
    "api-version",
    "picks the response shape where the generations differ: 2024-02-02-preview and "
    "2024-08-02-preview are the legacy generation, any other value the current one",
    {"type": "string"},
)
IDENTIFIER_PARAM = _query(
    "identifier",
    "names the session within the key's tenant and the pool; its first use makes the session",
    {"type": "string", "pattern": IDENTIFIER.pattern},
    required=True,
)
EXISTING_IDENTIFIER = {
    **IDENTIFIER_PARAM,
    "description": "names the session within the key's tenant and the pool; never makes one",
}
DIRECTORY = _query(
    "path", "a directory under /mnt/data (relative, or absolute under it)", {"type": "string"}
)
RECURSIVE = _query("recursive", "list the whole tree", {"type": "boolean"})
SKIP = _query("skip", f"sessions to skip (pages of {LIST_PAGE})", {"type": "integer", "minimum": 0})
IDEMPOTENCY_KEY = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "description": "the same key (per tenant, for 24 h) returns the first execution",
    "schema": {"type": "string"},
}


# --- request bodies ---------------------------------------------------------------------------
def _code(description: str) -> dict:
    return {
        "type": "string",
        "minLength": 1,
        "description": f"{description}; at most {MAX_CODE_BYTES} bytes of UTF-8",
    }


# How api/dynamic_sessions.py reads the whole-number fields.
_WHOLE = "a number with a fraction is rounded down"


def execution_request(settings: Settings) -> dict:
    """The fields of an execution request, as both generations send them."""
    return {
        "type": "object",
        "description": "one of `code`, `pythonCode` or `shellCommand` is required; other "
        "fields are ignored",
        "anyOf": [{"required": [name]} for name in ("code", "pythonCode", "shellCommand")],
        "properties": {
            "code": _code("Python source"),
            "pythonCode": _code("Python source (another spelling of `code`)"),
            "shellCommand": _code("a bash command, run in /mnt/data"),
            "codeInputType": {
                "type": "string",
                "enum": ["Inline", "inline"],
                "description": "`inline` in any case, the only kind",
            },
            "executionType": {
                "type": "string",
                "enum": ["Synchronous", "Asynchronous", "synchronous", "asynchronous"],
                "description": "Synchronous (the default) waits and answers 200; Asynchronous "
                "answers 202 at once (either in any case)",
            },
            "timeoutInSeconds": {
                "type": "integer",
                "minimum": 1,
                "maximum": settings.max_timeout_s,
                "nullable": True,
                "description": f"default {settings.default_timeout_s}; {_WHOLE}",
            },
            "outputStreamsMaxLength": {
                "type": "integer",
                "minimum": 0,
                "maximum": settings.max_output_cap,
                "nullable": True,
                "description": f"characters of stdout and stderr kept, each (default "
                f"{DEFAULT_MAX_OUTPUT}; docs/limits.md); {_WHOLE}",
            },
        },
    }


def _json_body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _upload_body(settings: Settings) -> dict:
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "the file; its name (a bare name or "
                            f"/mnt/data/<name>) is where it goes; at most "
                            f"{settings.max_upload_bytes} bytes",
                        }
                    },
                }
            }
        },
    }


# --- responses --------------------------------------------------------------------------------
def _ok(schema, description: str = "OK", headers: dict | None = None) -> dict:
    response: dict = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


NO_CONTENT = {"204": {"description": "done; no body"}}
BYTES = {
    "200": {
        "description": "the file's bytes, streamed; Content-Length is its size",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
_OPERATION_HEADERS = {
    "operation-id": {
        "description": "the execution's id",
        "required": True,
        "schema": {"type": "string"},
    },
    "Operation-Location": {
        "description": "the URL to poll",
        "required": True,
        "schema": {"type": "string"},
    },
}


def operations(settings: Settings) -> dict[str, dict]:
    """View name (api/dynamic_sessions.py) -> its OpenAPI operation."""
    per_session = [API_VERSION, IDENTIFIER_PARAM]
    existing = [API_VERSION, EXISTING_IDENTIFIER]
    files = [*per_session, DIRECTORY]
    return {
        "code_execute": {
            "summary": "Run code and wait for it (legacy generation)",
            "parameters": per_session,
            "requestBody": _json_body(
                {
                    "type": "object",
                    "required": ["properties"],
                    "properties": {"properties": execution_request(settings)},
                }
            ),
            "responses": {"200": _ok(LegacyExecution, "the finished execution")},
        },
        "create_execution": {
            "summary": "Run code or a shell command (current generation)",
            "parameters": [*per_session, IDEMPOTENCY_KEY],
            "requestBody": _json_body(execution_request(settings)),
            "responses": {
                "200": _ok(
                    CurrentExecution, "Synchronous: the finished execution", _OPERATION_HEADERS
                ),
                "202": _ok(
                    CurrentExecution, "Asynchronous: the execution as it stands", _OPERATION_HEADERS
                ),
            },
        },
        "get_execution": {
            "summary": "Poll an execution",
            "parameters": [
                API_VERSION,
                _query(
                    "identifier",
                    "ignored: the execution id names the execution",
                    {"type": "string"},
                ),
            ],
            "responses": {"200": _ok(CurrentExecution)},
        },
        "legacy_upload": {
            "summary": "Upload a file (legacy generation)",
            "parameters": files,
            "requestBody": _upload_body(settings),
            "responses": {"200": _ok(LegacyFileList, "the file written")},
        },
        "upload": {
            "summary": "Upload a file (current generation)",
            "parameters": files,
            "requestBody": _upload_body(settings),
            "responses": {"200": _ok(CurrentFile, "the file written")},
        },
        "list_files": {
            "summary": "List a directory: the legacy shape for a legacy api-version",
            "parameters": [*files, RECURSIVE],
            "responses": {
                "200": _ok({"oneOf": [CurrentFileList, LegacyFileList]}),
            },
        },
        "legacy_download": {
            "summary": "Download a file (legacy generation)",
            "parameters": files,
            "responses": BYTES,
        },
        "download": {
            "summary": "Download a file (current generation)",
            "parameters": files,
            "responses": BYTES,
        },
        "stat_file": {
            "summary": "A file's or directory's description",
            "parameters": files,
            "responses": {"200": _ok(CurrentFile)},
        },
        "delete_file": {
            "summary": "Delete a file (or an empty directory)",
            "parameters": files,
            "responses": NO_CONTENT,
        },
        "get_session": {
            "summary": "The identifier's session",
            "parameters": existing,
            "responses": {"200": _ok(IdentifierSession)},
        },
        "delete_session": {
            "summary": "End the identifier's session; its next use makes a fresh one",
            "parameters": existing,
            "responses": NO_CONTENT,
        },
        "list_sessions": {
            "summary": "The tenant's identifier sessions in the pool",
            "parameters": [API_VERSION, SKIP],
            "responses": {"200": _ok(IdentifierSessionList)},
        },
        "metadata": {
            "summary": "Runtimes and preinstalled packages of the pool's image",
            "parameters": [API_VERSION],
            "responses": {"200": _ok(PoolMetadata)},
        },
        "management_get_session": {
            "summary": "The identifier's session (management spelling: expiresAt)",
            "parameters": existing,
            "responses": {"200": _ok(ManagementSession)},
        },
        "management_stop_session": {
            "summary": "End the identifier's session",
            "parameters": existing,
            "responses": NO_CONTENT,
        },
        "management_list_sessions": {
            "summary": "The tenant's identifier sessions in the pool, with a count and nextLink",
            "parameters": [API_VERSION, SKIP],
            "responses": {"200": _ok(ManagementSessionList)},
        },
    }


def document(app: Flask, spec: APISpec, settings: Settings, blueprint: str) -> None:
    """Describe every route of the dynamic-sessions blueprint in `spec`, at its own URL rule.
    A route without an entry in `operations` is a KeyError: nothing goes undocumented."""
    described = operations(settings)
    spec.tag({"name": TAG, "description": TAG_DESCRIPTION})
    for rule in app.url_map.iter_rules():
        prefix, _, view = rule.endpoint.partition(".")
        if prefix != blueprint:
            continue
        methods = sorted(m.lower() for m in (rule.methods or ()) if m not in ("HEAD", "OPTIONS"))
        operation = {**described[view], "tags": [TAG]}
        path_parameters = [POOL] + ([FILE_NAME] if "name" in rule.arguments else [])
        spec.path(
            rule=rule,
            operations={method: operation for method in methods},
            parameters=path_parameters,
        )
