"""Signed webhook callbacks against a real HTTP receiver on loopback (127.0.0.1 is allowed by
SHOAL_WEBHOOK_ALLOW_HOSTS in the test instance; retries are seconds apart there)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from standardwebhooks import Webhook

from tests.integration.conftest import Stack
from tests.integration.test_host_failure import wait_until


@dataclass
class Receiver:
    """Answers each POST with the next planned action (an HTTP status, or "drop" to hang up
    without answering; 200 once the plan runs out) and keeps what it got."""

    url: str
    plan: list = field(default_factory=list)
    got: list = field(default_factory=list)

    def wait_for(self, count: int, timeout_s: float = 60) -> list:
        wait_until(lambda: len(self.got) >= count, timeout_s, 0.05)
        return self.got


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            box.got.append({"headers": dict(self.headers), "body": body, "at": time.time()})
            action = box.plan.pop(0) if box.plan else 200
            if action == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(action)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    box.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/shoal?source=test"
    yield box
    server.shutdown()
    server.server_close()


@dataclass
class Tenant:
    key: str
    secret: str
    session_id: str


@pytest.fixture(scope="module")
def tenant(stack: Stack) -> Tenant:
    key = stack.new_key("hooks")
    secret = stack.shoal("keys", "webhook-secret", "--tenant", "hooks").stdout.strip()
    session_id = stack.new_session(key)
    yield Tenant(key, secret, session_id)
    requests.delete(f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(key), timeout=30)


def submit(stack: Stack, tenant: Tenant, callback_url: str, code: str = "6 * 7") -> dict:
    response = requests.post(
        f"{stack.url}/v1/sessions/{tenant.session_id}/executions",
        json={"code": code, "wait": False, "callback_url": callback_url},
        headers=stack.headers(tenant.key),
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return response.json()


def execution(stack: Stack, tenant: Tenant, execution_id: str) -> dict:
    response = requests.get(
        f"{stack.url}/v1/executions/{execution_id}", headers=stack.headers(tenant.key), timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


def webhook_settled(stack: Stack, tenant: Tenant, execution_id: str) -> dict:
    return wait_until(
        lambda: (
            (view := execution(stack, tenant, execution_id))["webhook"]["status"] != "pending"
            and view
        ),
        60,
        0.1,
    )


def test_the_finished_execution_is_posted_signed(
    stack: Stack, tenant: Tenant, receiver: Receiver
) -> None:
    queued = submit(stack, tenant, receiver.url)
    assert queued["callback_url"] == receiver.url and queued["webhook"]["status"] == "pending"
    [got] = receiver.wait_for(1)
    payload = Webhook(tenant.secret).verify(got["body"], got["headers"])
    assert payload["id"] == queued["id"] and payload["status"] == "succeeded"
    assert payload["result"] == {"text/plain": "42"}
    assert got["headers"]["Content-Type"] == "application/json"
    view = webhook_settled(stack, tenant, queued["id"])
    # The body is the execution as polling shows it, less the delivery log.
    assert payload == {k: v for k, v in view.items() if k != "webhook"}
    assert view["webhook"]["status"] == "delivered"
    assert view["webhook"]["id"] == got["headers"]["webhook-id"]
    [attempt] = view["webhook"]["attempts"]
    assert attempt["status_code"] == 200 and attempt["error"] is None and attempt["at"]


def test_retries_after_500s_and_a_dropped_connection_with_the_same_id(
    stack: Stack, tenant: Tenant, receiver: Receiver
) -> None:
    receiver.plan = [500, "drop", 503, 429]
    queued = submit(stack, tenant, receiver.url)
    got = receiver.wait_for(5)
    assert len({g["headers"]["webhook-id"] for g in got}) == 1
    assert len({g["body"] for g in got}) == 1
    for g in got:  # every attempt is signed afresh with its own timestamp
        Webhook(tenant.secret).verify(g["body"], g["headers"])
    gaps = [b["at"] - a["at"] for a, b in zip(got, got[1:], strict=False)]
    assert all(gap >= 0.2 for gap in gaps), gaps  # backoff: 0.5 s first, with jitter
    view = webhook_settled(stack, tenant, queued["id"])
    attempts = view["webhook"]["attempts"]
    assert [a["status_code"] for a in attempts] == [500, None, 503, 429, 200]
    assert "RemoteDisconnected" in attempts[1]["error"] or "Connection" in attempts[1]["error"]
    assert view["webhook"]["status"] == "delivered"


def test_a_4xx_answer_is_not_retried(stack: Stack, tenant: Tenant, receiver: Receiver) -> None:
    receiver.plan = [400]
    queued = submit(stack, tenant, receiver.url)
    receiver.wait_for(1)
    view = webhook_settled(stack, tenant, queued["id"])
    time.sleep(2.5)  # longer than the first two retry delays would be
    assert len(receiver.got) == 1
    assert view["webhook"]["status"] == "failed"
    assert [(a["status_code"], a["error"]) for a in view["webhook"]["attempts"]] == [
        (400, "HTTP 400")
    ]


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/hook",
        "http://192.168.1.1:8080/hook",
        "http://127.0.0.2:9/hook",  # loopback, but not the allowed 127.0.0.1
        "http://localhost:9/hook",  # a name that resolves to the allowed address
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/hook",
        "file:///etc/passwd",
    ],
)
def test_forbidden_callback_urls_are_refused_at_submission(
    stack: Stack, tenant: Tenant, url: str
) -> None:
    for path, body in (
        (f"/v1/sessions/{tenant.session_id}/executions", {"code": "1", "wait": False}),
        ("/v1/batches", {"items": [{"code": "1"}]}),
    ):
        response = requests.post(
            stack.url + path,
            json={**body, "callback_url": url},
            headers=stack.headers(tenant.key),
            timeout=30,
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "ValidationFailed" and "callback_url" in error["message"]


def test_a_redirect_is_not_followed(stack: Stack, tenant: Tenant, receiver: Receiver) -> None:
    receiver.plan = [302]
    queued = submit(stack, tenant, receiver.url)
    view = webhook_settled(stack, tenant, queued["id"])
    assert view["webhook"]["status"] == "failed" and len(receiver.got) == 1
    assert "redirect" in view["webhook"]["attempts"][0]["error"]
    assert json.loads(receiver.got[0]["body"])["id"] == queued["id"]
