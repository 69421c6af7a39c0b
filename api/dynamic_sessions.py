"""The dynamic-sessions data-plane API (/pools/{pool}/...), both generations, on Shoal sessions.

Contract: docs/api.md. The bearer token is a Shoal API key; the
`identifier` names a session within the key's tenant and the pool.
"""

from __future__ import annotations

import io
import re

from flask import Blueprint, Response, g, jsonify, request, stream_with_context, url_for
from werkzeug.datastructures import FileStorage
from werkzeug.wrappers import Request

from api import dynamic_shapes as shapes
from api.auth import require_tenant
from api.context import ctx
from api.request_bounds import MULTIPART_SLACK, streamed_upload
from api.schemas import code_problem
from api.v1_files import capped_chunks, check_part
from shoal import executions, sessions
from shoal.errors import PayloadTooLarge, ValidationFailed
from shoal.pools import get_pool
from shoal.protocol import DEFAULT_MAX_OUTPUT
from shoal.use_cases import executions as execution_cases
from shoal.use_cases import files as file_cases
from shoal.use_cases import pools as pool_cases
from shoal.use_cases import sessions as session_cases

blp = Blueprint("dynamic_sessions", __name__, url_prefix="/pools/<pool>")
blp.before_request(require_tenant)

IDENTIFIER = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")
_DIGITS = re.compile(r"[0-9]+")
LIST_PAGE = 300


class _Missing(ValidationFailed):
    code = "SessionPropertiesMissing"


def _identifier(required: bool = True) -> str:
    identifier = request.args.get("identifier", "")
    if not identifier and not required:
        return ""
    if not IDENTIFIER.fullmatch(identifier):  # match() would take a trailing newline
        raise ValidationFailed(
            "query parameter `identifier` is required: 1-128 characters from "
            "letters, digits and _ - . @ :"
        )
    return identifier


def _api_version() -> str:
    return request.args.get("api-version", "")


def _session(pool: str, create: bool = True) -> dict:
    return session_cases.session_for_identifier(ctx(), g.tenant, pool, _identifier(), create)


def _body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ValidationFailed("the request body must be a JSON object")
    return body


def _int_field(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValidationFailed(f"`{name}` must be a number from {low} to {high}")
    return int(value)


def _execution_params(body: dict, code_names: tuple[str, ...]) -> dict:
    s = ctx().settings
    code = next((body[n] for n in code_names if n in body), None)
    language = "shell" if "shellCommand" in body and code is None else "python"
    if language == "shell":
        code = body["shellCommand"]
    if not isinstance(code, str) or not code:
        raise ValidationFailed(f"`{code_names[0]}` is required and must be a non-empty string")
    problem = code_problem(code)
    if problem:
        raise ValidationFailed(problem)
    input_type = str(body.get("codeInputType", "inline")).lower()
    if input_type != "inline":
        raise ValidationFailed("`codeInputType` must be `inline`")
    return {
        "code": code,
        "language": language,
        "timeout_s": _int_field(body, "timeoutInSeconds", s.default_timeout_s, 1, s.max_timeout_s),
        "max_output": _int_field(
            body, "outputStreamsMaxLength", DEFAULT_MAX_OUTPUT, 0, s.max_output_cap
        ),
    }


def _run(entry: dict, params: dict, wait: bool) -> dict:
    c = ctx()
    return execution_cases.run_execution(
        c, entry, params, request.headers.get("Idempotency-Key", ""), wait=wait
    )


# --- executions -------------------------------------------------------------------------------
@blp.post("/code/execute")
def code_execute(pool: str):
    body = _body()
    properties = body.get("properties")
    if not isinstance(properties, dict):
        raise _Missing('the body must be {"properties": {"code": ..., ...}}')
    params = _execution_params(properties, ("code", "pythonCode"))
    record = _run(_session(pool), params, wait=True)
    return jsonify(shapes.legacy_execution(record))


@blp.post("/executions")
def create_execution(pool: str):
    body = _body()
    params = _execution_params(body, ("code", "pythonCode"))
    execution_type = str(body.get("executionType", "Synchronous"))
    asynchronous = execution_type.lower() == "asynchronous"
    entry = _session(pool)
    record = _run(entry, params, wait=not asynchronous)
    response = jsonify(shapes.current_execution(record, entry["identifier"], execution_type))
    response.status_code = 202 if asynchronous else 200
    response.headers["operation-id"] = record["id"]
    response.headers["Operation-Location"] = url_for(
        "dynamic_sessions.get_execution",
        pool=pool,
        execution_id=record["id"],
        identifier=entry["identifier"],
        _external=True,
        **{"api-version": _api_version()},
    )
    return response


@blp.get("/executions/<execution_id>")
def get_execution(pool: str, execution_id: str):
    record = executions.get_for_tenant(ctx().redis, g.tenant, execution_id)
    entry = sessions.load(ctx().redis, record["session_id"]) or {}
    return jsonify(shapes.current_execution(record, entry.get("identifier", ""), "Asynchronous"))


# --- files ------------------------------------------------------------------------------------
def _dir_param() -> str:
    return request.args.get("path", "").strip("/").removeprefix("mnt/data").strip("/")


# A multipart body starts with its boundary line (RFC 2046: 1-70 of these characters).
_BOUNDARY_LINE = re.compile(rb"--([0-9A-Za-z'()+_,./:=?-]{1,70})\r\n")


class _Rewound(io.RawIOBase):
    """The request body again: the bytes already read, then the rest of the stream."""

    def __init__(self, head: bytes, rest) -> None:
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _file_part() -> FileStorage | None:
    """The multipart part `file`. Semantic Kernel's SessionsPythonTool sends its upload labelled
    with the Content-Type that its HTTP client kept from the last code/execute call
    (application/json): a body that starts with a boundary line is multipart, whatever its label."""
    if request.mimetype == "multipart/form-data":
        return request.files.get("file")
    head = request.stream.read(80)
    match = _BOUNDARY_LINE.match(head)
    if match is None:
        return None
    environ = {
        **request.environ,
        "CONTENT_TYPE": "multipart/form-data; boundary=" + match.group(1).decode("ascii"),
        "wsgi.input": io.BufferedReader(_Rewound(head, request.stream)),
    }
    return Request(environ).files.get("file")


def _upload(pool: str) -> dict:
    entry = _session(pool)
    limit = ctx().settings.max_upload_bytes
    if request.content_length and request.content_length > limit + MULTIPART_SLACK:
        raise PayloadTooLarge(f"the upload is over the {limit}-byte limit")
    upload = _file_part()
    if upload is None or not upload.filename:
        raise ValidationFailed("send the file as multipart/form-data part named `file`")
    check_part(upload)
    name = upload.filename.removeprefix("/mnt/data/").strip("/")
    folder = _dir_param()
    target = f"{folder}/{name}" if folder else name
    return file_cases.upload_file(ctx(), entry, target, capped_chunks(upload.stream, limit))


@blp.post("/files/upload")
@streamed_upload
def legacy_upload(pool: str):
    info = _upload(pool)
    return jsonify({"$id": "1", "value": [shapes.legacy_file(info)]})


@blp.post("/files")
@streamed_upload
def upload(pool: str):
    return jsonify(shapes.current_file(_upload(pool)))


@blp.get("/files")
def list_files(pool: str):
    recursive = request.args.get("recursive", "").lower() == "true"
    answer = file_cases.file_op(
        ctx(), _session(pool), "list", path=_dir_param(), recursive=recursive
    )
    if shapes.is_legacy(_api_version()):
        return jsonify(shapes.legacy_file_list(answer["files"]))
    return jsonify(shapes.current_file_list(answer["files"]))


def _file_path(name: str) -> str:
    folder = _dir_param()
    name = name.removeprefix("/mnt/data/").removeprefix("mnt/data/")
    return f"{folder}/{name}" if folder else name


def _download(pool: str, name: str) -> Response:
    info, chunks = file_cases.download_file(ctx(), _session(pool), _file_path(name))
    response = Response(stream_with_context(chunks), mimetype="application/octet-stream")
    response.headers["Content-Length"] = str(info["size"])
    return response


@blp.get("/files/content/<path:name>")
def legacy_download(pool: str, name: str):
    return _download(pool, name)


@blp.get("/files/<path:name>/content")
def download(pool: str, name: str):
    return _download(pool, name)


@blp.get("/files/<path:name>")
def stat_file(pool: str, name: str):
    answer = file_cases.file_op(ctx(), _session(pool), "stat", path=_file_path(name))
    return jsonify(shapes.current_file(answer["file"]))


@blp.delete("/files/<path:name>")
def delete_file(pool: str, name: str):
    file_cases.file_op(ctx(), _session(pool), "delete", path=_file_path(name))
    return "", 204


# --- sessions ---------------------------------------------------------------------------------
@blp.get("/session")
def get_session(pool: str):
    return jsonify(shapes.session_view(_session(pool, create=False)))


@blp.delete("/session")
def delete_session(pool: str):
    session_cases.delete_session(ctx(), _session(pool, create=False))
    return "", 204


LISTED_STATES = (sessions.ACTIVE, sessions.SLEEPING, sessions.WAKING)


def _pool_sessions(pool: str) -> list[dict]:
    get_pool(ctx().settings, pool)
    return [
        e
        for e in sessions.list_for_tenant(ctx().redis, g.tenant)
        if e["pool"] == pool and e.get("identifier") and e["state"] in LISTED_STATES
    ]


# `skip` beyond this many digits skips every session there can be: it is read as this bound
# (Python refuses to read numbers of over 4,300 digits, and a URL may hold more).
_SKIP_DIGITS = 18


def _skip() -> int:
    """The `skip` query parameter: ASCII digits only (str.isdigit also takes '²', which int()
    refuses)."""
    raw = request.args.get("skip", "0")
    if not _DIGITS.fullmatch(raw):
        raise ValidationFailed("`skip` must be a whole number (digits 0-9)")
    digits = raw.lstrip("0") or "0"
    return int(digits) if len(digits) <= _SKIP_DIGITS else 10**_SKIP_DIGITS


@blp.get("/listSessions")
def list_sessions(pool: str):
    page = _pool_sessions(pool)[_skip() :][:LIST_PAGE]
    return jsonify({"sessions": [shapes.session_view(e) for e in page]})


@blp.get("/metadata")
def metadata(pool: str):
    return jsonify(pool_cases.pool_metadata(ctx(), pool))


@blp.post("/.management/getSession")
def management_get_session(pool: str):
    return jsonify(shapes.session_view(_session(pool, create=False), "expiresAt"))


@blp.post("/.management/stopSession")
def management_stop_session(pool: str):
    session_cases.delete_session(ctx(), _session(pool, create=False))
    return "", 204


@blp.post("/.management/listSessions")
def management_list_sessions(pool: str):
    skip = _skip()
    found = _pool_sessions(pool)
    page = found[skip : skip + LIST_PAGE]
    next_link = None
    if skip + LIST_PAGE < len(found):
        next_link = url_for(
            "dynamic_sessions.management_list_sessions",
            pool=pool,
            skip=skip + LIST_PAGE,
            _external=True,
            **{"api-version": _api_version()},
        )
    return jsonify(
        {
            "value": [shapes.session_view(e, "expiresAt") for e in page],
            "count": len(found),
            "nextLink": next_link,
        }
    )
