"""What /openapi.json says beyond what flask-smorest derives from the /v1 views.

- Every operation, on /v1 and on the dynamic-sessions routes, lists the errors it may answer, each
  in the one error shape (api/errors.py) with its `x-ms-error-code` header, and a 429 with its
  `Retry-After`; a `default` response covers the rarer ones (405, 415, 507). webargs' 422, which
  Shoal never answers (api/errors.py makes it a 400), is left out.
- The API key: a bearer token on every documented route.

The dynamic-sessions routes are described in api/dynamic_spec.py.
"""

from __future__ import annotations

from apispec import BasePlugin
from marshmallow import Schema, fields

# Status -> what it means on Shoal's routes (docs/api.md, "Errors").
ERROR_STATUSES = {
    400: "The request is malformed: a field, a parameter or the JSON body is not valid "
    "(ValidationFailed; SessionRequestValidationFailed or SessionWithIdentifierNotFound on "
    "/pools/...), or a file path is refused (PathNotAllowed, NotAFile, NotARegularFile)",
    401: "No `Authorization: Bearer <api key>`, or a key that is not valid (Unauthorized)",
    403: "An admin key: it reaches /healthz's details and /metrics, no tenant route (Forbidden)",
    404: "No such session, execution, batch, file, pool or route (for another tenant's ids too)",
    409: "The session was lost, the guest is busy, or a directory is not empty",
    413: "The body is over its route's limit (PayloadTooLarge; docs/limits.md)",
    414: "The URL is over its limit (URITooLong)",
    429: "A fair-share bound was hit: the tenant's request rate, sessions, unfinished "
    "executions, waits or batches, or the pool's sessions (docs/limits.md)",
    431: "The headers are over their limit (RequestHeaderFieldsTooLarge)",
    500: "A bug: the API log has the traceback (InternalError)",
    503: "No worker host is up (NoHostAvailable), Shoal's Redis does not answer "
    "(StoreUnavailable), or the host has no disk space for a new VM (HostStorageFull)",
    504: "The session's host did not answer in time (HostTimeout)",
}
ERROR_CODE_HEADER = "x-ms-error-code"
BEARER = "bearerAuth"


class ErrorInfo(Schema):
    code = fields.String(
        required=True, metadata={"description": "stable; also in the x-ms-error-code header"}
    )
    message = fields.String(required=True, metadata={"description": "what is wrong"})


class Error(Schema):
    """Every error, on every route (docs/api.md, "Errors")."""

    error = fields.Nested(ErrorInfo, required=True)


def error_response_name(status: int) -> str:
    return f"Error{status}"


class ErrorResponsesPlugin(BasePlugin):
    """Adds the error responses to every operation documented through `spec.path`."""

    def operation_helper(self, path=None, operations=None, **kwargs) -> None:
        for operation in (operations or {}).values():
            responses = operation.setdefault("responses", {})
            responses.pop(422, None)
            responses.pop("422", None)
            for status in ERROR_STATUSES:
                if status not in responses and str(status) not in responses:
                    responses[str(status)] = error_response_name(status)
            responses.setdefault("default", "DEFAULT_ERROR")


def register_components(spec) -> None:
    """The error responses and their headers, and the bearer scheme. Called once the spec
    exists, before any path is documented."""
    spec.components.header(
        ERROR_CODE_HEADER,
        {
            "description": "the error's code, as in the body",
            "required": True,
            "schema": {"type": "string"},
        },
    )
    spec.components.header(
        "Retry-After",
        {
            "description": "seconds to wait before asking again (at least 1)",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        },
    )
    for status, description in ERROR_STATUSES.items():
        headers = {ERROR_CODE_HEADER: ERROR_CODE_HEADER}
        if status == 429:
            headers["Retry-After"] = "Retry-After"
        spec.components.response(
            error_response_name(status),
            {
                "description": description,
                "headers": headers,
                "content": {"application/json": {"schema": Error}},
            },
        )
    spec.components.security_scheme(
        BEARER,
        {
            "type": "http",
            "scheme": "bearer",
            "description": "a Shoal API key (`shoal keys create --tenant NAME`)",
        },
    )


def spec_options() -> dict:
    """APISpec options (flask-smorest's API_SPEC_OPTIONS): the key on every operation."""
    return {
        "security": [{BEARER: []}],
        "info": {
            "description": "Shoal's native API (/v1) and the dynamic-sessions API "
            "(/pools/{pool}/...); docs/api.md. The MCP endpoint POST /pools/{pool}/mcp speaks "
            "JSON-RPC and lists its tools itself (docs/clients.md)."
        },
    }
