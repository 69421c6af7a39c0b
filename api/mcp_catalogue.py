"""What the MCP endpoint's `tools/list` says: each tool's name, description and JSON Schemas of
its arguments and result, bound to its function in api/mcp_tools.py.

The three execution tools keep the names and arguments of Azure's platform-managed MCP server
for dynamic sessions (`environmentId`, `pythonCode`, `shellCommand` or `execCommandAndArgs`), so
an agent configured for that server works here; `timeoutInSeconds` and the file tools are
Shoal's. Results are JSON objects (structuredContent) described by each tool's output schema.
"""

from __future__ import annotations

from typing import Any

from api import mcp_tools
from api.mcp_tools import ENVIRONMENT_ID_CHARS, MAX_ARGS, MAX_LISTED, PATH_CHARS, Tool
from shoal.pools import Pool
from shoal.protocol import DEFAULT_MAX_OUTPUT
from shoal.settings import Settings

STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
INTEGER = {"type": "integer"}
STRINGS = {"type": "array", "items": STRING}
ENVIRONMENT_ID = {
    "type": "string",
    "minLength": 1,
    "maxLength": ENVIRONMENT_ID_CHARS,
    "description": "the environmentId launchShell returned",
}


def _object(properties: dict[str, Any], required: list[str], closed: bool = True) -> dict:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if closed:
        schema["additionalProperties"] = False
    return schema


def _path(description: str) -> dict[str, Any]:
    return {"type": "string", "maxLength": PATH_CHARS, "description": description}


def _timeout(settings: Settings) -> dict[str, Any]:
    return {
        "type": "integer",
        "minimum": 1,
        "maximum": settings.max_timeout_s,
        "description": f"stop the code after this many seconds (default "
        f"{settings.default_timeout_s})",
    }


_STREAMS = {
    "stdout": STRING,
    "stderr": {**STRING, "description": "on a failure, the traceback or the reason"},
    "executionTimeInMilliseconds": INTEGER,
    "stdoutTruncated": BOOLEAN,
    "stderrTruncated": BOOLEAN,
    "outputNotes": {**STRINGS, "description": "what was cut or dropped, and why"},
}
_STATUS = {"type": "string", "description": "Succeeded | Failed | Canceled"}
PYTHON_RESULT = _object(
    {
        "status": _STATUS,
        **_STREAMS,
        "result": {
            "type": ["string", "null"],
            "description": "the repr of the last expression's value; null when there is none",
        },
        "resultTruncated": BOOLEAN,
    },
    ["status", "stdout", "stderr", "result"],
    closed=False,
)
SHELL_RESULT = _object(
    {
        "status": _STATUS,
        "exitCode": {"type": ["integer", "null"], "description": "null: the command never ended"},
        **_STREAMS,
    },
    ["status", "exitCode", "stdout", "stderr"],
    closed=False,
)
FILE = _object(
    {
        "path": {**STRING, "description": "relative to /mnt/data"},
        "name": STRING,
        "type": {"type": "string", "enum": ["file", "directory"]},
        "sizeInBytes": INTEGER,
        "lastModifiedAt": STRING,
    },
    ["path", "name", "type", "sizeInBytes", "lastModifiedAt"],
    closed=False,
)
FILE_LIST = _object(
    {
        "path": STRING,
        "files": {"type": "array", "items": FILE},
        "truncated": {**BOOLEAN, "description": f"more than {MAX_LISTED} entries: the first shown"},
    },
    ["path", "files", "truncated"],
    closed=False,
)
DOWNLOAD = _object(
    {
        "path": STRING,
        "name": STRING,
        "sizeInBytes": INTEGER,
        "contentBase64": {**STRING, "description": "the file's bytes, base64"},
    },
    ["path", "name", "sizeInBytes", "contentBase64"],
    closed=False,
)
ENVIRONMENT = _object({"environmentId": STRING}, ["environmentId"], closed=False)


def tools(settings: Settings, pool: Pool) -> dict[str, Tool]:
    """The endpoint's tools by name, for `pool` (its idle cooldown is in the descriptions)."""
    limit = mcp_tools.file_limit(settings)
    streams = (
        f"stdout and stderr keep their first {DEFAULT_MAX_OUTPUT} characters each (the rest is "
        "cut and counted in outputNotes)"
    )
    catalogue = [
        Tool(
            name="launchShell",
            title="Launch a remote environment",
            description=(
                f"Create a new remote environment: a sandboxed Linux VM of pool {pool.name!r} "
                "with a stateful Python interpreter (variables and imports persist between "
                "calls), a shell and a working directory /mnt/data. Returns its environmentId, "
                "which every other tool takes. It ends after "
                f"{pool.cooldown_s} s without use; launch another then."
            ),
            input_schema=_object({}, []),
            output_schema=ENVIRONMENT,
            run=mcp_tools.launch_shell,
        ),
        Tool(
            name="runPythonCodeInRemoteEnvironment",
            title="Run Python in a remote environment",
            description=(
                "Run Python code in an environment (from launchShell) and wait for it: state "
                "persists between calls, as in a notebook. Returns stdout, stderr and the repr "
                "of the last expression's value (result); images it displays (matplotlib) come "
                f"as image content. {streams}."
            ),
            input_schema=_object(
                {
                    "environmentId": ENVIRONMENT_ID,
                    "pythonCode": {**STRING, "minLength": 1, "description": "the code to run"},
                    "timeoutInSeconds": _timeout(settings),
                },
                ["environmentId", "pythonCode"],
            ),
            output_schema=PYTHON_RESULT,
            run=mcp_tools.run_python,
        ),
        Tool(
            name="runShellCommandInRemoteEnvironment",
            title="Run a shell command in a remote environment",
            description=(
                "Run a shell command (bash, in /mnt/data) in an environment (from launchShell) "
                "and wait for it. Send shellCommand, or execCommandAndArgs for a command and "
                f"arguments that need no quoting. Returns stdout, stderr and exitCode; {streams}."
            ),
            input_schema=_object(
                {
                    "environmentId": ENVIRONMENT_ID,
                    "shellCommand": {**STRING, "minLength": 1, "description": "a bash command"},
                    "execCommandAndArgs": {
                        **STRINGS,
                        "minItems": 1,
                        "maxItems": MAX_ARGS,
                        "description": "the command and its arguments, each one string",
                    },
                    "timeoutInSeconds": _timeout(settings),
                },
                ["environmentId"],
            ),
            output_schema=SHELL_RESULT,
            run=mcp_tools.run_shell,
        ),
        Tool(
            name="uploadFileToRemoteEnvironment",
            title="Upload a file to a remote environment",
            description=(
                "Write a file into an environment's /mnt/data (parent directories are made), "
                'from text or, with encoding "base64", from bytes in base64. At most '
                f"{limit} bytes."
            ),
            input_schema=_object(
                {
                    "environmentId": ENVIRONMENT_ID,
                    "path": _path("where to write it: relative to /mnt/data, or under it"),
                    "content": {**STRING, "description": "the file's text, or base64 bytes"},
                    "encoding": {"type": "string", "enum": ["text", "base64"], "default": "text"},
                },
                ["environmentId", "path", "content"],
            ),
            output_schema=FILE,
            run=mcp_tools.upload_file,
        ),
        Tool(
            name="listFilesInRemoteEnvironment",
            title="List files in a remote environment",
            description=(
                "List a directory of an environment's /mnt/data (all of it by default), or with "
                f"recursive true everything below it; at most {MAX_LISTED} entries."
            ),
            input_schema=_object(
                {
                    "environmentId": ENVIRONMENT_ID,
                    "path": _path("the directory, relative to /mnt/data (default: /mnt/data)"),
                    "recursive": {**BOOLEAN, "default": False},
                },
                ["environmentId"],
            ),
            output_schema=FILE_LIST,
            run=mcp_tools.list_files,
            read_only=True,
        ),
        Tool(
            name="downloadFileFromRemoteEnvironment",
            title="Download a file from a remote environment",
            description=(
                "Read a file of an environment's /mnt/data; its bytes come base64 in "
                f"contentBase64. At most {limit} bytes."
            ),
            input_schema=_object(
                {
                    "environmentId": ENVIRONMENT_ID,
                    "path": _path("the file: relative to /mnt/data, or under it"),
                },
                ["environmentId", "path"],
            ),
            output_schema=DOWNLOAD,
            run=mcp_tools.download_file,
            read_only=True,
        ),
    ]
    return {tool.name: tool for tool in catalogue}
