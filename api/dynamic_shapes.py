"""Response shapes of the dynamic-sessions API (both generations), from Shoal's own records.

The contract is described in docs/api.md. Pure functions: no Redis, no Flask.
"""

from __future__ import annotations

import ast
import json
import math
import mimetypes
from typing import Any

from shoal import sessions
from shoal.timeutil import iso

LEGACY_VERSIONS = frozenset({"2024-02-02-preview", "2024-08-02-preview"})

CURRENT_STATUS = {
    "queued": "NotStarted",
    "running": "Running",
    "succeeded": "Succeeded",
    "failed": "Failed",
    "timed_out": "Failed",
    "lost": "Failed",
    "cancelled": "Canceled",
}


def is_legacy(api_version: str) -> bool:
    return api_version in LEGACY_VERSIONS


def _json_value(text: str) -> Any:
    """The value of a Python repr when it is plain JSON data, else the repr itself."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return text
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return text
    if isinstance(value, float) and not math.isfinite(value):
        return text
    if isinstance(value, list | tuple | dict):
        # Containers stay their (IPython pretty) repr: AutoGen's get_available_packages splits
        # a list's text on ",\n", and functions with package requirements depend on it.
        return text
    return value


def _first_png(record: dict) -> str | None:
    for item in [record.get("result") or {}] + [o.get("data", {}) for o in record["outputs"]]:
        if "image/png" in item:
            return item["image/png"]
    return None


def failure_text(record: dict) -> str:
    """What a client of the reference service finds in stderr when an execution fails."""
    parts = [record["stderr"]]
    error = record.get("error")
    if error and error.get("traceback") and error["traceback"] not in record["stderr"]:
        parts.append(error["traceback"])
    if record["status"] == "timed_out":
        parts.append(f"Execution timed out after {record['timeout_s']} s.")
    return "\n".join(p for p in parts if p)


def legacy_result(record: dict) -> Any:
    png = _first_png(record)
    if png is not None:
        return {"type": "image", "format": "png", "base64_data": png}
    result = record.get("result")
    if not result:
        return ""
    if "application/json" in result:
        return result["application/json"]
    return _json_value(result.get("text/plain", ""))


def truncation(record: dict, result_name: str, with_outputs: bool) -> dict:
    """What was cut, in fields the reference service does not have (added ones: its clients
    ignore them): the streams at max_output; the result, and with_outputs the displayed
    outputs too (the legacy result is the first image displayed, when there is one); the
    notes saying what was cut or dropped and why."""
    cut = bool(record.get("result_truncated"))
    if with_outputs:
        cut = cut or bool(record.get("outputs_truncated"))
    return {
        "stdoutTruncated": record["stdout_truncated"],
        "stderrTruncated": record["stderr_truncated"],
        f"{result_name}Truncated": cut,
        "outputNotes": record.get("output_notes") or [],
    }


def legacy_execution(record: dict) -> dict:
    ok = record["status"] == "succeeded"
    return {
        "$id": "1",
        "properties": {
            "$id": "2",
            "status": "Success" if ok else "Failure",
            "stdout": record["stdout"],
            "stderr": record["stderr"] if ok else failure_text(record),
            "result": legacy_result(record) if ok else "",
            "executionTimeInMilliseconds": round(record["duration_ms"] or 0),
            **truncation(record, "result", with_outputs=True),
        },
    }


def current_execution(record: dict, identifier: str, execution_type: str) -> dict:
    status = CURRENT_STATUS[record["status"]]
    if record["language"] == "shell" and record["exit_code"] is not None:
        status = str(record["exit_code"])
    result = (record.get("result") or {}).get("text/plain")
    if record["status"] in ("queued", "running"):
        body_result = None
    else:
        body_result = {
            "stdout": record["stdout"],
            "stderr": record["stderr"] if record["status"] == "succeeded" else failure_text(record),
            "executionResult": None if result in (None, "None") else result,
            "executionTimeInMilliseconds": round(record["duration_ms"] or 0),
            **truncation(record, "executionResult", with_outputs=False),
        }
    return {
        "id": record["id"],
        "identifier": identifier,
        "executionType": execution_type,
        "status": status,
        "result": body_result,
    }


def legacy_file(info: dict, index: int = 2) -> dict:
    return {
        "$id": str(index),
        "properties": {
            "$id": str(index + 1),
            "filename": info["path"],
            "size": info["size"],
            "lastModifiedTime": iso(info["mtime"]),
        },
    }


def legacy_file_list(infos: list[dict]) -> dict:
    files = [i for i in infos if i["type"] == "file"]
    return {"$id": "1", "value": [legacy_file(info, 2 + 2 * n) for n, info in enumerate(files)]}


def current_file(info: dict) -> dict:
    is_dir = info["type"] == "directory"
    content_type = None if is_dir else mimetypes.guess_type(info["name"])[0]
    return {
        "name": info["name"],
        "type": "Directory" if is_dir else "File",
        "contentType": content_type or (None if is_dir else "application/octet-stream"),
        "sizeInBytes": info["size"],
        "lastModifiedAt": iso(info["mtime"]),
    }


def current_file_list(infos: list[dict]) -> dict:
    return {"value": [current_file(i) for i in infos], "nextLink": None}


def session_view(entry: dict, expires_key: str = "expireAt") -> dict:
    """A session as the reference service shows one; a sleeping session expires at the end of
    its retention (docs/api.md, "Sleeping sessions")."""
    return {
        "identifier": entry["identifier"],
        "createdAt": iso(float(entry["created_at"])),
        "lastAccessedAt": iso(float(entry["last_used_at"])),
        expires_key: iso(sessions.expires_at(entry)),
        "etag": f'"{entry["id"]}-{entry["last_used_at"]}"',
    }
