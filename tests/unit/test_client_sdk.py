"""The client SDK's logic without a server (clients/python; its tests against a live Shoal are
tests/integration/test_sdk.py): the retry rule, errors from answers, parsing, configuration,
and that the package imports nothing of the server."""

from __future__ import annotations

import ast
import base64
import io
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from shoal_client import Client, _core, errors
from shoal_client._files import IncompleteDownload
from shoal_client.models import Execution
from shoal_client.run_cli import safe_target

CLIENT_DIR = Path(__file__).resolve().parents[2] / "clients" / "python" / "shoal_client"
SERVER_PACKAGES = {"shoal", "api", "workers", "pool", "tests"}


def test_the_client_imports_nothing_of_the_server() -> None:
    for source in CLIENT_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in SERVER_PACKAGES, (source.name, name)


def test_refusals_are_retried_with_retry_after_and_other_errors_are_not() -> None:
    assert _core.retry_delay(0, 4, 429, "3") == 3.0
    assert 0.1 <= _core.retry_delay(0, 4, 503, None) <= 0.25
    assert _core.retry_delay(0, 4, None, None) is not None  # a failure on the wire
    assert _core.retry_delay(4, 4, 503, "1") is None  # retries spent
    for status in (400, 404, 409, 500, 504):
        assert _core.retry_delay(0, 4, status, "1") is None


def test_only_submits_with_a_key_and_reads_may_be_replayed() -> None:
    first = _core.submit("ses_1", "x", "python", 60, True, None, None)
    assert first.replayable and first.headers["Idempotency-Key"].startswith("shoal-client-")
    again = _core.submit("ses_1", "x", "python", 60, True, None, None)
    assert again.headers["Idempotency-Key"] != first.headers["Idempotency-Key"]
    assert _core.submit("s", "x", "python", 60, True, None, "mine").headers == {
        "Idempotency-Key": "mine"
    }
    assert not _core.create_session("default").replayable
    assert _core.get_session("ses_1").replayable
    fork = _core.fork_session("ses_1", 3)  # sent twice, it would make six
    assert not fork.replayable and fork.json == {"count": 3}


def test_a_batch_names_its_pool_only_when_asked() -> None:
    plain = _core.submit_batch([{"code": "1"}], None, 8, None)
    assert "pool" not in plain.json and "from_session" not in plain.json
    forked = _core.submit_batch([{"code": "1"}], None, 8, None, from_session="ses_1")
    assert forked.json["from_session"] == "ses_1" and "pool" not in forked.json
    assert _core.submit_batch([], "gpu", 2, None).json["pool"] == "gpu"


def test_paths_and_ids_are_quoted() -> None:
    assert _core.get_session("a/b").path == "/v1/sessions/a%2Fb"
    assert _core.file_call("GET", "s", "/dir/a b.txt").path == "/v1/sessions/s/files/dir/a%20b.txt"


def test_error_answers_become_typed_exceptions() -> None:
    body = {"error": {"code": "SessionNotFound", "message": "no session 'x'"}}
    found = errors.from_response(404, body, None)
    assert isinstance(found, errors.NotFound) and found.code == "SessionNotFound"
    limited = errors.from_response(429, {"error": {"code": "RateLimited", "message": "m"}}, "2")
    assert isinstance(limited, errors.RateLimited) and limited.retry_after_s == 2.0
    odd = errors.from_response(502, "<html>bad gateway</html>", None)
    assert type(odd) is errors.ShoalError and odd.code == "UnexpectedResponse"


def test_an_execution_parses_its_result_and_images(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\nrest"
    execution = Execution.parse({
        "id": "exe_1", "session_id": "ses_1", "status": "succeeded", "stdout": "hi\n",
        "result": {"text/plain": "42"}, "exit_code": None, "newer_field": 1,
        "outputs": [{"type": "display", "data": {"image/png": base64.b64encode(png).decode()}}],
    })  # fmt: skip
    assert execution.text == "42" and execution.done and execution.raw["newer_field"] == 1
    (written,) = execution.save_images(tmp_path)
    assert written.read_bytes() == png
    assert execution.raise_for_status() is execution


def test_configuration_from_arguments_then_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("SHOAL_API_KEY", raising=False)
    with pytest.raises(errors.ShoalError, match="SHOAL_API_KEY"):
        _core.Config.resolve(None, None, 10, 1, None)
    monkeypatch.setenv("SHOAL_URL", "https://shoal.example:8443/")
    monkeypatch.setenv("SHOAL_API_KEY", "k")
    config = _core.Config.resolve(None, None, 10, 1, None)
    assert config.url == "https://shoal.example:8443" and config.verify is True
    assert _core.Config.resolve("http://h:1", "k2", 10, 1, "/ca.pem").verify == "/ca.pem"


def test_a_webhook_is_verified_with_the_tenants_secret() -> None:
    from shoal_client import webhooks
    from standardwebhooks import Webhook

    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    body = '{"id": "exe_1", "status": "succeeded"}'
    stamp = datetime.now(UTC)
    headers = {
        "Webhook-Id": "msg_1",
        "Webhook-Timestamp": str(int(stamp.timestamp())),
        "Webhook-Signature": Webhook(secret).sign("msg_1", stamp, body),
    }
    assert webhooks.verify(secret, body.encode(), headers)["status"] == "succeeded"
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    with pytest.raises(webhooks.InvalidWebhook):
        webhooks.verify(other, body, headers)
    with pytest.raises(webhooks.InvalidWebhook):
        webhooks.verify(secret, body.replace("succeeded", "failed"), headers)


def _scripted(statuses: list[int], seen: list[bytes]) -> httpx.MockTransport:
    """A server answering each request with the next status (an upload's entry on 201), after
    reading the whole body."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.read())
        status = statuses.pop(0)
        if status == 201:
            return httpx.Response(201, json={"path": "f", "name": "f", "type": "file",
                                             "size": len(seen[-1]), "modified_at": ""})  # fmt: skip
        refusal = {"error": {"code": "StoreUnavailable", "message": "m"}}
        return httpx.Response(status, headers={"Retry-After": "0"}, json=refusal)

    return httpx.MockTransport(handle)


def test_a_retried_upload_from_a_file_object_sends_the_whole_body_again() -> None:
    seen: list[bytes] = []
    source = io.BytesIO(b"head:" + b"x" * 3_000_000)
    source.read(5)  # the upload starts where the file object stands
    with Client("http://shoal", "k", transport=_scripted([503, 201], seen)) as client:
        assert client.upload("s", "f", source).size == 3_000_000
    assert seen == [b"x" * 3_000_000] * 2


def test_a_body_that_cannot_be_sent_again_is_not_retried() -> None:
    class OneWay(io.RawIOBase):
        def __init__(self) -> None:
            self.left = [b"once"]

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            return self.left.pop() if self.left else b""

    seen: list[bytes] = []
    transport = _scripted([503, 201], seen)
    with (
        Client("http://shoal", "k", transport=transport) as client,
        pytest.raises(errors.Unavailable),
    ):
        client.upload("s", "f", OneWay())
    assert seen == [b"once"]


def test_a_short_download_leaves_no_file(tmp_path: Path) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": "10"}, content=b"abc")

    dest = tmp_path / "out.bin"
    transport = httpx.MockTransport(handle)
    with (
        Client("http://shoal", "k", transport=transport) as client,
        pytest.raises(IncompleteDownload),
    ):
        client.download_to("s", "f", dest)
    assert list(tmp_path.iterdir()) == []


def test_collected_paths_stay_under_the_output_directory(tmp_path: Path) -> None:
    assert safe_target(tmp_path, "out/x.txt") == tmp_path / "out" / "x.txt"
    for listed in ("../x", "/etc/passwd", "a/../../x", "a\\..\\x", ".", ""):
        with pytest.raises(errors.ShoalError, match="not collected"):
            safe_target(tmp_path, listed)


def test_data_paths_and_retry_after_are_bounded() -> None:
    assert _core.file_call("GET", "s", "/mnt/data/a.txt").path == "/v1/sessions/s/files/a.txt"
    assert _core.retry_delay(0, 4, 503, "86400") == _core.RETRY_AFTER_MAX_S
    waited = _core.submit("s", "x", "python", 200, True, None, None)
    assert waited.timeout_s == 200 + _core.WAIT_MARGIN_S
