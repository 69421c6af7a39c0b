"""The MCP endpoint (/pools/{pool}/mcp) on fakeredis, through the Flask test client: JSON-RPC in,
the SDK's answers out, with a thread playing the host (AnsweringCelery) where a tool waits for
one. What is checked: HTTP errors in Shoal's shape, tool failures as isError results with
Shoal's codes, argument bounds, and that an environmentId is the caller's tenant's in this pool
or nothing at all."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis

from api import mcp_tools
from api.app import create_app
from api.mcp_tools import MAX_LISTED, file_limit
from shoal import admin_keys, executions, keys, queue, replies, sessions, tenants, transfers
from shoal.protocol import DEFAULT_MAX_OUTPUT, MAX_CODE_BYTES
from shoal.use_cases import executions as execution_cases
from shoal.use_cases import sessions as session_cases
from tests.unit.fakes import (
    AnsweringCelery,
    SentTask,
    live_session,
    publish_heartbeat,
    unit_context,
    unit_settings,
)

POOLS_TOML = """
[pools.default]

[pools.other]
"""
VERSION = "2025-11-25"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n....").decode()


@pytest.fixture()
def app(tmp_path):
    pools = tmp_path / "pools.toml"
    pools.write_text(POOLS_TOML)
    settings = unit_settings(pools_file=str(pools))
    app = create_app(settings)
    c = app.extensions["shoal"] = unit_context(settings, celery=AnsweringCelery())
    publish_heartbeat(c.redis)
    yield app
    c.celery.join()


@pytest.fixture()
def c(app):
    return app.extensions["shoal"]


@pytest.fixture()
def key(c) -> str:
    return tenants.create_key(c.redis, "t1")[1]


class Mcp:
    """A JSON-RPC client of one pool's endpoint, as the official client sends its messages."""

    def __init__(self, app, key: str, pool: str = "default") -> None:
        self.client = app.test_client()
        self.url = f"/pools/{pool}/mcp"
        self.headers = {
            "Authorization": f"Bearer {key}",
            "Accept": "application/json, text/event-stream",
            "mcp-protocol-version": VERSION,
        }

    def post(self, message: Any, **headers: str):
        return self.client.post(self.url, json=message, headers={**self.headers, **headers})

    def request(self, method: str, params: dict | None = None) -> dict:
        response = self.post({"jsonrpc": "2.0", "id": 7, "method": method, "params": params or {}})
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.mimetype == "application/json"
        body = response.get_json()
        assert body["id"] == 7
        return body

    def call(self, tool: str, **arguments: Any) -> dict:
        return self.request("tools/call", {"name": tool, "arguments": arguments})["result"]


@pytest.fixture()
def mcp(app, key) -> Mcp:
    return Mcp(app, key)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    assert response.headers["x-ms-error-code"] == code
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    return body["error"]


def tool_error(result: dict, code: str, *words: str) -> dict:
    assert result["isError"] is True, result
    error = result["structuredContent"]["error"]
    assert error["code"] == code, error
    assert result["content"] == [{"type": "text", "text": f"{code}: {error['message']}"}]
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error


def structured(result: dict) -> dict:
    assert result.get("isError") in (None, False), result
    assert json.loads(result["content"][0]["text"]) == result["structuredContent"]
    return result["structuredContent"]


# --- the host's side --------------------------------------------------------------------------
def host_creates(c):
    def answer(task: SentTask) -> None:
        session_id = task.kwargs["session_id"]
        c.redis.hset(keys.session(session_id), mapping={"vm": "vm_1", "state": sessions.ACTIVE})
        replies.send(c.redis, task.kwargs["reply_key"], {"ok": True})

    c.celery.answer(queue.CREATE_SESSION.name, answer)


def host_runs(c, **answer: Any) -> list[dict]:
    """The host finishes each execution with `answer` over the queued record; returns the
    records as the host received them."""
    seen: list[dict] = []

    def run(task: SentTask) -> None:
        record = json.loads(task.kwargs["record_json"])
        seen.append(dict(record))
        record.update({"status": executions.SUCCEEDED, "duration_ms": 12.4, **answer})
        executions.finish(c.redis, record, c.settings.execution_ttl_s)

    c.celery.answer(queue.EXECUTE.name, run)
    return seen


def file_info(path: str, size: int, kind: str = "file") -> dict:
    return {"path": path, "name": path.rsplit("/", 1)[-1], "type": kind, "size": size, "mtime": 0}


# --- the catalogue and the protocol -----------------------------------------------------------
def test_initialize_and_tools_list_describe_the_six_tools(mcp, c) -> None:
    init = mcp.request(
        "initialize",
        {
            "protocolVersion": VERSION,
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    )["result"]
    assert init["serverInfo"]["name"] == "Shoal" and init["protocolVersion"] == VERSION
    assert "launchShell" in init["instructions"] and "tools" in init["capabilities"]
    tools = {t["name"]: t for t in mcp.request("tools/list")["result"]["tools"]}
    assert list(tools) == [
        "launchShell",
        "runPythonCodeInRemoteEnvironment",
        "runShellCommandInRemoteEnvironment",
        "uploadFileToRemoteEnvironment",
        "listFilesInRemoteEnvironment",
        "downloadFileFromRemoteEnvironment",
    ]
    python = tools["runPythonCodeInRemoteEnvironment"]["inputSchema"]
    assert python["required"] == ["environmentId", "pythonCode"]
    assert python["additionalProperties"] is False
    assert python["properties"]["timeoutInSeconds"]["maximum"] == c.settings.max_timeout_s
    assert tools["launchShell"]["inputSchema"]["properties"] == {}
    assert tools["runShellCommandInRemoteEnvironment"]["outputSchema"]["required"] == [
        "status", "exitCode", "stdout", "stderr",
    ]  # fmt: skip
    assert tools["downloadFileFromRemoteEnvironment"]["annotations"]["readOnlyHint"] is True
    assert str(file_limit(c.settings)) in tools["uploadFileToRemoteEnvironment"]["description"]


def test_the_file_limit_is_what_fits_base64_in_the_json_body_limit() -> None:
    assert file_limit(unit_settings()) == 4608 << 10  # 4.5 MiB: 6 MiB of base64
    assert file_limit(unit_settings(max_upload_bytes=1000)) == 1000


def test_a_notification_is_accepted_and_a_malformed_message_is_a_jsonrpc_error(mcp) -> None:
    accepted = mcp.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert accepted.status_code == 202 and accepted.data == b""
    malformed = mcp.post({"hello": "world"})
    assert malformed.status_code == 400 and malformed.get_json()["error"]["code"] < 0
    batch = mcp.post([{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}] * 2)
    assert batch.status_code == 400 and "jsonrpc" in batch.get_json()
    unknown = mcp.request("tools/call", {"name": "rm -rf", "arguments": {}})
    assert unknown["error"]["code"] == -32602 and "launchShell" in unknown["error"]["message"]
    method = mcp.request("resources/list")
    assert method["error"]["code"] == -32601


def test_what_is_not_mcp_is_answered_in_shoals_error_shape(app, c, key) -> None:
    client = app.test_client()
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    url = "/pools/default/mcp"
    assert_error(client.post(url, json=message), 401, "Unauthorized")
    bad = {"Authorization": "Bearer shoal_not_a_key"}
    assert_error(client.post(url, json=message, headers=bad), 401, "Unauthorized")
    admin = {"Authorization": f"Bearer {admin_keys.create_admin_key(c.redis)[1]}"}
    assert_error(client.post(url, json=message, headers=admin), 403, "Forbidden")
    assert_error(client.post("/pools/nope/mcp", json=message), 401, "Unauthorized")
    mine = {"Authorization": f"Bearer {key}"}
    assert_error(client.post("/pools/nope/mcp", json=message, headers=mine), 404, "PoolNotFound")
    for method in (client.get, client.delete):
        response = method(url, headers={**mine, "Accept": "text/event-stream"})
        assert_error(response, 405, "MethodNotAllowed")
        assert "POST" in response.headers["Allow"]
    text = client.post(url, data=json.dumps(message), headers=mine)
    assert "application/json" in assert_error(text, 415, "UnsupportedMediaType")["message"]
    html = client.post(url, json=message, headers={**mine, "Accept": "text/html"})
    assert "text/html" in assert_error(html, 406, "NotAcceptable")["message"]
    limit = app.config["MAX_CONTENT_LENGTH"]
    huge = client.post(url, data=b"{" + b" " * limit + b"}", headers={**mine, **_json()})
    assert_error(huge, 413, "PayloadTooLarge")
    # No Accept at all takes JSON (HTTP's rule; the SDK alone would answer 406).
    plain = client.post(url, json=message, headers=mine)
    assert plain.status_code == 200 and plain.get_json()["result"]["tools"]


def _json() -> dict[str, str]:
    return {"Content-Type": "application/json"}


def test_every_request_takes_a_token_of_the_tenants_rate(app, c, key, mcp) -> None:
    tenants.set_limits(c.redis, "t1", rate=0.001, burst=2)
    mcp.request("tools/list")
    mcp.request("tools/list")
    response = mcp.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert_error(response, 429, "RateLimited")
    assert int(response.headers["Retry-After"]) >= 1


def test_any_api_process_answers_any_request(app, c, key) -> None:
    """Stateless: no MCP session, so a second app (another API process) carries on where the
    first left off, with no handshake of its own."""
    host_creates(c)
    host_runs(c, result={"text/plain": "2"})
    environment = structured(Mcp(app, key).call("launchShell"))["environmentId"]
    other = create_app(c.settings)
    other.extensions["shoal"] = c
    result = Mcp(other, key).call(PY, environmentId=environment, pythonCode="1 + 1")
    assert structured(result)["result"] == "2"
    assert (
        "mcp-session-id"
        not in Mcp(app, key).post({"jsonrpc": "2.0", "id": 1, "method": "ping"}).headers
    )


# --- launchShell ------------------------------------------------------------------------------
def test_launch_shell_makes_a_session_of_the_callers_tenant_in_the_endpoints_pool(app, c, key):
    host_creates(c)
    made = structured(Mcp(app, key, "other").call("launchShell"))
    entry = sessions.load(c.redis, made["environmentId"])
    assert entry["tenant"] == "t1" and entry["pool"] == "other" and entry["identifier"] == ""
    assert entry["state"] == sessions.ACTIVE
    # It idles out like any session: its deadline is in the registry the reaper scans.
    assert c.redis.zscore(keys.session_deadlines(), entry["id"]) is not None


def test_launch_shell_beyond_the_tenants_cap_is_a_tool_error_with_retry_after(mcp, c) -> None:
    tenants.set_max_sessions(c.redis, "t1", 1)
    live_session(c, "t1")
    error = tool_error(mcp.call("launchShell"), "TenantSessionLimit")
    assert error["retryAfterSeconds"] == 1
    assert c.celery.sent == []


def test_store_and_unexpected_failures_are_tool_errors_that_hide_details(mcp, monkeypatch):
    def unavailable(*args: Any) -> None:
        raise redis.ConnectionError("connection refused by 10.0.0.7")

    monkeypatch.setattr(session_cases, "create_session", unavailable)
    error = tool_error(mcp.call("launchShell"), "StoreUnavailable")
    assert error["retryAfterSeconds"] == 2 and "10.0.0.7" not in error["message"]

    def bug(*args: Any) -> None:
        raise KeyError("secret internals")

    monkeypatch.setattr(session_cases, "create_session", bug)
    error = tool_error(mcp.call("launchShell"), "InternalError", "API log")
    assert "secret" not in error["message"]


# --- tenancy ----------------------------------------------------------------------------------
TOOL_ARGUMENTS = {
    "runPythonCodeInRemoteEnvironment": {"pythonCode": "1"},
    "runShellCommandInRemoteEnvironment": {"shellCommand": "true"},
    "uploadFileToRemoteEnvironment": {"path": "a.txt", "content": "x"},
    "listFilesInRemoteEnvironment": {},
    "downloadFileFromRemoteEnvironment": {"path": "a.txt"},
}


@pytest.mark.parametrize("tool", sorted(TOOL_ARGUMENTS))
def test_another_tenants_environment_is_exactly_an_id_never_made(mcp, c, tool) -> None:
    theirs = live_session(c, "t2")["id"]
    other_pool = live_session(c, "t1", "other")["id"]
    never = sessions.new_id()
    messages = set()
    for environment_id in (theirs, other_pool, never):
        error = tool_error(
            mcp.call(tool, environmentId=environment_id, **TOOL_ARGUMENTS[tool]), "SessionNotFound"
        )
        messages.add(error["message"].replace(environment_id, "<id>"))
    assert messages == {"no session '<id>'"}
    assert c.celery.sent == []  # nothing reached a host


def test_an_ended_environment_answers_as_the_rest_routes_do(mcp, c) -> None:
    expired, deleted = live_session(c), live_session(c)
    sessions.end(c.redis, expired, sessions.EXPIRED)
    sessions.end(c.redis, deleted, sessions.DELETED)
    python = "runPythonCodeInRemoteEnvironment"
    tool_error(mcp.call(python, environmentId=expired["id"], pythonCode="1"), "SessionExpired")
    tool_error(mcp.call(python, environmentId=deleted["id"], pythonCode="1"), "SessionNotFound")


# --- arguments --------------------------------------------------------------------------------
PY, SH = "runPythonCodeInRemoteEnvironment", "runShellCommandInRemoteEnvironment"
UP = "uploadFileToRemoteEnvironment"
BAD_ARGUMENTS = [
    (PY, {}, "pythonCode"),
    (PY, {"pythonCode": 5}, "pythonCode"),
    (PY, {"pythonCode": ""}, "pythonCode"),
    (PY, {"pythonCode": "x" * (MAX_CODE_BYTES + 1)}, str(MAX_CODE_BYTES)),
    (PY, {"pythonCode": "é" * (MAX_CODE_BYTES // 2 + 1)}, f"{MAX_CODE_BYTES}-byte limit"),
    (PY, {"pythonCode": "1", "timeoutInSeconds": 0}, "220"),
    (PY, {"pythonCode": "1", "timeoutInSeconds": 221}, "220"),
    (PY, {"pythonCode": "1", "timeoutInSeconds": True}, "timeoutInSeconds"),
    (PY, {"pythonCode": "1", "timeoutInSeconds": "9"}, "timeoutInSeconds"),
    (PY, {"pythonCode": "1", "code": "2"}, "'code'"),
    (SH, {}, "shellCommand"),
    (SH, {"shellCommand": "a", "execCommandAndArgs": ["a"]}, "not both"),
    (SH, {"execCommandAndArgs": []}, "execCommandAndArgs"),
    (SH, {"execCommandAndArgs": [""]}, "execCommandAndArgs"),
    (SH, {"execCommandAndArgs": ["ls", 1]}, "execCommandAndArgs"),
    (SH, {"execCommandAndArgs": "ls"}, "execCommandAndArgs"),
    (UP, {"path": "a", "content": 5}, "content"),
    (UP, {"path": "a", "content": "!!", "encoding": "base64"}, "base64"),
    (UP, {"path": "a", "content": "x", "encoding": "hex"}, "encoding"),
    (UP, {"content": "x"}, "path"),
    (UP, {"path": "a\0b", "content": "x"}, "NUL"),
    (UP, {"path": "a" * 4097, "content": "x"}, "4096"),
    ("listFilesInRemoteEnvironment", {"recursive": "yes"}, "recursive"),
    ("downloadFileFromRemoteEnvironment", {}, "path"),
]


@pytest.mark.parametrize(("tool", "arguments", "word"), BAD_ARGUMENTS)
def test_arguments_are_checked_before_anything_runs(mcp, c, tool, arguments, word) -> None:
    mine = live_session(c)["id"]
    tool_error(mcp.call(tool, environmentId=mine, **arguments), "ValidationFailed", word)
    assert c.celery.sent == []


@pytest.mark.parametrize("environment_id", [None, 7, "", "ses_" + "0" * 61])
def test_an_environment_id_that_is_no_string_or_too_long_is_refused(mcp, environment_id) -> None:
    tool_error(
        mcp.call("runPythonCodeInRemoteEnvironment", environmentId=environment_id, pythonCode="1"),
        "ValidationFailed",
        "environmentId",
    )


# --- executions -------------------------------------------------------------------------------
def test_python_answers_its_streams_result_and_images(mcp, c) -> None:
    seen = host_runs(
        c,
        stdout="hi\n",
        result={"text/plain": "42"},
        outputs=[{"type": "display_data", "data": {"image/png": PNG, "text/plain": "<Figure>"}}],
        stdout_truncated=True,
        output_notes=["stdout: 9000 characters cut"],
    )
    mine = live_session(c)["id"]
    result = mcp.call("runPythonCodeInRemoteEnvironment", environmentId=mine, pythonCode="x + 1")
    assert structured(result) == {
        "status": "Succeeded",
        "stdout": "hi\n",
        "stderr": "",
        "result": "42",
        "executionTimeInMilliseconds": 12,
        "stdoutTruncated": True,
        "stderrTruncated": False,
        "resultTruncated": False,
        "outputNotes": ["stdout: 9000 characters cut"],
    }
    assert result["content"][1] == {"type": "image", "data": PNG, "mimeType": "image/png"}
    (record,) = seen
    assert record["language"] == "python" and record["code"] == "x + 1"
    assert record["session_id"] == mine and record["tenant"] == "t1"
    assert record["timeout_s"] == c.settings.default_timeout_s
    assert record["max_output"] == DEFAULT_MAX_OUTPUT


def test_a_failing_program_is_a_result_with_its_traceback_not_a_tool_error(mcp, c) -> None:
    host_runs(
        c,
        status=executions.FAILED,
        error={"name": "ZeroDivisionError", "value": "division by zero", "traceback": "Tb: 1/0"},
    )
    mine = live_session(c)["id"]
    result = mcp.call(
        "runPythonCodeInRemoteEnvironment", environmentId=mine, pythonCode="1/0", timeoutInSeconds=5
    )
    answer = structured(result)
    assert answer["status"] == "Failed" and "Tb: 1/0" in answer["stderr"]
    assert answer["result"] is None


def test_shell_commands_come_as_a_string_or_as_quoted_arguments(mcp, c) -> None:
    seen = host_runs(c, stdout="a b\n", exit_code=3)
    mine = live_session(c)["id"]
    shell = "runShellCommandInRemoteEnvironment"
    answer = structured(mcp.call(shell, environmentId=mine, shellCommand="echo hi; exit 3"))
    assert answer["exitCode"] == 3 and answer["stdout"] == "a b\n"
    assert answer["status"] == "Succeeded" and "result" not in answer
    structured(mcp.call(shell, environmentId=mine, execCommandAndArgs=["echo", "a b", "$HOME"]))
    assert [(r["language"], r["code"]) for r in seen] == [
        ("shell", "echo hi; exit 3"),
        ("shell", "echo 'a b' '$HOME'"),
    ]


def test_executions_are_admitted_within_the_tenants_bounds(mcp, c) -> None:
    tenants.set_limits(c.redis, "t1", max_session_pending=1)
    entry = live_session(c)
    params = {"code": "1", "language": "python", "timeout_s": 5, "max_output": 10}
    execution_cases.submit_execution(c, entry, params)  # queued, never answered
    result = mcp.call("runPythonCodeInRemoteEnvironment", environmentId=entry["id"], pythonCode="1")
    assert tool_error(result, "TooManyPendingExecutions")["retryAfterSeconds"] == 1


# --- files ------------------------------------------------------------------------------------
def test_upload_writes_text_or_base64_bytes(mcp, c) -> None:
    written: dict[str, bytes] = {}

    def host_writes(task: SentTask) -> None:
        data = b"".join(transfers.consume(c.redis_bin, task.kwargs["transfer_id"]))
        written[task.kwargs["path"]] = data
        info = file_info(task.kwargs["path"], len(data))
        replies.send(c.redis, task.kwargs["reply_key"], {"ok": True, "file": info})

    c.celery.answer(queue.PUT_FILE.name, host_writes)
    mine = live_session(c)["id"]
    upload = "uploadFileToRemoteEnvironment"
    answer = structured(mcp.call(upload, environmentId=mine, path="notes/a.txt", content="héllo"))
    assert answer == {
        "path": "notes/a.txt",
        "name": "a.txt",
        "type": "file",
        "sizeInBytes": 6,
        "lastModifiedAt": "1970-01-01T00:00:00.000000Z",
    }
    blob = bytes(range(256)) * 3000  # several transfer chunks
    encoded = base64.encodebytes(blob).decode()  # with newlines, as some encoders write it
    structured(
        mcp.call(upload, environmentId=mine, path="b.bin", content=encoded, encoding="base64")
    )
    structured(mcp.call(upload, environmentId=mine, path="empty", content=""))
    assert written == {"notes/a.txt": "héllo".encode(), "b.bin": blob, "empty": b""}


def test_an_upload_over_the_file_limit_is_refused_before_anything_moves(app, c, key) -> None:
    mcp = Mcp(app, key)
    c.settings = unit_settings(max_upload_bytes=10, pools_file=c.settings.pools_file)
    mine = live_session(c)["id"]
    result = mcp.call(
        "uploadFileToRemoteEnvironment", environmentId=mine, path="a", content="x" * 11
    )
    tool_error(result, "PayloadTooLarge", "11 bytes", "10 bytes", "/v1/sessions")
    assert c.celery.sent == []


def test_a_listing_is_bounded(mcp, c) -> None:
    listing = [file_info(f"f{i}", i) for i in range(MAX_LISTED + 1)]
    c.celery.answer(
        queue.FILE_OP.name,
        lambda task: replies.send(
            c.redis, task.kwargs["reply_key"], {"ok": True, "files": listing}
        ),
    )
    mine = live_session(c)["id"]
    answer = structured(
        mcp.call("listFilesInRemoteEnvironment", environmentId=mine, path="d", recursive=True)
    )
    assert answer["path"] == "d" and answer["truncated"] is True
    assert len(answer["files"]) == MAX_LISTED and answer["files"][1]["sizeInBytes"] == 1
    (task,) = c.celery.take(queue.FILE_OP.name)
    assert task.kwargs["args"] == {"path": "d", "recursive": True}


def serve_file(c, stat_size: int, body: bytes) -> list[str]:
    """The host answers a stat with `stat_size` and a download with `body`; returns the
    download's transfer ids."""
    transfer_ids: list[str] = []

    def stat(task: SentTask) -> None:
        info = file_info(task.kwargs["args"]["path"], stat_size)
        replies.send(c.redis, task.kwargs["reply_key"], {"ok": True, "file": info})

    def read(task: SentTask) -> None:
        transfer_ids.append(task.kwargs["transfer_id"])
        info = file_info(task.kwargs["path"], len(body))
        replies.send(c.redis, task.kwargs["reply_key"], {"ok": True, "file": info})
        chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
        transfers.produce(c.redis_bin, task.kwargs["transfer_id"], iter(chunks))

    c.celery.answer(queue.FILE_OP.name, stat)
    c.celery.answer(queue.GET_FILE.name, read)
    return transfer_ids


def test_download_answers_the_bytes_in_base64(mcp, c) -> None:
    body = bytes(range(256)) * 40
    serve_file(c, len(body), body)
    mine = live_session(c)["id"]
    answer = structured(
        mcp.call("downloadFileFromRemoteEnvironment", environmentId=mine, path="out/r.bin")
    )
    assert answer["path"] == "out/r.bin" and answer["name"] == "r.bin"
    assert answer["sizeInBytes"] == len(body)
    assert base64.b64decode(answer["contentBase64"]) == body


def test_a_download_over_the_file_limit_is_refused(app, c, key, monkeypatch) -> None:
    mcp = Mcp(app, key)
    monkeypatch.setattr(mcp_tools, "file_limit", lambda settings: 2500)
    mine = live_session(c)["id"]
    download = "downloadFileFromRemoteEnvironment"
    serve_file(c, 2501, b"")
    tool_error(mcp.call(download, environmentId=mine, path="big"), "PayloadTooLarge", "2501")
    assert c.celery.take(queue.GET_FILE.name) == []  # refused on its stat: no byte moved
    # A file that grows between its stat and its reading is cut off at the limit.
    transfer_ids = serve_file(c, 100, b"x" * 5000)
    tool_error(mcp.call(download, environmentId=mine, path="grows"), "PayloadTooLarge")
    c.celery.join()
    assert c.redis_bin.exists(keys.transfer_cancel(transfer_ids[0]))
