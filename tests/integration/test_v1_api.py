"""The native API (/v1) through real HTTP, Redis, the Celery worker and guests.

Sessions are shared where a test's meaning allows (each costs a snapshot restore): `py` for
results and state, `timing` for cancel and timeouts (which may restart its interpreter),
`files` for /mnt/data.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import os
import time
import urllib.parse

import pytest
import requests

from shoal.settings import load
from tests.integration.conftest import Stack

FINAL = {"succeeded", "failed", "timed_out", "cancelled", "lost"}


def assert_error(response: requests.Response, status: int, code: str, *words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"code", "message"}, error
    assert error["code"] == code, error
    assert response.headers["x-ms-error-code"] == code
    for word in words:
        assert word in error["message"], (word, error)
    return error


def poll(stack: Stack, execution_id: str, until=FINAL.__contains__, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = requests.get(
            f"{stack.url}/v1/executions/{execution_id}", headers=stack.headers(), timeout=10
        )
        assert response.status_code == 200, response.text
        record = response.json()
        if until(record["status"]) or time.monotonic() > deadline:
            return record
        time.sleep(0.1)


def submit(stack: Stack, session_id: str, code: str, key: str | None = None, **body):
    return requests.post(
        f"{stack.url}/v1/sessions/{session_id}/executions",
        json={"code": code, **body},
        headers=stack.headers(key),
        timeout=300,
    )


@pytest.fixture(scope="module")
def py(stack: Stack) -> str:
    return stack.new_session()


@pytest.fixture(scope="module")
def timing(stack: Stack) -> str:
    return stack.new_session()


@pytest.fixture(scope="module")
def files(stack: Stack) -> str:
    return stack.new_session()


@pytest.fixture(scope="module")
def tenant_b(stack: Stack) -> str:
    return stack.new_key("tenant-b")


@pytest.fixture(scope="module")
def b_session(stack: Stack, tenant_b: str) -> str:
    return stack.new_session(tenant_b)


# --- sessions --------------------------------------------------------------------------------
def test_session_object_and_delete(stack: Stack) -> None:
    response = requests.post(
        f"{stack.url}/v1/sessions", json={"pool": "default"}, headers=stack.headers(), timeout=180
    )
    assert response.status_code == 201, response.text
    session = response.json()
    assert session["pool"] == "default" and session["state"] == "active"
    assert session["id"].startswith("ses_") and session["identifier"] is None
    for stamp in ("created_at", "last_used_at", "expires_at"):
        assert session[stamp].endswith("Z"), session
    url = f"{stack.url}/v1/sessions/{session['id']}"
    assert requests.get(url, headers=stack.headers(), timeout=10).json()["id"] == session["id"]
    assert requests.delete(url, headers=stack.headers(), timeout=10).status_code == 204
    assert_error(requests.get(url, headers=stack.headers(), timeout=10), 404, "SessionNotFound")
    assert_error(requests.delete(url, headers=stack.headers(), timeout=10), 404, "SessionNotFound")
    gone = submit(stack, session["id"], "1")
    assert_error(gone, 404, "SessionNotFound")


# --- results ---------------------------------------------------------------------------------
def test_state_persists_and_result_shapes(stack: Stack, py: str) -> None:
    first = submit(stack, py, "import math\nx = 41\nprint('hi')")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["status"] == "succeeded" and body["stdout"] == "hi\n" and body["result"] is None
    assert body["language"] == "python" and body["session_id"] == py
    assert body["error"] is None and body["exit_code"] is None
    assert body["interpreter_restarted"] is False
    assert body["started_at"] and body["finished_at"] and body["duration_ms"] >= 0
    second = stack.execute(py, "x + 1")
    assert second["result"]["text/plain"] == "42"


def test_matplotlib_figure_is_an_image_output(stack: Stack, py: str) -> None:
    body = stack.execute(
        py, "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()", timeout_s=120
    )
    assert body["status"] == "succeeded", body
    images = [o for o in body["outputs"] if "image/png" in o["data"]]
    assert len(images) == 1 and images[0]["type"] == "display"
    import base64

    assert base64.b64decode(images[0]["data"]["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")


def test_exception_is_failed_with_error(stack: Stack, py: str) -> None:
    body = stack.execute(py, "print('before')\n1 / 0")
    assert body["status"] == "failed" and body["stdout"] == "before\n"
    assert body["error"]["name"] == "ZeroDivisionError"
    assert "division by zero" in body["error"]["value"]
    assert "ZeroDivisionError" in body["error"]["traceback"]
    # The session is still fine.
    assert stack.execute(py, "x")["result"]["text/plain"] == "41"


def test_shell_exit_code(stack: Stack, py: str) -> None:
    ok = stack.execute(py, "echo hello; echo oops >&2", language="shell")
    assert ok["status"] == "succeeded" and ok["exit_code"] == 0, ok
    assert ok["stdout"] == "hello\n" and ok["stderr"] == "oops\n"
    bad = stack.execute(py, "exit 3", language="shell")
    assert bad["status"] == "failed" and bad["exit_code"] == 3, bad


def test_output_is_cut_at_max_output(stack: Stack, py: str) -> None:
    body = stack.execute(py, "print('a' * 10000)", max_output=100)
    assert body["stdout"] == "a" * 100 and body["stdout_truncated"] is True


# --- async, ordering, idempotency --------------------------------------------------------------
def test_async_is_202_with_location_then_polled(stack: Stack, py: str) -> None:
    response = submit(stack, py, "import time; time.sleep(1); 6 * 7", wait=False)
    assert response.status_code == 202, response.text
    assert response.json()["status"] in ("queued", "running")
    location = response.headers["Location"]
    assert location.endswith(f"/v1/executions/{response.json()['id']}")
    url = urllib.parse.urljoin(stack.url, location)
    seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = requests.get(url, headers=stack.headers(), timeout=10).json()
        seen.add(record["status"])
        if record["status"] in FINAL:
            break
        time.sleep(0.05)
    assert record["status"] == "succeeded" and record["result"]["text/plain"] == "42"
    assert "running" in seen, seen


def test_concurrent_executions_run_in_arrival_order(stack: Stack, py: str) -> None:
    stack.execute(py, "order = []")
    # The first holds the session for a second, so the others are all waiting at once.
    ids = [submit(stack, py, "import time; time.sleep(1)", wait=False).json()["id"]]
    for i in range(10):
        response = submit(stack, py, f"order.append({i})", wait=False)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    assert poll(stack, ids[-1])["status"] == "succeeded"
    assert stack.execute(py, "order")["result"]["text/plain"] == repr(list(range(10)))
    records = [poll(stack, i) for i in ids]
    starts = [r["started_at"] for r in records]
    assert starts == sorted(starts)


def test_idempotency_key_runs_once_per_tenant(
    stack: Stack, py: str, tenant_b: str, b_session: str
) -> None:
    stack.execute(py, "counter = 0")
    headers = {**stack.headers(), "Idempotency-Key": "idem-once-1"}
    url = f"{stack.url}/v1/sessions/{py}/executions"
    first = requests.post(url, json={"code": "counter += 1; counter"}, headers=headers, timeout=60)
    again = requests.post(url, json={"code": "counter += 1; counter"}, headers=headers, timeout=60)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.json()["id"] == again.json()["id"]
    assert again.json()["result"]["text/plain"] == "1"
    assert stack.execute(py, "counter")["result"]["text/plain"] == "1"

    # Two at once with a fresh key: still one execution.
    headers = {**stack.headers(), "Idempotency-Key": "idem-race-1"}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda _: requests.post(
                    url, json={"code": "counter += 1"}, headers=headers, timeout=60
                ),
                range(4),
            )
        )
    assert len({a.json()["id"] for a in answers}) == 1, [a.text for a in answers]
    assert stack.execute(py, "counter")["result"]["text/plain"] == "2"

    # The same key under another tenant is another execution.
    other = requests.post(
        f"{stack.url}/v1/sessions/{b_session}/executions",
        json={"code": "'b ran'"},
        headers={**stack.headers(tenant_b), "Idempotency-Key": "idem-once-1"},
        timeout=60,
    )
    assert other.status_code == 200, other.text
    assert other.json()["id"] != first.json()["id"]
    assert other.json()["result"]["text/plain"] == "'b ran'"


# --- cancel and timeouts ---------------------------------------------------------------------
def test_cancel_running_and_queued(stack: Stack, timing: str) -> None:
    stack.execute(timing, "keep = 'kept'")
    running = submit(stack, timing, "import time; time.sleep(60)", wait=False).json()
    queued = submit(stack, timing, "ran_b = True", wait=False).json()
    after = submit(stack, timing, "'after'", wait=False).json()
    assert poll(stack, running["id"], lambda s: s != "queued")["status"] == "running"

    url = f"{stack.url}/v1/executions/{queued['id']}/cancel"
    response = requests.post(url, headers=stack.headers(), timeout=10)
    assert response.status_code == 200 and response.json()["id"] == queued["id"]
    assert poll(stack, queued["id"], timeout_s=10)["status"] == "cancelled"
    assert poll(stack, running["id"], timeout_s=0)["status"] == "running"

    started = time.monotonic()
    url = f"{stack.url}/v1/executions/{running['id']}/cancel"
    assert requests.post(url, headers=stack.headers(), timeout=10).status_code == 200
    cancelled = poll(stack, running["id"], timeout_s=20)
    assert cancelled["status"] == "cancelled", cancelled
    assert time.monotonic() - started < 10
    assert cancelled["interpreter_restarted"] is False

    assert poll(stack, after["id"])["result"]["text/plain"] == "'after'"
    state = stack.execute(timing, "(keep, 'ran_b' in dir())")
    assert state["result"]["text/plain"] == "('kept', False)"
    # Cancelling a finished execution changes nothing.
    again = requests.post(url, headers=stack.headers(), timeout=10)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_timeout_then_session_still_usable(stack: Stack, timing: str) -> None:
    started = time.monotonic()
    body = stack.execute(timing, "import time\nprint('start')\ntime.sleep(30)", timeout_s=2)
    elapsed = time.monotonic() - started
    assert body["status"] == "timed_out", body
    assert body["stdout"] == "start\n" and body["interpreter_restarted"] is False
    assert 2 <= elapsed < 10, elapsed
    assert stack.execute(timing, "keep")["result"]["text/plain"] == "'kept'"


def test_code_ignoring_interrupts_is_killed_and_interpreter_restarted(
    stack: Stack, timing: str
) -> None:
    code = (
        "import time\n"
        "while True:\n"
        "    try:\n"
        "        time.sleep(100)\n"
        "    except KeyboardInterrupt:\n"
        "        print('ignored')\n"
    )
    started = time.monotonic()
    body = stack.execute(timing, code, timeout_s=2)
    elapsed = time.monotonic() - started
    assert body["status"] == "timed_out", body
    assert body["interpreter_restarted"] is True
    assert "ignored" in body["stdout"]
    assert elapsed < 2 + 3 + 10, elapsed  # timeout + the agent's grace + slack
    # The session lives on in a fresh interpreter: the old state is gone.
    after = stack.execute(timing, "'keep' in dir()")
    assert after["status"] == "succeeded" and after["result"]["text/plain"] == "False"
    session = requests.get(
        f"{stack.url}/v1/sessions/{timing}", headers=stack.headers(), timeout=10
    ).json()
    assert session["state"] == "active"


# --- tenants ---------------------------------------------------------------------------------
def test_tenant_isolation(stack: Stack, py: str, files: str, tenant_b: str, b_session: str) -> None:
    mine = stack.execute(py, "'a secret'")
    requests.put(
        f"{stack.url}/v1/sessions/{files}/files/secret.txt",
        data=b"a's",
        headers=stack.headers(),
        timeout=60,
    ).raise_for_status()
    b = stack.headers(tenant_b)
    for method, path in [
        ("GET", f"/v1/sessions/{py}"),
        ("DELETE", f"/v1/sessions/{py}"),
        ("POST", f"/v1/sessions/{py}/executions"),
        ("GET", f"/v1/sessions/{files}/files"),
        ("GET", f"/v1/sessions/{files}/files/secret.txt"),
        ("PUT", f"/v1/sessions/{files}/files/secret.txt"),
        ("DELETE", f"/v1/sessions/{files}/files/secret.txt"),
        ("POST", f"/v1/sessions/{files}/files"),
    ]:
        response = requests.request(
            method, stack.url + path, headers=b, json={"code": "1"}, timeout=30
        )
        assert_error(response, 404, "SessionNotFound")
    for method, path in [
        ("GET", f"/v1/executions/{mine['id']}"),
        ("POST", f"/v1/executions/{mine['id']}/cancel"),
    ]:
        assert_error(
            requests.request(method, stack.url + path, headers=b, timeout=10),
            404,
            "ExecutionNotFound",
        )

    theirs = {
        s["id"]
        for s in requests.get(f"{stack.url}/v1/sessions", headers=b, timeout=10).json()["sessions"]
    }
    ours = {
        s["id"]
        for s in requests.get(
            f"{stack.url}/v1/sessions", headers=stack.headers(), timeout=10
        ).json()["sessions"]
    }
    assert theirs == {b_session} and not theirs & ours
    assert {py, files} <= ours
    # A's things are untouched.
    assert stack.execute(py, "x")["result"]["text/plain"] == "41"
    download = requests.get(
        f"{stack.url}/v1/sessions/{files}/files/secret.txt", headers=stack.headers(), timeout=30
    )
    assert download.content == b"a's"


# --- files -----------------------------------------------------------------------------------
def files_url(stack: Stack, session_id: str, path: str = "") -> str:
    return f"{stack.url}/v1/sessions/{session_id}/files" + (f"/{path}" if path else "")


def test_files_put_list_download_delete(stack: Stack, files: str) -> None:
    blob = os.urandom(5 * 1024 * 1024 + 123)
    put = requests.put(
        files_url(stack, files, "dir/sub/blob.bin"), data=blob, headers=stack.headers(), timeout=120
    )
    assert put.status_code == 201, put.text
    assert put.json()["path"] == "dir/sub/blob.bin" and put.json()["size"] == len(blob)
    assert put.json()["type"] == "file" and put.json()["name"] == "blob.bin"

    multipart = requests.post(
        files_url(stack, files),
        files={"file": ("notes.txt", b"line one\n")},
        data={"path": "dir"},
        headers=stack.headers(),
        timeout=60,
    )
    assert multipart.status_code == 201, multipart.text
    assert multipart.json()["path"] == "dir/notes.txt"

    def listing(**params) -> dict:
        response = requests.get(
            files_url(stack, files), params=params, headers=stack.headers(), timeout=30
        )
        assert response.status_code == 200, response.text
        return {f["path"]: f for f in response.json()["files"]}

    top = listing()
    assert top["dir"]["type"] == "directory" and "dir/notes.txt" not in top
    deep = listing(recursive="true")
    assert deep["dir/sub/blob.bin"]["size"] == len(blob)
    assert deep["dir/notes.txt"]["size"] == 9 and deep["dir/notes.txt"]["modified_at"]
    assert set(listing(path="dir")) == {"dir/notes.txt", "dir/sub"}

    # Code in the session sees the uploads, and its own files can be downloaded.
    seen = stack.execute(files, "open('/mnt/data/dir/notes.txt').read()")
    assert seen["result"]["text/plain"] == repr("line one\n")
    stack.execute(files, "open('/mnt/data/made.txt', 'w').write('by code')")
    made = requests.get(files_url(stack, files, "made.txt"), headers=stack.headers(), timeout=30)
    assert made.status_code == 200 and made.content == b"by code"

    with requests.get(
        files_url(stack, files, "dir/sub/blob.bin"),
        headers=stack.headers(),
        stream=True,
        timeout=120,
    ) as download:
        assert download.status_code == 200
        assert int(download.headers["Content-Length"]) == len(blob)
        digest = hashlib.sha256()
        for chunk in download.iter_content(1 << 16):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(blob).hexdigest()

    deleted = requests.delete(
        files_url(stack, files, "dir/sub/blob.bin"), headers=stack.headers(), timeout=30
    )
    assert deleted.status_code == 204
    missing = requests.get(
        files_url(stack, files, "dir/sub/blob.bin"), headers=stack.headers(), timeout=30
    )
    assert_error(missing, 404, "FileNotFound")
    assert_error(
        requests.delete(files_url(stack, files, "nope.txt"), headers=stack.headers(), timeout=30),
        404,
        "FileNotFound",
    )
    assert_error(
        requests.get(files_url(stack, files, "dir"), headers=stack.headers(), timeout=30),
        400,
        "NotAFile",
    )
    # A directory that is not empty is the client's mistake, not a server error.
    busy_dir = requests.delete(files_url(stack, files, "dir"), headers=stack.headers(), timeout=30)
    assert 400 <= busy_dir.status_code < 500, busy_dir.text
    assert busy_dir.json()["error"]["code"] == busy_dir.headers["x-ms-error-code"]


def raw_request(stack: Stack, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
    """A request whose path is sent exactly as written (requests would normalise `..`)."""
    parsed = urllib.parse.urlsplit(stack.url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=stack.headers())
        response = conn.getresponse()
        return response.status, {
            "body": response.read(),
            "code": response.getheader("x-ms-error-code"),
        }
    finally:
        conn.close()


def test_paths_outside_data_are_refused(stack: Stack, files: str) -> None:
    base = f"/v1/sessions/{files}/files"
    for method, path in [
        ("PUT", f"{base}/../escape.txt"),
        ("PUT", f"{base}/a/../../escape.txt"),
        ("PUT", f"{base}/%2E%2E/escape.txt"),
        ("GET", f"{base}/../../etc/passwd"),
        ("GET", f"{base}/%2E%2E/%2E%2E/etc/passwd"),
        ("DELETE", f"{base}/../escape.txt"),
        ("GET", f"{base}?path=..%2F.."),
        ("GET", f"{base}?path=%2Fetc"),
        ("GET", f"{base}?path=%2Fmnt%2Fdata%2F..%2F..%2Fetc"),
    ]:
        status, answer = raw_request(stack, method, path, b"x" if method == "PUT" else b"")
        assert status == 400, (method, path, status, answer)
        assert answer["code"] == "PathNotAllowed", (path, answer)
    for form in ({"path": "../.."}, {"path": "/etc"}):
        response = requests.post(
            files_url(stack, files),
            files={"file": ("x.txt", b"x")},
            data=form,
            headers=stack.headers(),
            timeout=30,
        )
        assert_error(response, 400, "PathNotAllowed")
    response = requests.post(
        files_url(stack, files), files={"file": ("..", b"x")}, headers=stack.headers(), timeout=30
    )
    assert response.status_code == 400, response.text
    check = stack.execute(files, "import os; sorted(os.listdir('/mnt'))")
    assert check["result"]["text/plain"] == "['data']"


def test_upload_cap_and_one_byte_over(stack: Stack, files: str) -> None:
    cap = load(stack.env).max_upload_bytes
    blob = os.urandom(cap)
    started = time.monotonic()
    put = requests.put(
        files_url(stack, files, "cap.bin"), data=blob, headers=stack.headers(), timeout=600
    )
    elapsed = time.monotonic() - started
    assert put.status_code == 201, put.text
    assert put.json()["size"] == cap
    print(f"\n{cap} bytes uploaded in {elapsed:.1f} s")
    check = stack.execute(
        files,
        "import hashlib; hashlib.sha256(open('/mnt/data/cap.bin', 'rb').read()).hexdigest()",
        timeout_s=120,
    )
    assert check["result"]["text/plain"] == repr(hashlib.sha256(blob).hexdigest())
    del blob

    over = requests.put(
        files_url(stack, files, "over.bin"),
        data=b"\0" * (cap + 1),
        headers=stack.headers(),
        timeout=300,
    )
    assert_error(over, 413, "PayloadTooLarge", str(cap))
    # A multipart part one byte over: refused before any byte reaches the session.
    over = requests.post(
        files_url(stack, files),
        files={"file": ("over.bin", b"\0" * (cap + 1))},
        headers=stack.headers(),
        timeout=300,
    )
    assert_error(over, 413, "PayloadTooLarge", str(cap))

    # Without a Content-Length the cap is found while streaming, once the guest has had `cap`
    # bytes: the upload must be dropped there and the session stay usable.
    def chunked(total: int):
        piece = b"\1" * (1 << 20)
        sent = 0
        while sent < total:
            yield piece[: total - sent]
            sent += len(piece[: total - sent])

    started = time.monotonic()
    over = requests.put(
        files_url(stack, files, "over.bin"),
        data=chunked(cap + 1),
        headers=stack.headers(),
        timeout=300,
    )
    assert_error(over, 413, "PayloadTooLarge", str(cap))
    print(f"streamed upload refused after {time.monotonic() - started:.1f} s")
    listed = requests.get(files_url(stack, files), headers=stack.headers(), timeout=30)
    assert listed.status_code == 200, listed.text
    names = {f["name"] for f in listed.json()["files"]}
    assert "cap.bin" in names and "over.bin" not in names
    assert not [n for n in names if n.startswith(".shoal-upload")], names
    assert stack.execute(files, "'still usable'")["status"] == "succeeded"
    deleted = requests.delete(
        files_url(stack, files, "cap.bin"), headers=stack.headers(), timeout=30
    )
    assert deleted.status_code == 204


# --- errors ----------------------------------------------------------------------------------
def test_error_shapes(stack: Stack, py: str) -> None:
    h = stack.headers()
    assert_error(requests.get(f"{stack.url}/v1/sessions", timeout=10), 401, "Unauthorized")
    assert_error(
        requests.get(f"{stack.url}/v1/sessions", headers=stack.headers("shoal_bad"), timeout=10),
        401,
        "Unauthorized",
    )
    assert_error(
        requests.get(f"{stack.url}/v1/sessions/ses_nope", headers=h, timeout=10),
        404,
        "SessionNotFound",
    )
    assert_error(
        requests.get(f"{stack.url}/v1/executions/exe_nope", headers=h, timeout=10),
        404,
        "ExecutionNotFound",
    )
    assert_error(requests.get(f"{stack.url}/v1/nowhere", headers=h, timeout=10), 404, "NotFound")
    assert_error(
        requests.patch(f"{stack.url}/v1/sessions", headers=h, timeout=10), 405, "MethodNotAllowed"
    )
    assert_error(
        requests.post(f"{stack.url}/v1/sessions", json={"pool": "gpu"}, headers=h, timeout=10),
        404,
        "PoolNotFound",
        "gpu",
    )
    assert_error(submit(stack, py, "1", timeout_s=10_000), 400, "ValidationFailed", "timeout_s")
    assert_error(submit(stack, py, "1", max_output=-1), 400, "ValidationFailed", "max_output")
    assert_error(submit(stack, py, "1", language="cobol"), 400, "ValidationFailed", "language")
    assert_error(submit(stack, py, "x" * (1024 * 1024 + 1)), 400, "ValidationFailed", "code")


MALFORMED_JSON = [
    b"",
    b"{",
    b"null",
    b"[]",
    b'"code"',
    b"1e999",
    b"\xff\xfe\x00",
    b'{"code": "1", "timeout_s": 1e999}',
    b'{"code": "1", "timeout_s": NaN}',
    b'{"code": "1", "timeout_s": "ten"}',
    b'{"code": "1", "timeout_s": true}',
    b'{"code": "1", "max_output": 1e999}',
    b'{"code": "1", "wait": "maybe"}',
    b'{"code": "\\ud800"}',
    b'{"code": ["1"]}',
    b'{"code": {"a": 1}}',
    b'{"code": null}',
    b'{"code": "1", "language": null}',
    b'{"code": "1", "extra": 1}',
    b'{"pool": ""}',
    b'{"pool": null}',
    b'{"pool": ["default"]}',
    b'{"pool": "' + b"p" * 100 + b'"}',
    b'{"pool": "../../etc"}',
]


def within_rate(method: str, url: str, **kwargs) -> requests.Response:
    """A request sent again after its Retry-After while the tenant is over its request rate:
    the test below sends ~200 requests as fast as it can, past the default burst of 100."""
    while True:
        response = requests.request(method, url, **kwargs)
        if response.status_code != 429:
            return response
        time.sleep(float(response.headers.get("Retry-After", "1")))


def test_no_client_input_gives_a_500(stack: Stack, py: str, files: str) -> None:
    h = stack.headers()
    routes = [
        ("POST", "/v1/sessions"),
        ("POST", f"/v1/sessions/{py}/executions"),
        ("POST", "/v1/executions/exe_nope/cancel"),
        ("POST", f"/v1/sessions/{files}/files"),
    ]
    content_types = ["application/json", "text/plain", "multipart/form-data", None]
    for method, path in routes:
        for body in MALFORMED_JSON:
            # A POST /v1/sessions whose body is not JSON is a plain `{}`: it would make sessions.
            kinds = content_types[:1] if path == "/v1/sessions" else content_types
            for content_type in kinds:
                headers = {**h, **({"Content-Type": content_type} if content_type else {})}
                response = within_rate(
                    method, stack.url + path, data=body, headers=headers, timeout=60
                )
                assert response.status_code < 500, (path, body, content_type, response.text)
                if response.status_code >= 400:
                    error = response.json()["error"]
                    assert error["code"] == response.headers["x-ms-error-code"]
    queries = ["recursive=maybe", "path=%00", "path=" + "a/" * 300, "recursive=1&recursive=0"]
    for query in queries:
        response = within_rate(
            "GET", f"{stack.url}/v1/sessions/{files}/files?{query}", headers=h, timeout=30
        )
        assert response.status_code < 500, (query, response.text)
    for path in ["%00", "a%00b", "x" * 300, "a/" * 200 + "b"]:
        response = within_rate(
            "GET", f"{stack.url}/v1/sessions/{files}/files/{path}", headers=h, timeout=30
        )
        assert 400 <= response.status_code < 500, (path, response.text)
    weird_ids = ["ses_", "ses_%00", "x" * 500, "%ff"]
    for session_id in weird_ids:
        url = f"{stack.url}/v1/sessions/{session_id}"
        response = within_rate("GET", url, headers=h, timeout=10)
        assert response.status_code == 404, (session_id, response.text)
