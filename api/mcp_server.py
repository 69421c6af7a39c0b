"""The MCP server behind /pools/{pool}/mcp: the official SDK's low-level `Server`, made for one
HTTP request's caller, listing the tools of api/mcp_catalogue.py and calling them.

A tool's failure is a tool result with `isError` (the model reads it and may correct itself),
carrying Shoal's error code and message as text and as structuredContent
`{"error": {"code", "message", "retryAfterSeconds"?}}`; only an unknown tool is a JSON-RPC error,
as the protocol has it. The tools are synchronous (they wait on Redis): they run on the request's
own event loop, which serves that one request only (api/mcp_endpoint.py), so blocking it holds
up nothing else, as a WSGI view blocks its own thread.
"""

from __future__ import annotations

import json
from importlib import metadata

from mcp import types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from api import mcp_catalogue, mcp_tools
from api.mcp_tools import Caller, Outcome, Tool
from shoal.pools import get_pool

NAME = "Shoal"


def _version() -> str:
    try:
        return metadata.version("shoal")
    except metadata.PackageNotFoundError:
        return ""


def instructions(pool: str) -> str:
    return (
        f"Run code in sandboxed, stateful Linux VMs of Shoal's pool {pool!r}. Call launchShell "
        "first and pass the environmentId it returns to the other tools; one environment keeps "
        "its Python variables and its files in /mnt/data between calls."
    )


def tool_view(tool: Tool) -> types.Tool:
    return types.Tool(
        name=tool.name,
        title=tool.title,
        description=tool.description,
        input_schema=tool.input_schema,
        output_schema=tool.output_schema,
        annotations=types.ToolAnnotations(
            title=tool.title,
            read_only_hint=tool.read_only,
            destructive_hint=False if tool.read_only else None,
            open_world_hint=False,
        ),
    )


def result_of(outcome: Outcome) -> types.CallToolResult:
    """The CallToolResult of an outcome: the structured result, also as JSON text for clients
    that read only content (the protocol's advice), then any images."""
    if outcome.is_error:
        error = outcome.structured["error"]
        text = f"{error['code']}: {error['message']}"
    else:
        text = json.dumps(outcome.structured, ensure_ascii=False)
    content: list[types.ContentBlock] = [types.TextContent(text=text)]
    content += [types.ImageContent(data=data, mime_type=mime) for mime, data in outcome.images]
    return types.CallToolResult(
        content=content, structured_content=outcome.structured, is_error=outcome.is_error
    )


def make_server(caller: Caller) -> Server:
    """A Server whose tools act for `caller` (its tenant, its pool)."""
    pool = get_pool(caller.context.settings, caller.pool)
    catalogue = mcp_catalogue.tools(caller.context.settings, pool)

    async def list_tools(
        ctx: ServerRequestContext, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[tool_view(t) for t in catalogue.values()])

    async def call_tool(
        ctx: ServerRequestContext, params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        tool = catalogue.get(params.name)
        if tool is None:
            raise MCPError(
                types.INVALID_PARAMS,
                f"unknown tool {params.name[:100]!r}; the tools are {', '.join(catalogue)}",
            )
        return result_of(mcp_tools.call(caller, tool, params.arguments or {}))

    return Server(
        NAME,
        version=_version(),
        instructions=instructions(caller.pool),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )
