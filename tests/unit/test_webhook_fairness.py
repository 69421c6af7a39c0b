"""Webhook attempts end at their deadline, and one tenant's slow receivers never take every
delivery thread: real HTTP receivers on 127.0.0.1 (one that trickles a byte a second), Redis
on fakeredis, the Celery app recording what is sent."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import fakeredis
import pytest

from shoal import keys, leases, queue, webhooks
from shoal.settings import Settings
from tests.unit.fakes import RecordingCelery

DEADLINE_S = 1.5


class Receiver:
    """A TCP server on 127.0.0.1 answering each connection with `answer(conn, stop)` in its
    own thread; counts the connections it accepted."""

    def __init__(self, answer: Callable[[socket.socket, threading.Event], None]) -> None:
        self.answer = answer
        self.stop = threading.Event()
        self.accepted = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook?x=1"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, suppress(OSError):
            self.answer(conn, self.stop)

    def close(self) -> None:
        self.stop.set()
        self.server.close()


@contextmanager
def receiver(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[Receiver]:
    server = Receiver(answer)
    try:
        yield server
    finally:
        server.close()


def read_request(conn: socket.socket) -> bytes:
    """The request's head and body (by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"Content-")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return head


def trickle(data: bytes) -> Callable[[socket.socket, threading.Event], None]:
    """Read the request, then send `data` one byte a second (forever if `data` runs out)."""

    def answer(conn: socket.socket, stop: threading.Event) -> None:
        read_request(conn)
        i = 0
        while not stop.wait(1.0 if i else 0):
            conn.sendall(data[i : i + 1] if i < len(data) else b"x")
            i += 1

    return answer


def answers(status: int) -> Callable[[socket.socket, threading.Event], None]:
    def answer(conn: socket.socket, stop: threading.Event) -> None:
        read_request(conn)
        conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())

    return answer


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        home=str(tmp_path),
        webhook_allow_hosts="127.0.0.1",
        webhook_timeout_s=DEADLINE_S,
        webhook_tenant_in_flight=1,
    )


def timed_post(settings: Settings, url: str, body: bytes = b"{}") -> tuple[tuple, float]:
    started = time.monotonic()
    outcome = webhooks.post_once(settings, url, {"Content-Type": "application/json"}, body)
    return outcome, time.monotonic() - started


# --- one attempt, one deadline ---------------------------------------------------------------
def test_a_receiver_trickling_its_status_line_is_cut_off_at_the_deadline(settings) -> None:
    # A byte a second never trips a per-read timeout of 1.5 s: only a deadline ends this.
    with receiver(trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as slow:
        (status, error, retry), took = timed_post(settings, slow.url)
    assert status is None and retry is True
    assert "TimeoutError" in error and "SHOAL_WEBHOOK_TIMEOUT_S" in error
    assert DEADLINE_S - 0.05 <= took < DEADLINE_S + 0.5


def test_a_receiver_trickling_its_headers_is_cut_off_at_the_deadline(settings) -> None:
    def answer(conn: socket.socket, stop: threading.Event) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        while not stop.wait(1.0):
            conn.sendall(b"X")

    with receiver(answer) as slow:
        (status, error, _), took = timed_post(settings, slow.url)
    assert status is None and "TimeoutError" in error
    assert took < DEADLINE_S + 0.5


def test_a_status_in_time_counts_and_a_trickled_body_is_left_at_the_deadline(settings) -> None:
    head = b"HTTP/1.1 204 No Content\r\n\r\n"
    with receiver(answers(200)) as fast:
        (status, error, _), took = timed_post(settings, fast.url)
    assert (status, error) == (200, None) and took < 1.0

    def answer(conn: socket.socket, stop: threading.Event) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        while not stop.wait(1.0):
            conn.sendall(b"x")

    with receiver(answer) as slow_body:
        (status, error, _), took = timed_post(settings, slow_body.url)
    assert (status, error) == (200, None)
    assert took < DEADLINE_S + 0.5
    with receiver(lambda conn, stop: (read_request(conn), conn.sendall(head))) as empty:
        assert timed_post(settings, empty.url)[0] == (204, None, False)


def test_a_trickled_tls_handshake_is_cut_off_at_the_deadline(settings) -> None:
    def answer(conn: socket.socket, stop: threading.Event) -> None:
        conn.recv(65536)  # the client's hello
        while not stop.wait(1.0 / 3):
            conn.sendall(b"\x16")  # the start of a handshake record, never finished

    with receiver(answer) as slow:
        url = slow.url.replace("http://", "https://")
        (status, error, retry), took = timed_post(settings, url)
    assert status is None and retry and "SHOAL_WEBHOOK_TIMEOUT_S" in error
    assert DEADLINE_S - 0.05 <= took < DEADLINE_S + 0.5


def test_a_receiver_that_does_not_read_the_request_is_cut_off_at_the_deadline(settings) -> None:
    # A body far larger than the socket buffers: the send blocks once they are full.
    with receiver(lambda conn, stop: stop.wait(30)) as deaf:
        (status, error, retry), took = timed_post(settings, deaf.url, b"x" * (64 << 20))
    assert status is None and retry and "TimeoutError" in error
    assert took < DEADLINE_S + 1.0


def test_an_endless_header_is_refused_after_a_bounded_read(settings) -> None:
    def answer(conn: socket.socket, stop: threading.Event) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Flood: ")
        while not stop.is_set():
            conn.sendall(b"a" * 4096)

    with receiver(answer) as flood:
        (status, error, retry), took = timed_post(settings, flood.url)
    assert status is None and retry and "over 16384 bytes" in error
    assert took < 1.0


def test_garbage_and_a_hang_up_are_failed_attempts(settings) -> None:
    with receiver(lambda conn, stop: (read_request(conn), conn.sendall(b"SSH-2.0\r\n\r\n"))) as bad:
        status, error, retry = timed_post(settings, bad.url)[0]
    assert status is None and retry and "BadStatusLine" in error
    with receiver(lambda conn, stop: read_request(conn)) as rude:
        status, error, retry = timed_post(settings, rude.url)[0]
    assert status is None and retry and "RemoteDisconnected" in error


def test_the_request_carries_the_host_target_and_body() -> None:
    got: list[bytes] = []

    def answer(conn: socket.socket, stop: threading.Event) -> None:
        data = b""
        while not data.endswith(b'{"a":1}'):
            data += conn.recv(65536)
        got.append(data)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")

    s = Settings(webhook_allow_hosts="127.0.0.1")
    with receiver(answer) as server:
        port = server.url.split(":")[2].split("/")[0]
        url = f"http://127.0.0.1:{port}/h\u00e9/x?q=1&r=%20"
        assert webhooks.post_once(s, url, {"webhook-id": "msg_1"}, b'{"a":1}') == (200, None, False)
    head = got[0].split(b"\r\n")
    assert head[0] == b"POST /h%C3%A9/x?q=1&r=%20 HTTP/1.1"
    assert f"Host: 127.0.0.1:{port}".encode() in head
    assert b"Content-Length: 7" in head and b"webhook-id: msg_1" in head
    assert b"Connection: close" in head


def test_control_characters_in_a_callback_url_are_refused(settings) -> None:
    for url in ("http://127.0.0.1/a\x00b", "http://127.0.0.1/a\x7fb", "http://127.0.0.1/\r\nX: y"):
        with pytest.raises(webhooks.Refused):
            webhooks.check_url(settings, url)


def test_a_slow_dns_answer_counts_against_the_deadline(settings, monkeypatch) -> None:
    def slow_getaddrinfo(host, port, *args, **kwargs):
        time.sleep(5)
        return [(2, 1, 6, "", ("93.184.216.34", port))]

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", slow_getaddrinfo)
    (status, error, retry), took = timed_post(settings, "https://slow-dns.example/hook")
    assert status is None and retry is True and "does not resolve within" in error
    assert took < DEADLINE_S + 0.5


# --- spread across tenants -------------------------------------------------------------------
def test_the_in_flight_cap_stays_below_the_delivery_threads() -> None:
    assert webhooks.in_flight_cap(Settings()) == 2
    assert webhooks.in_flight_cap(Settings(webhook_tenant_in_flight=20)) == 7
    assert webhooks.in_flight_cap(Settings(webhook_concurrency=1)) == 1


def test_a_tenant_over_its_in_flight_cap_is_deferred_while_another_tenant_is_delivered(
    settings,
) -> None:
    r = fakeredis.FakeRedis(decode_responses=True)
    celery = RecordingCelery()
    with receiver(trickle(b"HTTP/1.1 200 OK\r\n\r\n")) as slow, receiver(answers(200)) as fast:
        for owner, tenant, url in (
            ("exe_a1", "a", slow.url),
            ("exe_a2", "a", fast.url),
            ("exe_b1", "b", fast.url),
        ):
            webhooks.schedule(r, celery, owner, tenant, url, {"id": owner}, 600)
        assert len(celery.take(queue.DELIVER_WEBHOOK.name)) == 3

        # a's first delivery goes to the trickling receiver and holds a's only place.
        first = threading.Thread(target=webhooks.deliver, args=(settings, r, celery, "exe_a1"))
        first.start()
        deadline = time.monotonic() + 5
        while leases.holders(r, keys.webhooks_in_flight("a")) < 1:
            assert time.monotonic() < deadline, "a's first attempt never started"
            time.sleep(0.01)

        # a's second delivery is put off at once, without an attempt...
        started = time.monotonic()
        webhooks.deliver(settings, r, celery, "exe_a2")
        assert time.monotonic() - started < 0.5
        [again] = celery.take(queue.DELIVER_WEBHOOK.name)
        assert again.kwargs == {"owner_id": "exe_a2"} and 0.4 <= again.countdown <= 30
        assert webhooks.delivery_view(r, "exe_a2")["attempts"] == []
        assert r.zscore(keys.webhooks_deferred("a"), "exe_a2") is not None

        # ... while b's goes through.
        started = time.monotonic()
        webhooks.deliver(settings, r, celery, "exe_b1")
        assert time.monotonic() - started < 1.0
        b_view = webhooks.delivery_view(r, "exe_b1")
        assert b_view["status"] == webhooks.DELIVERED and fast.accepted == 1

        # a's slow attempt ends at its deadline and gives its place back.
        first.join(DEADLINE_S + 2)
        assert not first.is_alive()
        [attempt] = webhooks.delivery_view(r, "exe_a1")["attempts"]
        assert attempt["status_code"] is None and "SHOAL_WEBHOOK_TIMEOUT_S" in attempt["error"]
        assert attempt["duration_ms"] < (DEADLINE_S + 0.5) * 1000
        assert leases.holders(r, keys.webhooks_in_flight("a")) == 0

        # The deferred delivery, tried again, now goes through.
        webhooks.deliver(settings, r, celery, "exe_a2")
        assert webhooks.delivery_view(r, "exe_a2")["status"] == webhooks.DELIVERED
        assert r.zscore(keys.webhooks_deferred("a"), "exe_a2") is None


def test_deferrals_back_off_with_the_tenants_backlog() -> None:
    r = fakeredis.FakeRedis(decode_responses=True)
    quiet = [webhooks.defer_delay(r, "a", 2) for _ in range(50)]
    assert all(0.5 * webhooks.DEFER_S <= d <= webhooks.DEFER_S for d in quiet)
    r.zadd(keys.webhooks_deferred("a"), {f"exe_{i}": time.time() for i in range(1000)})
    busy = [webhooks.defer_delay(r, "a", 2) for _ in range(50)]
    assert all(webhooks.DEFER_MAX_S / 2 <= d <= webhooks.DEFER_MAX_S for d in busy)


def test_a_lease_left_by_a_dead_worker_runs_out() -> None:
    r = fakeredis.FakeRedis(decode_responses=True)
    assert leases.take(r, "k", "one", 2, 0.3) and leases.take(r, "k", "two", 2, 30)
    assert not leases.take(r, "k", "three", 2, 30)
    assert leases.take(r, "k", "one", 2, 0.3)  # a holder taking again keeps its place
    time.sleep(0.4)
    assert leases.holders(r, "k") == 1 and not leases.holds(r, "k", "one")
    assert leases.take(r, "k", "three", 2, 30)
    leases.release(r, "k", "two")
    leases.renew(r, "k", "three", 60)
    assert leases.holders(r, "k") == 1 and leases.holds(r, "k", "three")
