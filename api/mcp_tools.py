"""The tools of the MCP endpoint (/pools/{pool}/mcp): the three of Azure's platform-managed MCP
server for dynamic sessions, with its names, arguments and results, and three for files.

- `launchShell` makes a Shoal session in the endpoint's pool for the caller's tenant; its id is
  the `environmentId` that every other tool takes.
- `runPythonCodeInRemoteEnvironment` and `runShellCommandInRemoteEnvironment` run code in it and
  wait for the end, as a synchronous dynamic-sessions execution does (same output bounds).
- `uploadFileToRemoteEnvironment`, `listFilesInRemoteEnvironment` and
  `downloadFileFromRemoteEnvironment` move files of /mnt/data. Their bytes travel base64 inside
  one JSON-RPC message, so a file is at most `file_limit` bytes (derived from the JSON body
  limit); the REST routes stream larger ones.

An environmentId is read as a session of the caller's tenant in the endpoint's pool: another
tenant's id, or a session of another pool, is "no session" exactly as an id that never existed.
The tools reach sessions only through the use cases (shoal/use_cases/), as the REST routes do, so
the tenant's quotas, the pool's caps, the limits and idle expiry apply unchanged.

Plain functions of (Caller, arguments), no MCP SDK and no Flask: api/mcp_server.py serves them.
A tool fails with a ShoalError; `call` makes any failure an error Outcome carrying its code.
"""

from __future__ import annotations

import base64
import binascii
import logging
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import kombu.exceptions
import redis

from api.dynamic_shapes import CURRENT_STATUS, failure_text, truncation
from api.request_bounds import JSON_ENVELOPE_BYTES, json_body_limit
from api.schemas import code_problem
from shoal import sessions
from shoal.context import Context
from shoal.errors import (
    PayloadTooLarge,
    SessionNotFound,
    ShoalError,
    StoreUnavailable,
    ValidationFailed,
)
from shoal.protocol import DEFAULT_MAX_OUTPUT, FILE_CHUNK, MAX_CODE_BYTES
from shoal.records import ExecutionRecord, SessionEntry
from shoal.settings import Settings
from shoal.timeutil import iso
from shoal.use_cases import executions as execution_cases
from shoal.use_cases import files as file_cases
from shoal.use_cases import sessions as session_cases

log = logging.getLogger("shoal.mcp")

# A session id is 24 characters (shoal/sessions.py new_id); anything much longer is no id.
ENVIRONMENT_ID_CHARS = 64
# The guest takes paths of up to 4096 characters (vm-images/agent/files.py MAX_PATH_CHARS).
PATH_CHARS = 4096
# Entries a listing returns: enough for an agent to find its files, bounded for its context.
MAX_LISTED = 1000
# Arguments of execCommandAndArgs: the joined command is bounded by MAX_CODE_BYTES besides.
MAX_ARGS = 1000
IMAGE_TYPES = ("image/png", "image/jpeg")

Arguments = dict[str, Any]


@dataclass(frozen=True)
class Caller:
    """Who calls a tool, and where: the request's tenant (its API key's) and the endpoint's pool."""

    context: Context
    tenant: str
    pool: str


@dataclass(frozen=True)
class Outcome:
    """A tool's answer: `structured` is its result (or {"error": {...}} when `is_error`); images
    are (MIME type, base64) pairs an execution displayed, sent beside it as image content."""

    structured: dict[str, Any]
    images: tuple[tuple[str, str], ...] = ()
    is_error: bool = False


@dataclass(frozen=True)
class Tool:
    name: str
    title: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    run: Callable[[Caller, Arguments], Outcome]
    read_only: bool = False


def file_limit(settings: Settings) -> int:
    """The largest file the file tools move: base64 (4 characters for 3 bytes) in one JSON-RPC
    message, it must fit in the JSON body limit with the envelope's room to spare, and never
    beyond SHOAL_MAX_UPLOAD_BYTES. 4.5 MiB by default."""
    room = json_body_limit(settings) - JSON_ENVELOPE_BYTES
    return min(settings.max_upload_bytes, room // 4 * 3)


# --- arguments --------------------------------------------------------------------------------
def _string(args: Arguments, name: str, max_chars: int, required: bool = True) -> str:
    value = args.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        need = "is required: a non-empty string" if required else "must be a string"
        raise ValidationFailed(f"`{name}` {need}")
    if len(value) > max_chars:
        raise ValidationFailed(f"`{name}` is {len(value)} characters long; at most {max_chars}")
    return value


def _code(args: Arguments, name: str) -> str:
    code = _string(args, name, MAX_CODE_BYTES)
    problem = code_problem(code)
    if problem:
        raise ValidationFailed(f"`{name}`: {problem}")
    return code


def _path(args: Arguments, name: str, required: bool = True) -> str:
    path = _string(args, name, PATH_CHARS, required)
    if "\0" in path:
        raise ValidationFailed(f"`{name}` holds a NUL character")
    return path


def _timeout(settings: Settings, args: Arguments) -> int:
    value = args.get("timeoutInSeconds")
    if value is None:
        return settings.default_timeout_s
    high = settings.max_timeout_s
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValidationFailed(f"`timeoutInSeconds` must be a whole number from 1 to {high}")
    return value


def _boolean(args: Arguments, name: str) -> bool:
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise ValidationFailed(f"`{name}` must be true or false")
    return value


def _shell_command(args: Arguments) -> str:
    """`shellCommand`, or `execCommandAndArgs` (a command and its arguments, quoted here):
    one of the two, as the reference tool takes them."""
    argv = args.get("execCommandAndArgs")
    if argv is None:
        return _code(args, "shellCommand")
    if "shellCommand" in args:
        raise ValidationFailed("send `shellCommand` or `execCommandAndArgs`, not both")
    if (
        not isinstance(argv, list)
        or not 1 <= len(argv) <= MAX_ARGS
        or not all(isinstance(a, str) for a in argv)
        or not argv[0]
    ):
        raise ValidationFailed(
            f"`execCommandAndArgs` must be a list of 1 to {MAX_ARGS} strings, "
            "the command first (not empty)"
        )
    return _code({"execCommandAndArgs": shlex.join(argv)}, "execCommandAndArgs")


def _content(settings: Settings, args: Arguments) -> bytes:
    content = args.get("content")
    encoding = args.get("encoding", "text")
    if not isinstance(content, str):
        raise ValidationFailed(
            "`content` is required: the file's text, or its bytes in base64 with "
            '`encoding` "base64"'
        )
    if encoding == "base64":
        try:
            data = base64.b64decode("".join(content.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValidationFailed("`content` is not valid base64") from None
    elif encoding == "text":
        try:
            data = content.encode()
        except UnicodeEncodeError:
            raise ValidationFailed("`content` is not valid Unicode text") from None
    else:
        raise ValidationFailed('`encoding` must be "text" or "base64"')
    _check_size(settings, len(data))
    return data


def _check_size(settings: Settings, size: int) -> None:
    limit = file_limit(settings)
    if size > limit:
        raise PayloadTooLarge(
            f"the file is {size} bytes; the MCP file tools move at most {limit} bytes (base64 in "
            "one message): use the REST routes (PUT/GET /v1/sessions/{id}/files/{path}, which "
            "stream) for larger files"
        )


# --- the environment ------------------------------------------------------------------------
def _environment(caller: Caller, args: Arguments) -> SessionEntry:
    """The caller's live session named by `environmentId`, in this pool; SessionNotFound with
    the same message for another tenant's id, another pool's session and an id never made."""
    environment_id = _string(args, "environmentId", ENVIRONMENT_ID_CHARS)
    entry = sessions.get_for_tenant(caller.context.redis, caller.tenant, environment_id)
    if entry["pool"] != caller.pool:
        raise SessionNotFound(f"no session {environment_id!r}")
    return entry


# --- results ----------------------------------------------------------------------------------
def python_view(record: ExecutionRecord) -> dict[str, Any]:
    """A finished Python execution as runPythonCodeInRemoteEnvironment answers it."""
    ok = record["status"] == "succeeded"
    result = (record.get("result") or {}).get("text/plain")
    return {
        "status": CURRENT_STATUS[record["status"]],
        "stdout": record["stdout"],
        "stderr": record["stderr"] if ok else failure_text(record),
        "result": None if result in (None, "None") else result,
        "executionTimeInMilliseconds": round(record["duration_ms"] or 0),
        **truncation(record, "result", with_outputs=True),
    }


def shell_view(record: ExecutionRecord) -> dict[str, Any]:
    """A finished shell command as runShellCommandInRemoteEnvironment answers it."""
    cut = truncation(record, "result", with_outputs=False)
    return {
        "status": CURRENT_STATUS[record["status"]],
        "exitCode": record["exit_code"],
        "stdout": record["stdout"],
        "stderr": record["stderr"] if record["status"] == "succeeded" else failure_text(record),
        "executionTimeInMilliseconds": round(record["duration_ms"] or 0),
        "stdoutTruncated": cut["stdoutTruncated"],
        "stderrTruncated": cut["stderrTruncated"],
        "outputNotes": cut["outputNotes"],
    }


def images_of(record: ExecutionRecord) -> tuple[tuple[str, str], ...]:
    """The images of the result and of the displayed outputs, base64, as the guest kept them
    within the rich-output budget (docs/limits.md, "Outputs")."""
    parts = [record.get("result") or {}] + [o.get("data") or {} for o in record["outputs"]]
    return tuple((mime, part[mime]) for part in parts for mime in IMAGE_TYPES if mime in part)


def file_view(info: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": info["path"],
        "name": info["name"],
        "type": info["type"],
        "sizeInBytes": info["size"],
        "lastModifiedAt": iso(info["mtime"]),
    }


def error_view(exc: ShoalError) -> dict[str, Any]:
    error: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.retry_after_s:
        error["retryAfterSeconds"] = exc.retry_after_s
    return {"error": error}


# --- the tools --------------------------------------------------------------------------------
def launch_shell(caller: Caller, args: Arguments) -> Outcome:
    entry = session_cases.create_session(caller.context, caller.tenant, caller.pool)
    return Outcome({"environmentId": entry["id"]})


def _run(caller: Caller, args: Arguments, code: str, language: str) -> ExecutionRecord:
    params = {
        "code": code,
        "language": language,
        "timeout_s": _timeout(caller.context.settings, args),
        "max_output": DEFAULT_MAX_OUTPUT,
    }
    entry = _environment(caller, args)
    return execution_cases.run_execution(caller.context, entry, params, wait=True)


def run_python(caller: Caller, args: Arguments) -> Outcome:
    record = _run(caller, args, _code(args, "pythonCode"), "python")
    return Outcome(python_view(record), images_of(record))


def run_shell(caller: Caller, args: Arguments) -> Outcome:
    return Outcome(shell_view(_run(caller, args, _shell_command(args), "shell")))


def upload_file(caller: Caller, args: Arguments) -> Outcome:
    path = _path(args, "path")
    data = _content(caller.context.settings, args)
    entry = _environment(caller, args)
    chunks = [data[i : i + FILE_CHUNK] for i in range(0, len(data), FILE_CHUNK)]
    return Outcome(file_view(file_cases.upload_file(caller.context, entry, path, chunks)))


def list_files(caller: Caller, args: Arguments) -> Outcome:
    path = _path(args, "path", required=False)
    recursive = _boolean(args, "recursive")
    entry = _environment(caller, args)
    found = file_cases.file_op(caller.context, entry, "list", path=path, recursive=recursive)
    files = found["files"]
    return Outcome(
        {
            "path": path,
            "files": [file_view(f) for f in files[:MAX_LISTED]],
            "truncated": len(files) > MAX_LISTED,
        }
    )


def _read_capped(settings: Settings, chunks: Iterator[bytes]) -> bytes:
    """The download's bytes, refused once they pass file_limit (a file that grew after it was
    stat'ed); stopping early closes the stream, which cancels the transfer."""
    data = bytearray()
    try:
        for chunk in chunks:
            data += chunk
            _check_size(settings, len(data))
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return bytes(data)


def download_file(caller: Caller, args: Arguments) -> Outcome:
    c = caller.context
    path = _path(args, "path")
    entry = _environment(caller, args)
    stat = file_cases.file_op(c, entry, "stat", path=path)["file"]
    if stat["type"] == "file":
        _check_size(c.settings, stat["size"])
    info, chunks = file_cases.download_file(c, entry, path)
    data = _read_capped(c.settings, chunks)
    return Outcome(
        {
            "path": info["path"],
            "name": info["name"],
            "sizeInBytes": len(data),
            "contentBase64": base64.b64encode(data).decode("ascii"),
        }
    )


def call(caller: Caller, tool: Tool, args: Arguments) -> Outcome:
    """Run `tool`; every failure is an error Outcome with its code: a ShoalError as itself, Redis
    or the task queue not answering as StoreUnavailable, anything else as InternalError (logged
    with its traceback, never shown)."""
    environment = args.get("environmentId")
    try:
        unknown = sorted(set(args) - set(tool.input_schema["properties"]))
        if unknown:
            accepted = ", ".join(tool.input_schema["properties"]) or "none"
            raise ValidationFailed(f"unknown argument(s) {unknown}; {tool.name} takes: {accepted}")
        outcome = tool.run(caller, args)
    except ShoalError as exc:
        outcome = Outcome(error_view(exc), is_error=True)
    except (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError) as exc:
        log.error("mcp tool=%s tenant=%s: Redis unavailable: %s", tool.name, caller.tenant, exc)
        unavailable = StoreUnavailable("Shoal's Redis does not answer (restarting?); retry shortly")
        outcome = Outcome(error_view(unavailable), is_error=True)
    except Exception:
        log.exception("mcp tool=%s tenant=%s pool=%s failed", tool.name, caller.tenant, caller.pool)
        internal = ShoalError("internal error; see the API log")
        outcome = Outcome(error_view(internal), is_error=True)
    if not isinstance(environment, str) or len(environment) > ENVIRONMENT_ID_CHARS:
        environment = outcome.structured.get("environmentId", "")
    code = outcome.structured["error"]["code"] if outcome.is_error else "ok"
    log.info(
        "mcp tool=%s tenant=%s pool=%s session=%s outcome=%s",
        tool.name, caller.tenant, caller.pool, environment, code,
    )  # fmt: skip
    return outcome
