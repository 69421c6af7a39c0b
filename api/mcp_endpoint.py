"""The MCP endpoint of a pool, `POST /pools/{pool}/mcp`: streamable HTTP, stateless, JSON answers.

The API is WSGI (gunicorn gthread, several processes) and the MCP SDK's server side is ASGI. Each
request is served whole by the SDK's own `StreamableHTTPSessionManager` in stateless JSON mode,
driven once through a private event loop in the request's thread (`anyio.run`): one JSON-RPC
message in, one JSON answer out, and nothing kept between requests, so any API process answers
any request and no MCP session state exists to share. The environments (Shoal sessions) are the
state, in Redis like every session. There is no SSE stream: GET (and DELETE) are 405, as the
transport allows a server that offers none.

What is not MCP is answered as every route answers it, in Shoal's error shape (api/errors.py):
the request's size (api/request_bounds.py, before anything else: the JSON body limit), the API
key (401/403, the tenant's request rate, 429), an unknown pool (404), a method other than POST
(405), a body that is not `application/json` (415) and an Accept that refuses JSON (406; no
Accept at all takes JSON). What is MCP (a malformed JSON-RPC message, an unknown method or tool)
is the SDK's JSON-RPC error, and a tool's failure is a tool result with isError
(api/mcp_server.py).

The SDK's DNS-rebinding guard (Host and Origin checks) is off: it protects servers that trust
whoever reaches them, and every request here must carry an API key a browser does not hold.
"""

from __future__ import annotations

from typing import Any

import anyio
from flask import Blueprint, Response, g, request
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from api.auth import require_tenant
from api.context import ctx
from api.mcp_server import make_server
from api.mcp_tools import Caller
from shoal.errors import NotAcceptable, UnsupportedMediaType
from shoal.pools import get_pool

blp = Blueprint("mcp", __name__, url_prefix="/pools/<pool>")
blp.before_request(require_tenant)

JSON = "application/json"
# Headers of the SDK's answer that the WSGI server sets itself.
_HOP_HEADERS = frozenset({"content-length", "connection", "transfer-encoding"})


def check_media_types() -> None:
    """415 unless the body is JSON; 406 when Accept names types but none that JSON matches
    (the SDK's own rule: application/json, application/* or */*)."""
    if request.mimetype != JSON:
        raise UnsupportedMediaType(
            f"send the JSON-RPC message with `Content-Type: {JSON}` "
            f"(got {request.mimetype or 'no Content-Type'})"
        )
    accept = request.headers.get("Accept")
    if accept is None:
        return
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if not types & {JSON, "application/*", "*/*"}:
        raise NotAcceptable(f"this endpoint answers {JSON}; the request's Accept is {accept!r}")


def asgi_scope() -> dict[str, Any]:
    """The ASGI scope of the Flask request. A request without Accept gets `Accept: application/json`
    (without one, HTTP takes any type; the SDK would refuse it)."""
    environ = request.environ
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in request.headers.items()
    ]
    if "Accept" not in request.headers:
        headers.append((b"accept", JSON.encode()))
    server_port = environ.get("SERVER_PORT") or "80"
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": environ.get("SERVER_PROTOCOL", "HTTP/1.1").removeprefix("HTTP/"),
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.path.encode("utf-8"),
        "query_string": environ.get("QUERY_STRING", "").encode("latin-1"),
        "root_path": "",
        "headers": headers,
        "client": (request.remote_addr or "", 0),
        "server": (environ.get("SERVER_NAME", ""), int(server_port)),
    }


class Exchange:
    """One ASGI request/response: hands the app the body, collects its answer. A `receive` after
    the body waits for the answer's end, then reports the disconnect, as a server would."""

    def __init__(self, body: bytes) -> None:
        self.body: bytes | None = body
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.ended = anyio.Event()

    async def receive(self) -> dict[str, Any]:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.ended.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in message.get("headers", [])
                if name.decode("latin-1").lower() not in _HOP_HEADERS
            ]
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                self.ended.set()


async def serve_once(server: Server, scope: dict[str, Any], body: bytes) -> Exchange:
    """Answer one request with a stateless JSON-mode session manager made for it (a manager
    runs once: it cannot be kept across event loops)."""
    manager = StreamableHTTPSessionManager(
        app=server, json_response=True, stateless=True, max_request_body_size=len(body) + 1
    )
    exchange = Exchange(body)
    async with manager.run():
        await manager.handle_request(scope, exchange.receive, exchange.send)
    if exchange.status is None:
        raise RuntimeError("the MCP transport sent no answer")
    return exchange


@blp.post("/mcp")
def endpoint(pool: str) -> Response:
    c = ctx()
    get_pool(c.settings, pool)
    check_media_types()
    server = make_server(Caller(context=c, tenant=g.tenant, pool=pool))
    body = request.get_data(cache=True)
    exchange = anyio.run(serve_once, server, asgi_scope(), body)
    return Response(b"".join(exchange.chunks), status=exchange.status, headers=exchange.headers)
