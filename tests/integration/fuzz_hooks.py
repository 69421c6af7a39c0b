"""schemathesis hooks for the fuzzing run of test_api_fuzz.py (loaded by `st run` through
SCHEMATHESIS_HOOKS): the error-shape check, the steering of each case before it is sent, and a
log of every answer.

The run's state (the tenant's session, execution and batch ids, its identifier, the loopback
callback URL) is read from the JSON file named by FUZZ_STATE; each answer is appended to the
file named by FUZZ_LOG as one JSON line {"operation", "status", "batch"}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import schemathesis

from api.dynamic_sessions import IDENTIFIER

# Timeouts asked for are cut to this: a generated command that waits costs the run no more.
FUZZ_TIMEOUT_S = 5

_STATE: dict = (
    json.loads(Path(os.environ["FUZZ_STATE"]).read_text()) if "FUZZ_STATE" in os.environ else {}
)


@schemathesis.check
def error_shape(ctx, response, case) -> None:
    """Every answer that is not a success: {"error": {"code": str, "message": str}}, nothing
    else, and the code in x-ms-error-code."""
    if response.status_code < 300:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(
            f"a {response.status_code} answer that is not JSON: {response.content[:200]!r}"
        ) from None
    assert isinstance(body, dict) and set(body) == {"error"}, f"not the error shape: {body}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message"}, f"not the shape: {body}"
    assert isinstance(error["code"], str) and error["code"], f"no code: {body}"
    assert isinstance(error["message"], str) and error["message"], f"no message: {body}"
    header = response.headers.get("x-ms-error-code")
    assert header == [error["code"]], f"x-ms-error-code {header} for {error['code']!r}"


def loopback(url: str, callback_url: str) -> str:
    """`url` when the API refuses it anyway (not an http(s) URL with a host), else
    `callback_url` with the path and query of `url`: nothing but loopback is ever called."""
    try:
        parts = urlsplit(url)
        callable_ = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return url
    if not callable_:
        return url
    target = urlsplit(callback_url)
    return urlunsplit((target.scheme, target.netloc, parts.path, parts.query, ""))


def steer_body(body: object, state: dict) -> None:
    if not isinstance(body, dict):
        return
    if isinstance(body.get("callback_url"), str):
        body["callback_url"] = loopback(body["callback_url"], state["callback_url"])
    for name in ("timeout_s", "timeoutInSeconds"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > FUZZ_TIMEOUT_S:
            body[name] = FUZZ_TIMEOUT_S
    if isinstance(body.get("properties"), dict):
        steer_body(body["properties"], state)


def steer(case, state: dict) -> None:
    """Point the case at things of the tenant's that exist: the pool `default`, its session
    (except on DELETE of the session itself), its execution and batch, one identifier for every
    valid one; a callable callback URL at loopback; a timeout at FUZZ_TIMEOUT_S at most.
    Invalid values are left as generated."""
    path = case.operation.path
    params = case.path_parameters if isinstance(case.path_parameters, dict) else {}
    if "pool" in params and path.startswith("/pools/"):
        params["pool"] = "default"
    deletes_session = case.method.upper() == "DELETE" and path == "/v1/sessions/{session_id}"
    if "session_id" in params and not deletes_session:
        params["session_id"] = state["session_id"]
    for name in ("execution_id", "batch_id"):
        if name in params:
            params[name] = state[name]
    query = case.query if isinstance(case.query, dict) else {}
    identifier = query.get("identifier")
    if isinstance(identifier, str) and IDENTIFIER.fullmatch(identifier):
        query["identifier"] = state["identifier"]
    steer_body(case.body, state)


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    steer(case, _STATE)


@schemathesis.hook
def after_call(context, case, response) -> None:
    batch = None
    if case.operation.path == "/v1/batches" and response.status_code == 202:
        batch = json.loads(response.content)["id"]
    line = {"operation": case.operation.label, "status": response.status_code, "batch": batch}
    with open(os.environ["FUZZ_LOG"], "a") as log:
        log.write(json.dumps(line) + "\n")
