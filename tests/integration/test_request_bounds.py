"""The front door's request bounds on the real stack (gunicorn as `shoal up` runs it): a long URL,
large headers, JSON bombs and oversized bodies are answered in the error shape, the bodies with a
413 in under a second, and the API's memory does not grow. No VM is used.

The bounds themselves are listed in docs/limits.md ("Requests"); tests/unit/test_request_bounds.py
and test_server_layer.py cover each of them in detail.
"""

from __future__ import annotations

import time
from pathlib import Path

import requests

from tests.integration.conftest import Stack, processes_of

JSON = {"Content-Type": "application/json"}


def assert_error(response: requests.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"code", "message"}, error
    assert error["code"] == code and response.headers["x-ms-error-code"] == code
    for word in words:
        assert word in error["message"], (word, error)


def api_rss_bytes(stack: Stack) -> int:
    """Resident memory of the instance's gunicorn processes (masters and workers)."""
    total = 0
    for pid in processes_of(str(stack.home)):
        try:
            if b"gunicorn" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rss = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        total += int(rss.split()[1]) * 1024
    return total


def test_a_long_url_and_large_headers_are_json(stack: Stack) -> None:
    assert_error(requests.get(f"{stack.url}/{'a' * 5000}", timeout=10), 414, "URITooLong")
    path = f"{stack.url}/v1/sessions/ses_{'0' * 5000}"
    assert_error(requests.get(path, headers=stack.headers(), timeout=10), 414, "URITooLong")
    # Past gunicorn's own limit: gunicorn answers, in the same shape.
    assert_error(requests.get(f"{stack.url}/{'a' * 9000}", timeout=10), 414, "URITooLong")
    big = {"X-Big": "b" * 17_000}
    response = requests.get(f"{stack.url}/healthz", headers=big, timeout=10)
    assert_error(response, 431, "RequestHeaderFieldsTooLarge")
    assert_error(requests.get(f"{stack.url}/nowhere", timeout=10), 404, "NotFound")


def test_json_bombs_and_oversized_bodies_are_413_at_once(stack: Stack) -> None:
    bomb = b"[" * (20 << 20)
    headers = {**stack.headers(), **JSON}
    before = api_rss_bytes(stack)
    for _ in range(3):
        started = time.monotonic()
        response = requests.post(f"{stack.url}/v1/batches", data=bomb, headers=headers, timeout=30)
        elapsed = time.monotonic() - started
        assert_error(response, 413, "PayloadTooLarge", str(len(bomb)))
        assert elapsed < 1.0, f"413 after {elapsed:.2f} s"
        # Over the JSON limit on an execution route, even without a valid key or session.
        response = requests.post(
            f"{stack.url}/v1/sessions/ses_x/executions",
            data=bomb[: 8 << 20],
            headers=JSON,
            timeout=30,
        )
        assert_error(response, 413, "PayloadTooLarge")
        deep = b"[" * 50_000
        response = requests.post(f"{stack.url}/v1/batches", data=deep, headers=headers, timeout=30)
        assert_error(response, 400, "ValidationFailed", "nested too deeply")
    grown = api_rss_bytes(stack) - before
    assert grown < 8 << 20, f"the API grew by {grown} bytes"

    def chunked():
        for _ in range(20):
            yield bomb[: 1 << 20]

    started = time.monotonic()
    response = requests.post(f"{stack.url}/v1/batches", data=chunked(), headers=headers, timeout=30)
    elapsed = time.monotonic() - started
    assert_error(response, 413, "PayloadTooLarge")
    assert elapsed < 1.0, f"413 after {elapsed:.2f} s"
