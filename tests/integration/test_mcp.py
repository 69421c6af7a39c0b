"""The MCP endpoint (/pools/{pool}/mcp) against the shared stack, through the official MCP client
of the same SDK (`streamable_http_client` and `ClientSession`), as an agent would use it: list
the tools, launch one environment, run Python statefully and a shell command in it, move a file
in and out, and find that another tenant's key cannot use it and a bad key is refused."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator

import httpx2
import pytest
import requests
from mcp import ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from tests.integration.conftest import Stack

pytestmark = pytest.mark.guest

PYTHON = "runPythonCodeInRemoteEnvironment"
SHELL = "runShellCommandInRemoteEnvironment"
UPLOAD = "uploadFileToRemoteEnvironment"
LIST = "listFilesInRemoteEnvironment"
DOWNLOAD = "downloadFileFromRemoteEnvironment"


@contextlib.asynccontextmanager
async def mcp_session(stack: Stack, key: str) -> AsyncIterator[ClientSession]:
    """An initialized MCP session with the default pool's endpoint, under `key`."""
    timeout = httpx2.Timeout(30, read=300)
    async with (
        httpx2.AsyncClient(headers=stack.headers(key), timeout=timeout) as http,
        streamable_http_client(f"{stack.url}/pools/default/mcp", http_client=http) as streams,
        ClientSession(*streams) as session,
    ):
        await session.initialize()
        yield session


def ok(result: CallToolResult) -> dict:
    assert not result.is_error, result.content
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content


def error(result: CallToolResult) -> dict:
    assert result.is_error, result.structured_content
    return result.structured_content["error"]


async def agent(stack: Stack, key: str, stranger: str) -> None:
    async with mcp_session(stack, key) as s:
        tools = {t.name for t in (await s.list_tools()).tools}
        assert {"launchShell", PYTHON, SHELL, UPLOAD, LIST, DOWNLOAD} <= tools
        environment = ok(await s.call_tool("launchShell", {}))["environmentId"]

        async def call(tool: str, **arguments: object) -> dict:
            return ok(await s.call_tool(tool, {"environmentId": environment, **arguments}))

        try:
            assert (await call(PYTHON, pythonCode="x = 41"))["result"] is None
            answer = await call(PYTHON, pythonCode="print('hi'); x + 1")
            assert (answer["status"], answer["result"], answer["stdout"]) == (
                "Succeeded", "42", "hi\n",
            )  # fmt: skip
            failed = await call(PYTHON, pythonCode="1 / 0")
            assert failed["status"] == "Failed" and "ZeroDivisionError" in failed["stderr"]

            answer = await call(SHELL, shellCommand="echo hi; echo oops >&2; exit 3")
            assert (answer["stdout"], answer["stderr"], answer["exitCode"]) == ("hi\n", "oops\n", 3)
            answer = await call(SHELL, execCommandAndArgs=["echo", "a  b"])
            assert (answer["stdout"], answer["exitCode"]) == ("a  b\n", 0)

            blob = os.urandom(600_000)  # several transfer chunks
            content = base64.b64encode(blob).decode()
            written = await call(UPLOAD, path="in/blob.bin", content=content, encoding="base64")
            assert written["sizeInBytes"] == len(blob) and written["type"] == "file"
            await call(UPLOAD, path="notes.txt", content="hello")
            read = await call(PYTHON, pythonCode="open('notes.txt').read()")
            assert read["result"] == "'hello'"
            listed = await call(LIST, recursive=True)
            assert {"in/blob.bin", "notes.txt"} <= {f["path"] for f in listed["files"]}
            back = await call(DOWNLOAD, path="in/blob.bin")
            assert base64.b64decode(back["contentBase64"]) == blob

            await another_tenant_cannot_use(stack, stranger, environment)
            # The environment is untouched by the stranger's attempts.
            assert (await call(PYTHON, pythonCode="x"))["result"] == "41"
        finally:
            requests.delete(
                f"{stack.url}/v1/sessions/{environment}", headers=stack.headers(key), timeout=60
            )


async def another_tenant_cannot_use(stack: Stack, stranger: str, environment: str) -> None:
    """Another tenant's key: the environment is exactly a session that never existed."""
    never = "ses_" + "0" * 20
    async with mcp_session(stack, stranger) as s:
        for tool, arguments in [
            (PYTHON, {"pythonCode": "x"}),
            (SHELL, {"shellCommand": "ls"}),
            (LIST, {}),
            (DOWNLOAD, {"path": "notes.txt"}),
        ]:
            theirs = error(await s.call_tool(tool, {"environmentId": environment, **arguments}))
            unknown = error(await s.call_tool(tool, {"environmentId": never, **arguments}))
            assert theirs["code"] == unknown["code"] == "SessionNotFound"
            assert theirs["message"].replace(environment, never) == unknown["message"]


def test_an_agent_runs_code_and_moves_files_in_its_own_environment_only(stack: Stack) -> None:
    asyncio.run(agent(stack, stack.new_key("mcp-agent"), stack.new_key("mcp-stranger")))


def test_a_bad_key_is_refused_with_401(stack: Stack) -> None:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    url = f"{stack.url}/pools/default/mcp"
    refused = requests.post(url, json=message, headers=stack.headers("shoal_nope"), timeout=30)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "Unauthorized"
    assert refused.headers["x-ms-error-code"] == "Unauthorized"

    async def client_with_bad_key() -> None:
        async with mcp_session(stack, "shoal_nope"):
            pass

    with pytest.raises(BaseException) as raised:
        asyncio.run(client_with_bad_key())
    assert any(isinstance(e, MCPError) for e in leaves(raised.value)), raised.value


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]
