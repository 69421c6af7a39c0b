"""Native API: files in a session's /mnt/data (/v1/sessions/{id}/files)."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator

from flask import Response, request, stream_with_context
from flask_smorest import Blueprint
from marshmallow import Schema, fields

from api.auth import require_tenant, tenant_session
from api.context import ctx
from api.request_bounds import MULTIPART_SLACK, streamed_upload
from shoal.errors import PayloadTooLarge, ValidationFailed
from shoal.protocol import FILE_CHUNK
from shoal.timeutil import iso
from shoal.use_cases import files as file_cases

blp = Blueprint("v1_files", __name__, url_prefix="/v1", description="Files in /mnt/data")
blp.before_request(require_tenant)


class FileOut(Schema):
    path = fields.String(metadata={"description": "relative to /mnt/data"})
    name = fields.String()
    type = fields.String(metadata={"description": "file | directory"})
    size = fields.Integer()
    modified_at = fields.String()


class FileList(Schema):
    files = fields.List(fields.Nested(FileOut))


class ListQuery(Schema):
    path = fields.String(load_default="")
    recursive = fields.Boolean(load_default=False)


# The bodies these routes stream themselves, for /openapi.json.
RAW_BODY_DOC = {
    "requestBody": {
        "required": False,
        "description": "the file's bytes (none: an empty file)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
MULTIPART_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "path": {"type": "string", "description": "the directory to put it in"},
                    },
                }
            }
        },
    }
}
DOWNLOAD_DOC = {
    "responses": {
        "200": {
            "description": "the file's bytes, streamed; Content-Length is its size",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    }
}


def file_view(info: dict) -> dict:
    return {
        "path": info["path"],
        "name": info["name"],
        "type": info["type"],
        "size": info["size"],
        "modified_at": iso(info["mtime"]),
    }


def capped_chunks(stream, limit: int) -> Iterator[bytes]:
    """Read a body in FILE_CHUNK pieces; PayloadTooLarge once it passes `limit` bytes."""
    total = 0
    while chunk := stream.read(FILE_CHUNK):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"the file is over the {limit}-byte upload limit")
        yield chunk


def _check_length(length: int | None, slack: int = 0) -> None:
    limit = ctx().settings.max_upload_bytes
    if length is not None and length > limit + slack:
        raise PayloadTooLarge(f"the file ({length} bytes) is over the {limit}-byte upload limit")


def check_part(upload) -> None:
    """413 for a multipart file part over the cap, before any byte goes to the session. Werkzeug
    has already spooled the part (to disk past 500 KB), so its size is known and the guest
    never sees an upload that would be cut off halfway."""
    stream = upload.stream
    stream.seek(0, os.SEEK_END)
    size = stream.tell()
    stream.seek(0)
    _check_length(size)


@blp.get("/sessions/<session_id>/files")
@blp.arguments(ListQuery, location="query")
@blp.response(200, FileList)
def list_files(query: dict, session_id: str):
    answer = file_cases.file_op(ctx(), tenant_session(session_id), "list", **query)
    return {"files": [file_view(f) for f in answer["files"]]}


@blp.put("/sessions/<session_id>/files/<path:path>")
@blp.response(201, FileOut)
@blp.doc(**RAW_BODY_DOC)
@streamed_upload
def put_file(session_id: str, path: str):
    """Upload the raw request body to `path`; parent directories are created."""
    entry = tenant_session(session_id)
    _check_length(request.content_length)
    chunks = capped_chunks(request.stream, ctx().settings.max_upload_bytes)
    return file_view(file_cases.upload_file(ctx(), entry, path, chunks))


@blp.post("/sessions/<session_id>/files")
@blp.response(201, FileOut)
@blp.doc(**MULTIPART_DOC)
@streamed_upload
def post_file(session_id: str):
    """Multipart upload: part `file`; optional form field `path` names a directory."""
    entry = tenant_session(session_id)
    _check_length(request.content_length, MULTIPART_SLACK)
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise ValidationFailed("send the file as multipart/form-data part named `file`")
    check_part(upload)
    # Relative to /mnt/data, or absolute under it: the guest refuses anything else.
    folder = request.form.get("path", "").rstrip("/")
    name = upload.filename.rsplit("/", 1)[-1]
    target = f"{folder}/{name}" if folder else name
    chunks = capped_chunks(upload.stream, ctx().settings.max_upload_bytes)
    return file_view(file_cases.upload_file(ctx(), entry, target, chunks))


@blp.get("/sessions/<session_id>/files/<path:path>")
@blp.doc(**DOWNLOAD_DOC)
def get_file(session_id: str, path: str):
    """Download a file, streamed from the guest."""
    info, chunks = file_cases.download_file(ctx(), tenant_session(session_id), path)
    response = Response(stream_with_context(chunks), mimetype="application/octet-stream")
    response.headers["Content-Length"] = str(info["size"])
    response.headers["Content-Disposition"] = attachment(info["name"])
    return response


def attachment(name: str) -> str:
    """The Content-Disposition of a download. The name is the guest's, hence hostile: control
    characters, quotes or a line break must not reach the header raw (gunicorn refuses such a
    header, and a client would misread it). An ASCII fallback, and the exact name encoded as
    RFC 6266 `filename*` for clients that read it."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    exact = urllib.parse.quote(name.encode("utf-8", "replace"), safe="")
    return f"attachment; filename=\"{fallback or 'file'}\"; filename*=UTF-8''{exact}"


@blp.delete("/sessions/<session_id>/files/<path:path>")
@blp.response(204)
def delete_file(session_id: str, path: str):
    file_cases.file_op(ctx(), tenant_session(session_id), "delete", path=path)
