"""The dynamic-sessions routes (/pools/{pool}/...) over raw HTTP, against a real instance.

The contract is described in docs/api.md. The published client tools are tested
in test_client_tools.py; here every route and shape is checked directly.
"""

from __future__ import annotations

import base64
import secrets
import time
import urllib.parse

import pytest
import requests

from tests.integration.conftest import Stack

LEGACY = "2024-02-02-preview"
CURRENT = "2025-02-02-preview"


class Pool:
    """The pool endpoint as a client is configured with it, for one identifier."""

    def __init__(self, stack: Stack, identifier: str, key: str | None = None) -> None:
        self.base = f"{stack.url}/pools/default"
        self.identifier = identifier
        self.headers = stack.headers(key)

    def request(self, method: str, route: str, version: str = CURRENT, **kwargs):
        params = {"identifier": self.identifier, "api-version": version, **kwargs.pop("params", {})}
        return requests.request(
            method,
            f"{self.base}/{route}",
            params=params,
            headers={**self.headers, **kwargs.pop("headers", {})},
            timeout=kwargs.pop("timeout", 120),
            **kwargs,
        )

    def legacy_execute(self, code: str, **properties) -> dict:
        body = {"properties": {"codeInputType": "inline", "executionType": "synchronous",
                               "code": code, **properties}}  # fmt: skip
        response = self.request("POST", "code/execute", LEGACY, json=body)
        assert response.status_code == 200, response.text
        return response.json()["properties"]

    def execute(self, body: dict, status: int = 200) -> requests.Response:
        response = self.request("POST", "executions", json=body)
        assert response.status_code == status, response.text
        return response


def assert_error(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"code", "message"} and error["message"]
    assert error["code"] == code, error
    assert response.headers["x-ms-error-code"] == code
    return error


def new_identifier(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def legacy(stack: Stack) -> Pool:
    return Pool(stack, new_identifier("legacy"))


@pytest.fixture(scope="module")
def current(stack: Stack) -> Pool:
    return Pool(stack, new_identifier("current"))


# --- legacy generation -----------------------------------------------------------------------
def test_legacy_execute_creates_the_session_and_keeps_state(stack: Stack, legacy: Pool) -> None:
    first = legacy.legacy_execute("x = 6 * 7\nx")
    assert first["status"] == "Success" and first["result"] == 42
    assert first["stdout"] == "" and first["stderr"] == ""
    assert isinstance(first["executionTimeInMilliseconds"], int)
    text = legacy.legacy_execute("print('out')\n'text'")
    assert {k: v for k, v in text.items() if k != "executionTimeInMilliseconds"} == {
        "$id": "2",
        "status": "Success",
        "stdout": "out\n",
        "stderr": "",
        "result": "text",
        # Shoal's additions (docs/limits.md "Outputs"): nothing here was cut.
        "stdoutTruncated": False,
        "stderrTruncated": False,
        "resultTruncated": False,
        "outputNotes": [],
    }
    shaped = legacy.request(
        "POST", "code/execute", LEGACY, json={"properties": {"code": "x + 1"}}
    ).json()
    assert shaped["$id"] == "1" and shaped["properties"]["$id"] == "2"
    assert shaped["properties"]["result"] == 43
    # Containers come back as their repr: AutoGen parses a list result by splitting its text.
    assert legacy.legacy_execute("{'a': [1, 2]}")["result"] == "{'a': [1, 2]}"
    assert legacy.legacy_execute("float('nan')")["result"] == "nan"
    assert legacy.legacy_execute("None")["result"] == ""

    # An identifier's session is an ordinary session.
    listed = requests.get(f"{stack.url}/v1/sessions", headers=stack.headers(), timeout=10).json()
    mine = [s for s in listed["sessions"] if s["identifier"] == legacy.identifier]
    assert len(mine) == 1 and mine[0]["id"].startswith("ses_")


def test_legacy_failure_and_image(legacy: Pool) -> None:
    failed = legacy.legacy_execute("def f():\n    raise ValueError('bad value')\nf()")
    assert failed["status"] == "Failure" and failed["result"] == ""
    assert "ValueError" in failed["stderr"] and "bad value" in failed["stderr"]
    assert "Traceback" in failed["stderr"] or "line" in failed["stderr"]

    image = legacy.legacy_execute(
        "import matplotlib.pyplot as plt\nplt.plot([3, 1, 2])\nplt.show()", timeoutInSeconds=120
    )
    assert image["status"] == "Success", image
    assert image["result"]["type"] == "image" and image["result"]["format"] == "png"
    assert base64.b64decode(image["result"]["base64_data"]).startswith(b"\x89PNG")

    timed_out = legacy.legacy_execute("import time; time.sleep(30)", timeoutInSeconds=1)
    assert timed_out["status"] == "Failure" and "timed out" in timed_out["stderr"]


def test_legacy_files(legacy: Pool) -> None:
    upload = legacy.request(
        "POST", "files/upload", LEGACY, files={"file": ("/mnt/data/data.csv", b"a,b\n1,2\n")}
    )
    assert upload.status_code == 200, upload.text
    body = upload.json()
    assert body["$id"] == "1"
    entry = body["value"][0]
    assert entry["$id"] == "2" and entry["properties"]["$id"] == "3"
    assert entry["properties"]["filename"] == "data.csv" and entry["properties"]["size"] == 8
    assert entry["properties"]["lastModifiedTime"].endswith("Z")

    listed = legacy.request("GET", "files", LEGACY).json()
    names = [v["properties"]["filename"] for v in listed["value"]]
    assert "data.csv" in names and listed["$id"] == "1"
    content = legacy.request("GET", "files/content/data.csv", LEGACY)
    assert content.status_code == 200 and content.content == b"a,b\n1,2\n"
    assert legacy.legacy_execute("open('/mnt/data/data.csv').read()")["result"] == "a,b\n1,2\n"
    missing = legacy.request("GET", "files/content/nope.csv", LEGACY)
    assert_error(missing, 404, "FileNotFound")


# --- current generation ----------------------------------------------------------------------
def test_sync_execution_shape_and_headers(stack: Stack, current: Pool) -> None:
    response = current.execute(
        {
            "codeInputType": "Inline",
            "executionType": "Synchronous",
            "code": "print(7*9)",
            "timeoutInSeconds": 60,
            "outputStreamsMaxLength": 4096,
        }  # fmt: skip
    )
    body = response.json()
    assert body["identifier"] == current.identifier and body["executionType"] == "Synchronous"
    assert body["status"] == "Succeeded"
    assert body["result"]["stdout"] == "63\n" and body["result"]["stderr"] == ""
    assert body["result"]["executionResult"] is None
    assert isinstance(body["result"]["executionTimeInMilliseconds"], int)
    assert response.headers["operation-id"] == body["id"]
    location = response.headers["Operation-Location"]
    assert f"/pools/default/executions/{body['id']}" in location
    polled = requests.get(location, headers=current.headers, timeout=10)
    assert polled.status_code == 200 and polled.json()["status"] == "Succeeded"

    value = current.execute({"pythonCode": "y = 'nan'\ny"}).json()
    assert value["result"]["executionResult"] == "'nan'"
    assert current.execute({"code": "float('nan')"}).json()["result"]["executionResult"] == "nan"
    # Enum values arrive in either case.
    lower = current.execute({"codeInputType": "inline", "executionType": "synchronous",
                             "code": "y"})  # fmt: skip
    assert lower.json()["status"] == "Succeeded"


def test_async_execution_is_polled_to_the_end(current: Pool) -> None:
    response = current.execute(
        {"executionType": "Asynchronous", "code": "import time; time.sleep(1); 6 * 7"}, 202
    )
    body = response.json()
    assert body["status"] in ("NotStarted", "Running") and body["result"] is None
    assert body["executionType"] == "Asynchronous"
    location = response.headers["Operation-Location"]
    assert response.headers["operation-id"] == body["id"]
    parsed = urllib.parse.urlsplit(location)
    assert dict(urllib.parse.parse_qsl(parsed.query))["api-version"] == CURRENT
    seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        polled = requests.get(location, headers=current.headers, timeout=10).json()
        seen.add(polled["status"])
        if polled["status"] not in ("NotStarted", "Running"):
            break
        time.sleep(0.05)
    assert polled["status"] == "Succeeded" and polled["result"]["executionResult"] == "42"
    assert "Running" in seen


def test_failures_shell_and_timeouts(current: Pool) -> None:
    failed = current.execute({"code": "1 / 0"}).json()
    assert failed["status"] == "Failed" and "ZeroDivisionError" in failed["result"]["stderr"]
    shell = current.execute({"shellCommand": "echo hi; exit 0"}).json()
    assert shell["status"] == "0" and shell["result"]["stdout"] == "hi\n"
    bad = current.execute({"shellCommand": "echo no >&2; exit 3"}).json()
    assert bad["status"] == "3" and "no" in bad["result"]["stderr"]
    timed = current.execute({"code": "import time; time.sleep(30)", "timeoutInSeconds": 1})
    assert timed.json()["status"] == "Failed"
    assert "timed out" in timed.json()["result"]["stderr"]
    cut = current.execute({"code": "print('z' * 100)", "outputStreamsMaxLength": 10}).json()
    assert cut["result"]["stdout"] == "z" * 10


def test_current_files(current: Pool) -> None:
    upload = current.request(
        "POST", "files", files={"file": ("report.txt", b"hello")}, params={"path": "docs"}
    )
    assert upload.status_code == 200, upload.text
    entry = upload.json()
    assert entry["name"] == "report.txt" and entry["type"] == "File"
    assert entry["contentType"] == "text/plain" and entry["sizeInBytes"] == 5
    assert entry["lastModifiedAt"].endswith("Z")

    top = current.request("GET", "files").json()
    assert top["nextLink"] is None
    assert {"name": "docs", "type": "Directory"}.items() <= next(
        v for v in top["value"] if v["name"] == "docs"
    ).items()
    inside = current.request("GET", "files", params={"path": "docs"}).json()["value"]
    assert [v["name"] for v in inside] == ["report.txt"]
    deep = current.request("GET", "files", params={"recursive": "true"}).json()["value"]
    assert "report.txt" in [v["name"] for v in deep]
    # Legacy api-versions get the legacy list on the same route.
    legacy_list = current.request("GET", "files", LEGACY, params={"path": "docs"}).json()
    assert legacy_list["value"][0]["properties"]["filename"] == "docs/report.txt"

    stat = current.request("GET", "files/report.txt", params={"path": "docs"})
    assert stat.status_code == 200 and stat.json()["sizeInBytes"] == 5
    content = current.request("GET", "files/report.txt/content", params={"path": "docs"})
    assert content.status_code == 200 and content.content == b"hello"
    deleted = current.request("DELETE", "files/report.txt", params={"path": "docs"})
    assert deleted.status_code == 204
    assert_error(
        current.request("GET", "files/report.txt", params={"path": "docs"}), 404, "FileNotFound"
    )
    # Absolute /mnt/data paths are the same files; anything else is refused.
    current.request("POST", "files", files={"file": ("/mnt/data/abs.txt", b"abs")})
    assert current.request("GET", "files/abs.txt/content").content == b"abs"
    for params in ({"path": "../etc"}, {"path": "a/../../.."}):
        assert_error(current.request("GET", "files", params=params), 400, "PathNotAllowed")


def test_session_management_routes(stack: Stack) -> None:
    pool = Pool(stack, new_identifier("managed"))
    assert_error(pool.request("GET", "session"), 400, "SessionWithIdentifierNotFound")
    pool.execute({"code": "kept = 1"})

    session = pool.request("GET", "session").json()
    assert set(session) == {"identifier", "createdAt", "lastAccessedAt", "expireAt", "etag"}
    assert session["identifier"] == pool.identifier
    listed = pool.request("GET", "listSessions").json()["sessions"]
    assert pool.identifier in [s["identifier"] for s in listed]
    got = pool.request("POST", ".management/getSession").json()
    assert got["identifier"] == pool.identifier and "expiresAt" in got
    page = pool.request("POST", ".management/listSessions").json()
    assert set(page) == {"value", "count", "nextLink"} and page["nextLink"] is None
    assert pool.identifier in [s["identifier"] for s in page["value"]]
    assert page["count"] == len(page["value"])

    metadata = pool.request("GET", "metadata").json()
    assert metadata["runtimes"][0]["name"] == "python" and metadata["runtimes"][0]["version"]
    packages = {p["name"].lower() for p in metadata["packages"]}
    assert {"numpy", "pandas", "matplotlib", "scikit-learn"} <= packages

    assert pool.request("DELETE", "session").status_code == 204
    assert_error(pool.request("GET", "session"), 400, "SessionWithIdentifierNotFound")
    # The identifier now names a fresh session.
    fresh = pool.execute({"code": "'kept' in dir()"}).json()
    assert fresh["result"]["executionResult"] == "False"
    assert pool.request("POST", ".management/stopSession").status_code == 204
    assert_error(
        pool.request("POST", ".management/getSession"), 400, "SessionWithIdentifierNotFound"
    )


def test_identifier_is_scoped_to_the_tenant(stack: Stack, current: Pool) -> None:
    current.execute({"code": "secret = 's3'"})
    other = Pool(stack, current.identifier, stack.new_key("dyn-tenant-b"))
    theirs = other.execute({"code": "'secret' in dir()"}).json()
    assert theirs["result"]["executionResult"] == "False"
    assert current.execute({"code": "secret"}).json()["result"]["executionResult"] == "'s3'"
    # Nor can tenant B poll tenant A's execution.
    mine = current.execute({"code": "1"}).json()
    response = requests.get(
        f"{other.base}/executions/{mine['id']}", headers=other.headers, timeout=10
    )
    assert response.status_code == 404


# --- errors ----------------------------------------------------------------------------------
def test_error_shapes(stack: Stack) -> None:
    base = f"{stack.url}/pools/default"
    h = stack.headers()
    assert_error(requests.post(f"{base}/executions?identifier=a", timeout=10), 401, "Unauthorized")
    for query in ("", "?identifier=", "?identifier=a/b", "?identifier=" + "a" * 129):
        response = requests.post(f"{base}/executions{query}", json={"code": "1"}, headers=h)
        assert_error(response, 400, "SessionRequestValidationFailed")
    response = requests.post(
        f"{base}/code/execute?identifier=e1", json={"code": "1"}, headers=h, timeout=10
    )
    assert_error(response, 400, "SessionPropertiesMissing")
    response = requests.post(
        f"{stack.url}/pools/nope/executions?identifier=e1", json={"code": "1"}, headers=h
    )
    assert_error(response, 404, "PoolNotFound")
    response = requests.get(f"{base}/executions/exe_nope?identifier=e1", headers=h, timeout=10)
    assert_error(response, 404, "ExecutionNotFound")
    response = requests.get(f"{base}/listSessions?skip=x", headers=h, timeout=10)
    assert_error(response, 400, "SessionRequestValidationFailed")
    too_big = {"code": "x" * (1024 * 1024 + 1)}
    response = requests.post(f"{base}/executions?identifier=e1", json=too_big, headers=h)
    assert_error(response, 400, "SessionRequestValidationFailed")


MALFORMED = [
    b"",
    b"{",
    b"null",
    b"[]",
    b"1e999",
    b"\xff\xfe",
    b'{"properties": null}',
    b'{"properties": []}',
    b'{"properties": {"code": null}}',
    b'{"properties": {"code": ""}}',
    b'{"properties": {"code": "1", "timeoutInSeconds": 1e999}}',
    b'{"properties": {"code": "1", "timeoutInSeconds": NaN}}',
    b'{"properties": {"code": "1", "timeoutInSeconds": "60"}}',
    b'{"properties": {"code": "1", "codeInputType": "url"}}',
    b'{"properties": {"code": "\\ud800"}}',
    b'{"code": null}',
    b'{"code": 5}',
    b'{"code": "\\ud800"}',
    b'{"code": "1", "timeoutInSeconds": -1}',
    b'{"code": "1", "timeoutInSeconds": true}',
    b'{"code": "1", "outputStreamsMaxLength": 1e999}',
    b'{"code": "1", "codeInputType": {"a": 1}}',
    b'{"shellCommand": ["ls"]}',
]


def test_no_client_input_gives_a_500(stack: Stack, current: Pool) -> None:
    current.execute({"code": "1"})  # the identifier's session exists: no implicit creation below
    routes = [
        ("POST", "code/execute"),
        ("POST", "executions"),
        ("POST", "files/upload"),
        ("POST", "files"),
        ("POST", ".management/getSession"),
        ("POST", ".management/listSessions"),
    ]
    for method, route in routes:
        for body in MALFORMED:
            for content_type in ("application/json", "multipart/form-data", "text/plain"):
                response = current.request(
                    method, route, data=body, headers={"Content-Type": content_type}
                )
                assert response.status_code < 500, (route, body, content_type, response.text)
                if response.status_code >= 400:
                    assert response.json()["error"]["code"] == response.headers["x-ms-error-code"]
                else:
                    assert route.startswith(".management")
    for params in (
        {"skip": "-1"},
        {"skip": "9" * 40},
        {"path": "\x00"},
        {"recursive": "maybe"},
        {"api-version": "garbage"},
    ):
        for route in ("listSessions", "files"):
            response = current.request("GET", route, params=params)
            assert response.status_code < 500, (route, params, response.text)
