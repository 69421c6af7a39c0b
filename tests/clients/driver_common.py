"""What the tests/clients/drive_<tool>.py scripts share.

Each driver runs under its own tool's virtualenv (no Shoal import there), uses the tool as its
users do against SHOAL_ENDPOINT (a pool management endpoint) with SHOAL_KEY as the bearer token,
and prints one JSON line: {"tool", "endpoint", "ok", "failed", "checks", "details", "timings",
"error"}. The exit status is 0 only when every check held and nothing raised.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

MARKER = "shoal-client-test"


def env() -> tuple[str, str]:
    endpoint = os.environ.get("SHOAL_ENDPOINT", "")
    key = os.environ.get("SHOAL_KEY", "")
    if not endpoint or not key:
        sys.exit("set SHOAL_ENDPOINT (e.g. http://127.0.0.1:8080/pools/default) and SHOAL_KEY")
    return endpoint, key


def file_bytes() -> bytes:
    """A small CSV whose content is unique to this run."""
    return f"name,value\n{MARKER},{uuid.uuid4().hex}\n".encode()


class Report:
    def __init__(self, tool: str, endpoint: str):
        self.tool = tool
        self.endpoint = endpoint
        self.checks: dict[str, bool] = {}
        self.details: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.error: str | None = None

    def check(self, name: str, ok: object, detail: object = None) -> bool:
        """Record one expectation; its detail (what was seen) is kept when it failed."""
        self.checks[name] = bool(ok)
        if not ok:
            self.details[name] = _jsonable(detail)
        return bool(ok)

    def note(self, name: str, value: object) -> None:
        self.details[name] = _jsonable(value)

    def session(self, identifier: str) -> None:
        """Name a session identifier the driver used (the test deletes them afterwards)."""
        self.details.setdefault("identifiers", []).append(identifier)

    @contextmanager
    def timed(self, step: str):
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[step] = round(time.monotonic() - start, 3)

    def emit(self) -> int:
        failed = [name for name, ok in self.checks.items() if not ok]
        ok = bool(self.checks) and not failed and self.error is None
        line = {
            "tool": self.tool,
            "endpoint": self.endpoint,
            "ok": ok,
            "failed": failed,
            "checks": self.checks,
            "details": self.details,
            "timings": self.timings,
            "error": self.error,
        }
        sys.stdout.flush()
        print(json.dumps(line, default=str), flush=True)
        return 0 if ok else 1


def _jsonable(value: object) -> object:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _response_body(exc: BaseException | None) -> str:
    """The body of the HTTP error response behind exc (requests and httpx keep it), if any."""
    while exc is not None:
        text = getattr(getattr(exc, "response", None), "text", None)
        if isinstance(text, str):
            return f"\nresponse body: {text[:2000]}"
        exc = exc.__cause__ or exc.__context__
    return ""


def run(tool: str, body: Callable[[Report, str, str], None]) -> None:
    """Run body(report, endpoint, key), print the report line and exit with its status."""
    endpoint, key = env()
    report = Report(tool, endpoint)
    try:
        body(report, endpoint, key)
    except BaseException as exc:  # noqa: BLE001 - every failure ends up in the JSON line
        report.error = "".join(traceback.format_exception(exc))[-4000:] + _response_body(exc)
    sys.exit(report.emit())
