"""Fair share in the asynchronous pipelines, with two tenants on the shared stack: a tenant's
batches stuck at its session cap do not delay another tenant's batch, and a receiver that
trickles its answer does not delay other tenants' webhooks (docs/limits.md)."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from shoal import keys, leases, redis_conn
from shoal.settings import load
from tests.integration.conftest import Stack
from tests.integration.test_batches import finished, get_batch, post_batch
from tests.integration.test_host_failure import wait_until
from tests.integration.test_webhooks import Receiver, receiver  # noqa: F401  (fixture)


def test_a_capped_tenants_batches_do_not_delay_another_tenants_batch(stack: Stack) -> None:
    r = redis_conn.client(load(stack.env))
    tenant_a = "fair-batches-a"
    key_a, key_b = stack.new_key(tenant_a), stack.new_key("fair-batches-b")
    stack.shoal("keys", "max-sessions", "--tenant", tenant_a, "1")
    held = stack.new_session(key_a)  # a's only session, held: a's batch items wait for it
    a_batches = [post_batch(stack, key_a, items=[{"code": "1"}])["id"] for _ in range(4)]
    try:
        # Four batches, as many as there are coordinators: two run (their items waiting for a
        # session), two wait in Redis without holding a coordinator.
        turns, line = keys.batch_coordinators(tenant_a), keys.batches_waiting(tenant_a)
        wait_until(lambda: leases.holders(r, turns) == 2 and r.zcard(line) == 2, 30, 0.1)

        started = time.monotonic()
        b = post_batch(stack, key_b, items=[{"code": "6 * 7"}])
        batch = finished(stack, key_b, b["id"], 60)
        assert batch["counts"] == {"succeeded": 1}, batch
        assert batch["items"][0]["execution"]["result"] == {"text/plain": "42"}
        assert time.monotonic() - started < 60
        for batch_id in a_batches:  # a's are still where they were: nothing ran
            a = get_batch(stack, key_a, batch_id)
            assert a["status"] == "running" and a["counts"] == {"pending": 1}, a
    finally:
        for batch_id in a_batches:
            requests.post(
                f"{stack.url}/v1/batches/{batch_id}/cancel",
                headers=stack.headers(key_a),
                timeout=30,
            )
        requests.delete(f"{stack.url}/v1/sessions/{held}", headers=stack.headers(key_a), timeout=30)
    # Cancelled, running or waiting, they all end at once.
    for batch_id in a_batches:
        assert finished(stack, key_a, batch_id, 30)["counts"] == {"cancelled": 1}


class Trickler:
    """An HTTP receiver on 127.0.0.1 that reads the request and then answers one byte a second,
    forever: a per-read timeout never ends such an attempt, only a deadline does."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.accepted = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/slow"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        with conn:
            try:
                conn.recv(1 << 20)  # the request (its length does not matter here)
                for i in range(10**6):
                    readable, _, _ = select.select([conn], [], [], 1.0)
                    if self.stop.is_set() or (readable and not conn.recv(4096)):
                        return  # stopped, or Shoal hung up
                    conn.sendall(answer[i : i + 1] if i < len(answer) else b" ")
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.server.close()


@pytest.fixture
def trickler() -> Iterator[Trickler]:
    server = Trickler()
    yield server
    server.close()


def submit(stack: Stack, key: str, session_id: str, callback_url: str, wait: bool) -> dict:
    response = requests.post(
        f"{stack.url}/v1/sessions/{session_id}/executions",
        json={"code": "6 * 7", "wait": wait, "callback_url": callback_url},
        headers=stack.headers(key),
        timeout=60,
    )
    assert response.status_code in (200, 202), response.text
    return response.json()


def test_a_trickling_webhook_receiver_does_not_delay_other_deliveries(
    stack: Stack,
    trickler: Trickler,
    receiver: Receiver,  # noqa: F811
) -> None:
    settings = load(stack.env)
    key_a, key_b = stack.new_key("fair-hooks-a"), stack.new_key("fair-hooks-b")
    session_a, session_b = stack.new_session(key_a), stack.new_session(key_b)
    try:
        # More callbacks to the trickling receiver than the webhooks worker has threads (one
        # execution after another, each a callback when it ends).
        slow = [
            submit(stack, key_a, session_a, trickler.url, wait=True)["id"]
            for _ in range(settings.webhook_concurrency + 2)
        ]
        wait_until(lambda: trickler.accepted >= 2, 30, 0.1)

        done = submit(stack, key_b, session_b, receiver.url, wait=True)
        assert done["status"] == "succeeded"
        answered = time.time()
        [got] = receiver.wait_for(1, 10)
        assert got["at"] - answered < 5, "b's callback waited behind a's slow receiver"

        # a's attempts end at the deadline (SHOAL_WEBHOOK_TIMEOUT_S), not when the receiver does.
        def first_attempt() -> dict | None:
            view = requests.get(
                f"{stack.url}/v1/executions/{slow[0]}", headers=stack.headers(key_a), timeout=10
            ).json()
            return view["webhook"]["attempts"][0] if view["webhook"]["attempts"] else None

        attempt = wait_until(first_attempt, 30, 0.2)
        assert attempt["status_code"] is None and "SHOAL_WEBHOOK_TIMEOUT_S" in attempt["error"]
        assert attempt["duration_ms"] < (settings.webhook_timeout_s + 1) * 1000
    finally:
        for key, session_id in ((key_a, session_a), (key_b, session_b)):
            requests.delete(
                f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(key), timeout=30
            )
