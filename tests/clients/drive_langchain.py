"""Drive LangChain's SessionsPythonREPLTool and SessionsBashTool (langchain-azure-dynamic-sessions)
against a Shoal pool endpoint, as their users do. Run with the langchain client venv's python:

    SHOAL_ENDPOINT=http://127.0.0.1:8080/pools/default SHOAL_KEY=... \\
        /var/cache/shoal/client-venvs/langchain/bin/python tests/clients/drive_langchain.py

For https, also set REQUESTS_CA_BUNDLE (requests ignores SSL_CERT_FILE) to Shoal's ca.pem.
Prints one JSON line (see driver_common.py); exits non-zero on any mismatch.
"""

from __future__ import annotations

import base64
import json
import logging
import tempfile
import threading
import warnings
from io import BytesIO
from pathlib import Path

from driver_common import Report, file_bytes, run

warnings.simplefilter("ignore")  # the package announces its own deprecation on import

from langchain_azure_dynamic_sessions import (  # noqa: E402
    SessionsBashTool,
    SessionsPythonREPLTool,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Warnings(logging.Handler):
    """Collects what the tool logs at WARNING and above (its session deletes fail silently)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {record.exc_info[1]!r}"
        self.messages.append(text)


def _join_background_threads(timeout: float = 60.0) -> None:
    """close() deletes the session on a daemon thread: wait for it, as a process exit would not."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and thread.daemon:
            thread.join(timeout)


def _call(tool, code: str) -> tuple[dict, dict]:
    """Invoke the tool as an agent does (a ToolCall); return (content as JSON, artifact)."""
    message = tool.invoke(
        {"args": {"python_code": code}, "id": "call-1", "name": tool.name, "type": "tool_call"}
    )
    return json.loads(message.content), message.artifact


def drive_python(report: Report, endpoint: str, key: str, workdir: Path) -> None:
    tool = SessionsPythonREPLTool(
        pool_management_endpoint=endpoint, access_token_provider=lambda: key
    )
    report.session(tool.session_id)

    # 1. State persists between calls; plain-string invoke returns the JSON content.
    with report.timed("first_execute"):
        first = json.loads(tool.invoke("x = 6 * 7\nprint('hello from shoal')"))
    report.check("stdout", first.get("stdout") == "hello from shoal\n", first)
    report.check("no_result_is_empty", first.get("result") in ("", None), first)
    report.check("stderr_empty", first.get("stderr") == "", first)
    with report.timed("second_execute"):
        second, artifact = _call(tool, "x")
    # 42 as JSON (the contract) or as its repr "42": either way the agent reads 42.
    report.check("state_persists", str(second.get("result")) == "42", second)
    report.check("status_success", artifact.get("status") == "Success", artifact)

    # 2. Code that raises: HTTP 200, status Failure, the traceback in stderr.
    failed, artifact = _call(tool, "1 / 0")
    report.check("error_status", artifact.get("status") == "Failure", artifact)
    report.check("error_traceback", "ZeroDivisionError" in (failed.get("stderr") or ""), failed)

    # 3. A matplotlib figure comes back as an image result (base64 removed from the content).
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()"
    with report.timed("image_execute"):
        image, artifact = _call(tool, code)
    result = artifact.get("result")
    png = (
        base64.b64decode(result.get("base64_data", ""))
        if isinstance(result, dict) and isinstance(result.get("base64_data"), str)
        else b""
    )
    report.check(
        "image_result",
        isinstance(image.get("result"), dict)
        and image["result"].get("type") == "image"
        and image["result"].get("format") == "png"
        and png.startswith(PNG_MAGIC),
        None if png.startswith(PNG_MAGIC) else {"content": image, "artifact": artifact},
    )

    # 4. Files: upload (a local file, and raw bytes), list, read in code, download.
    content = file_bytes()
    local = workdir / "data.csv"
    local.write_bytes(content)
    meta = tool.upload_file(local_file_path=str(local))
    report.check(
        "upload_metadata",
        meta.filename == "data.csv" and meta.size_in_bytes == len(content),
        {"filename": meta.filename, "size": meta.size_in_bytes},
    )
    raw = bytes(range(256)) * 4
    meta = tool.upload_file(data=BytesIO(raw), remote_file_path="raw.bin")
    report.check(
        "upload_bytes_metadata",
        meta.filename == "raw.bin" and meta.size_in_bytes == len(raw),
        {"filename": meta.filename, "size": meta.size_in_bytes},
    )
    listed = {f.filename: f.size_in_bytes for f in tool.list_files()}
    report.check(
        "list_files",
        listed.get("data.csv") == len(content) and listed.get("raw.bin") == len(raw),
        listed,
    )
    seen, _ = _call(tool, "print(open('/mnt/data/data.csv').read(), end='')")
    report.check("code_reads_upload", seen.get("stdout") == content.decode(), seen)
    report.check(
        "download_upload", tool.download_file(remote_file_path="data.csv").read() == content
    )
    report.check("download_binary", tool.download_file(remote_file_path="raw.bin").read() == raw)
    _call(tool, "with open('/mnt/data/out.txt', 'w') as f:\n    f.write('written in the session')")
    target = workdir / "out.txt"
    tool.download_file(remote_file_path="out.txt", local_file_path=str(target))
    report.check(
        "download_generated",
        target.exists() and target.read_bytes() == b"written in the session",
        target.read_bytes() if target.exists() else None,
    )

    # 5. close() deletes the session (DELETE session) and rotates the tool's session id.
    log = _Warnings()
    logging.getLogger("langchain_azure_dynamic_sessions").addHandler(log)
    old_id = tool.session_id
    with report.timed("close"):
        tool.close()
        _join_background_threads()
    report.check("close_rotates_id", tool.session_id != old_id)
    report.session(tool.session_id)
    report.check("close_deleted_cleanly", not log.messages, log.messages)
    # The identifier of the deleted session now names a fresh session: x is gone.
    again = SessionsPythonREPLTool(
        pool_management_endpoint=endpoint, access_token_provider=lambda: key, session_id=old_id
    )
    fresh, artifact = _call(again, "x")
    report.check(
        "deleted_state_gone",
        artifact.get("status") == "Failure" and "NameError" in (fresh.get("stderr") or ""),
        fresh,
    )
    again.close()
    _join_background_threads()
    report.check("second_close_clean", not log.messages, log.messages)


def drive_bash(report: Report, endpoint: str, key: str) -> None:
    bash = SessionsBashTool(pool_management_endpoint=endpoint, access_token_provider=lambda: key)
    report.session(bash.session_id)
    with report.timed("bash_first_execute"):
        out = json.loads(bash.invoke("echo hello; echo oops >&2; echo kept > /mnt/data/b.txt"))
    report.check(
        "bash_output",
        out.get("stdout") == "hello\n"
        and out.get("stderr") == "oops\n"
        and out.get("exitCode") == 0,
        out,
    )
    out = json.loads(bash.invoke("cat /mnt/data/b.txt; exit 3"))
    report.check(
        "bash_exit_code_and_files_persist",
        out.get("stdout") == "kept\n" and out.get("exitCode") == 3,
        out,
    )
    content = file_bytes()
    meta = bash.upload_file(data=BytesIO(content), remote_file_path="up.csv")
    report.check(
        "bash_upload",
        meta.filename == "up.csv" and meta.size_in_bytes == len(content),
        {"filename": meta.filename, "size": meta.size_in_bytes},
    )
    listed = {f.filename: f.size_in_bytes for f in bash.list_files()}
    report.check("bash_list_files", listed.get("up.csv") == len(content), listed)
    report.check("bash_download", bash.download_file(remote_file_path="up.csv").read() == content)
    log = _Warnings()
    logging.getLogger("langchain_azure_dynamic_sessions").addHandler(log)
    bash.close()
    _join_background_threads()
    report.check("bash_close_clean", not log.messages, log.messages)


def main(report: Report, endpoint: str, key: str) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        drive_python(report, endpoint, key, Path(workdir))
    drive_bash(report, endpoint, key)


if __name__ == "__main__":
    run("langchain", main)
