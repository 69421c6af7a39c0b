"""The server layer itself: a real gunicorn, configured by api/server.py as `shoal up` runs it,
on a free loopback port. Every answer is JSON in the error shape, the app's own (long URL, large
headers, oversized body, unknown route) and gunicorn's (past its own limits, a malformed request).

Nothing here needs Redis: every request is refused before authentication, and gunicorn is an
ordinary process, stopped at the end of the module.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests

from api import server
from api.request_bounds import MAX_HEADER_BYTES, MAX_TARGET_BYTES
from shoal.settings import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    home = tmp_path_factory.mktemp("gunicorn-home")
    env = {
        **os.environ,
        "SHOAL_HOME": str(home),
        "SHOAL_REDIS_URL": "redis://127.0.0.1:1/0",  # nothing listens: no request reaches it
        "HOME": str(home),  # where gunicorn would open its control socket
    }
    env.pop("XDG_RUNTIME_DIR", None)
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:api.server", "-w", "1"]
    argv += ["--threads", "4", "--graceful-timeout", "2", "-b", f"127.0.0.1:{port}"]
    argv += ["api.app:create_app()"]
    log = (home / "gunicorn.log").open("wb")
    process = subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("gunicorn did not start:\n" + (home / "gunicorn.log").read_text())
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
    assert not (home / ".gunicorn").exists(), "gunicorn opened its control socket"


def assert_json_error(status: int, headers, body: bytes, expected: int, code: str, *words: str):
    assert status == expected, (status, body[:300])
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)
    assert set(error) == {"error"} and set(error["error"]) == {"code", "message"}, error
    assert error["error"]["code"] == code and headers["x-ms-error-code"] == code
    for word in words:
        assert word in error["error"]["message"], (word, error)


def check(response: requests.Response, expected: int, code: str, *words: str) -> None:
    assert_json_error(
        response.status_code, response.headers, response.content, expected, code, *words
    )


def raw(url: str, request: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Send bytes as they are and read the answer (for requests no HTTP client would make)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.headers, response.read()


def test_a_5000_character_path_is_json_414_from_the_app(url: str) -> None:
    check(requests.get(f"{url}/{'a' * 5000}", timeout=10), 414, "URITooLong", str(MAX_TARGET_BYTES))


def test_a_request_line_past_gunicorns_limit_is_json_414(url: str) -> None:
    response = requests.get(f"{url}/{'a' * 9000}", timeout=10)
    check(response, 414, "URITooLong", str(server.limit_request_line))


def test_large_headers_are_json_431_from_the_app_and_from_gunicorn(url: str) -> None:
    app_431 = requests.get(
        f"{url}/healthz", headers={"X-Big": "b" * (MAX_HEADER_BYTES + 10)}, timeout=10
    )
    check(app_431, 431, "RequestHeaderFieldsTooLarge", str(MAX_HEADER_BYTES))
    big = "b" * (server.limit_request_field_size + 10)
    check(
        requests.get(f"{url}/healthz", headers={"X-Big": big}, timeout=10),
        431,
        "RequestHeaderFieldsTooLarge",
    )
    many = "".join(f"X-H{i}: 1\r\n" for i in range(server.limit_request_fields + 1))
    status, headers, body = raw(url, f"GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
    assert_json_error(status, headers, body, 431, "RequestHeaderFieldsTooLarge")


def test_a_malformed_request_is_json_400(url: str) -> None:
    status, headers, body = raw(url, b"GARBAGE\r\n\r\n")
    assert_json_error(status, headers, body, 400, "ValidationFailed")
    status, headers, body = raw(url, b"GET /healthz HTTP/1.1\r\nBad Header: x\r\n\r\n")
    assert_json_error(status, headers, body, 400, "ValidationFailed")


def test_unknown_route_and_wrong_method_are_json(url: str) -> None:
    check(requests.get(f"{url}/nowhere", timeout=10), 404, "NotFound")
    check(requests.post(f"{url}/healthz", timeout=10), 405, "MethodNotAllowed")


def test_oversized_bodies_are_413_within_a_second(url: str) -> None:
    bomb = b"[" * (20 << 20)
    json_type = {"Content-Type": "application/json"}
    started = time.monotonic()
    response = requests.post(f"{url}/v1/batches", data=bomb, headers=json_type, timeout=10)
    elapsed = time.monotonic() - started
    check(response, 413, "PayloadTooLarge", str(len(bomb)))
    assert elapsed < 1.0, f"413 after {elapsed:.2f} s"

    def chunked():
        for _ in range(20):
            yield bomb[: 1 << 20]

    started = time.monotonic()
    response = requests.post(f"{url}/v1/batches", data=chunked(), headers=json_type, timeout=10)
    elapsed = time.monotonic() - started
    check(response, 413, "PayloadTooLarge")
    assert elapsed < 1.0, f"413 after {elapsed:.2f} s"

    deep = b"[" * 10_000
    response = requests.post(f"{url}/v1/batches", data=deep, headers=json_type, timeout=10)
    check(response, 400, "ValidationFailed", "nested too deeply")
