"""File transfers on fakeredis (shoal/transfers.py, shoal/use_cases/files.py): a failure on
either side reaches the other at once, never after CHUNK_TIMEOUT_S.

The host is played from a thread (AnsweringCelery) through the same reply lists and transfers
as workers/host.py; tests/unit/test_file_refusals.py runs the real host runtime and agent.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from api.app import create_app
from shoal import keys, queue, replies, sessions, tenants, transfers
from shoal.errors import HostTimeout, NoSpace, SessionLost
from shoal.settings import Settings
from shoal.use_cases import files as file_cases
from tests.unit.fakes import (
    HOST,
    AnsweringCelery,
    SentTask,
    live_session,
    publish_heartbeat,
    unit_context,
)

# Every failure below must be seen well inside this; the old behaviour waited CHUNK_TIMEOUT_S.
AT_ONCE_S = 1.0


@pytest.fixture()
def c():
    c = unit_context(celery=AnsweringCelery())
    publish_heartbeat(c.redis)
    yield c
    c.celery.join()


def chunks_then_failure(n: int, exc: BaseException, size: int = 1000):
    for i in range(n):
        yield bytes([i]) * size
    raise exc


# --- the transfer itself ---------------------------------------------------------------------
def test_a_producer_that_fails_midway_ends_the_consumer_at_once(c) -> None:
    tid = transfers.new_id()
    got: list[bytes] = []
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        transfers.produce(c.redis_bin, tid, chunks_then_failure(3, ConnectionError("guest")))
    with pytest.raises(transfers.TransferAborted, match=r"the sender failed \(ConnectionError\)"):
        got.extend(transfers.consume(c.redis_bin, tid))
    assert time.monotonic() - started < AT_ONCE_S
    assert len(got) == 3  # what came before the failure, then the failure
    assert not c.redis_bin.exists(keys.transfer(tid))


def test_a_consumer_that_stops_early_stops_the_producer_at_once(c) -> None:
    tid = transfers.new_id()
    pulled: list[int] = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            i += 1
            yield b"x" * 1000

    result: dict = {}
    producer = threading.Thread(
        target=lambda: result.update(total=transfers.produce(c.redis_bin, tid, endless()))
    )
    producer.start()
    stream = transfers.consume(c.redis_bin, tid)
    assert next(stream) == b"x" * 1000
    started = time.monotonic()
    stream.close()  # the client went away
    producer.join(AT_ONCE_S * 5)
    assert not producer.is_alive(), "the producer kept going after the consumer left"
    assert time.monotonic() - started < AT_ONCE_S
    assert result["total"] < 1000 * (len(pulled) + 1)
    assert c.redis_bin.exists(keys.transfer_cancel(tid))
    assert not c.redis_bin.exists(keys.transfer(tid))  # nothing left behind for nobody


def test_a_consumer_that_gives_up_while_the_producer_waits_for_room(c) -> None:
    tid = transfers.new_id()
    done = threading.Event()
    total: list[int] = []

    def run() -> None:
        total.append(transfers.produce(c.redis_bin, tid, iter([b"y" * 10] * 100)))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    deadline = time.monotonic() + AT_ONCE_S
    while c.redis_bin.llen(keys.transfer(tid)) < transfers.MAX_IN_FLIGHT:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    transfers.cancel(c.redis_bin, tid)
    assert done.wait(AT_ONCE_S)
    assert total == [10 * transfers.MAX_IN_FLIGHT]


def test_the_consumer_gives_up_when_its_check_says_the_host_is_gone(c, monkeypatch) -> None:
    monkeypatch.setattr(transfers, "CHECK_EVERY_S", 0.05)
    tid = transfers.new_id()

    def check() -> None:
        raise SessionLost("the host stopped answering")

    started = time.monotonic()
    with pytest.raises(SessionLost):
        list(transfers.consume(c.redis_bin, tid, check))
    assert time.monotonic() - started < AT_ONCE_S
    assert c.redis_bin.exists(keys.transfer_cancel(tid))  # a late producer stops at once


def test_a_silent_producer_still_times_out(c, monkeypatch) -> None:
    monkeypatch.setattr(transfers, "CHUNK_TIMEOUT_S", 0.1)
    with pytest.raises(HostTimeout, match="stalled"):
        list(transfers.consume(c.redis_bin, transfers.new_id()))


# --- downloads through the use case -----------------------------------------------------------
def host_sends(c, body, info: dict | None = None, fail: BaseException | None = None):
    """The host's side of GET_FILE: the stat first, then the bytes (and maybe a failure)."""

    def answer(task: SentTask) -> None:
        stat = info or {"path": task.kwargs["path"], "name": "f", "type": "file", "size": 0}
        replies.send(c.redis, task.kwargs["reply_key"], {"ok": True, "file": stat})
        if fail is None:
            transfers.produce(c.redis_bin, task.kwargs["transfer_id"], iter(body))
            return
        with pytest.raises(type(fail)):  # the host logs it; the consumer has the ABORT
            transfers.produce(
                c.redis_bin, task.kwargs["transfer_id"], chunks_then_failure(len(body), fail)
            )

    return answer


def test_a_download_that_fails_after_the_stat_ends_at_once_and_is_logged(c, caplog) -> None:
    info = {"path": "big.bin", "name": "big.bin", "type": "file", "size": 10 * 1000}
    c.celery.answer(
        queue.GET_FILE.name, host_sends(c, [b"a" * 1000] * 2, info, ConnectionResetError())
    )
    entry = live_session(c)
    got_info, stream = file_cases.download_file(c, entry, "big.bin")
    assert got_info == info
    received = 0
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, "shoal.files"),
        pytest.raises(transfers.TransferAborted, match="ConnectionResetError"),
    ):
        for chunk in stream:
            received += len(chunk)
    assert time.monotonic() - started < AT_ONCE_S
    assert received == 2000  # short of the announced 10,000: the client sees a cut body
    assert "ended after 2000 of 10000 bytes" in caplog.text and entry["id"] in caplog.text


def test_a_download_that_shrank_ends_short_and_one_that_grew_is_cut_at_its_size(c) -> None:
    shrunk = {"path": "s", "name": "s", "type": "file", "size": 5000}
    c.celery.answer(queue.GET_FILE.name, host_sends(c, [b"s" * 1000] * 3, shrunk))
    _, stream = file_cases.download_file(c, live_session(c), "s")
    with pytest.raises(transfers.TransferAborted, match="shrank"):
        b"".join(stream)

    grown = {"path": "g", "name": "g", "type": "file", "size": 2500}
    c.celery.answer(queue.GET_FILE.name, host_sends(c, [b"g" * 1000] * 4, grown))
    _, stream = file_cases.download_file(c, live_session(c), "g")
    assert b"".join(stream) == b"g" * 2500


def test_a_download_whose_client_leaves_stops_the_host(c) -> None:
    info = {"path": "big", "name": "big", "type": "file", "size": 10**9}
    finished: list[float] = []

    def host(task: SentTask) -> None:
        replies.send(c.redis, task.kwargs["reply_key"], {"ok": True, "file": info})
        transfers.produce(c.redis_bin, task.kwargs["transfer_id"], iter([b"z" * 1000] * 10**6))
        finished.append(time.monotonic())

    c.celery.answer(queue.GET_FILE.name, host)
    _, stream = file_cases.download_file(c, live_session(c), "big")
    next(stream)
    left = time.monotonic()
    stream.close()
    c.celery.join()
    assert finished and finished[0] - left < AT_ONCE_S


def test_a_download_from_a_host_that_died_fails_on_its_heartbeat(c, monkeypatch) -> None:
    monkeypatch.setattr(file_cases, "LIVENESS_POLL_S", 0.05)
    monkeypatch.setattr(transfers, "CHECK_EVERY_S", 0.05)
    monkeypatch.setattr(replies, "CHECK_EVERY_S", 0.05)
    info = {"path": "f", "name": "f", "type": "file", "size": 10}
    c.celery.answer(
        queue.GET_FILE.name,
        lambda task: replies.send(c.redis, task.kwargs["reply_key"], {"ok": True, "file": info}),
    )  # then the host dies: no chunk, no ABORT
    entry = live_session(c)
    _, stream = file_cases.download_file(c, entry, "f")
    c.redis.delete(keys.host_heartbeat(HOST))
    started = time.monotonic()
    with pytest.raises(SessionLost, match="stopped answering"):
        list(stream)
    assert time.monotonic() - started < AT_ONCE_S
    assert sessions.load(c.redis, entry["id"])["state"] == sessions.LOST


def test_over_http_a_download_that_fails_midway_is_cut_short(c) -> None:
    # The status line and Content-Length have gone: the body must not end as if complete. The
    # app's iterator raises, and the server then closes the connection short of the length.
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", home="/tmp/shoal-unit"))
    app.extensions["shoal"] = c
    entry = live_session(c)
    key = tenants.create_key(c.redis, entry["tenant"])[1]
    info = {"path": "f", "name": "f", "type": "file", "size": 10_000, "mtime": 0.0}
    c.celery.answer(queue.GET_FILE.name, host_sends(c, [b"a" * 1000] * 2, info, OSError()))
    response = app.test_client().get(
        f"/v1/sessions/{entry['id']}/files/f",
        headers={"Authorization": f"Bearer {key}"},
        buffered=False,
    )
    assert response.status_code == 200 and response.headers["Content-Length"] == "10000"
    received = []
    started = time.monotonic()
    with pytest.raises(transfers.TransferAborted):
        received.extend(response.response)
    assert time.monotonic() - started < AT_ONCE_S
    assert sum(map(len, received)) == 2000


# --- uploads through the use case -------------------------------------------------------------
def test_an_upload_the_host_fails_midway_stops_sending_and_answers_at_once(c) -> None:
    pushed: list[int] = []

    def client_body():
        for i in range(10_000):
            pushed.append(i)
            yield b"u" * 1000

    def host(task: SentTask) -> None:
        # The guest's disk fills after a few chunks: the host cancels, then answers the error
        # (workers/host.py put_file).
        stream = transfers.consume(c.redis_bin, task.kwargs["transfer_id"])
        for _ in range(3):
            next(stream)
        stream.close()
        replies.send_error(c.redis, task.kwargs["reply_key"], NoSpace("the disk is full"))

    c.celery.answer(queue.PUT_FILE.name, host)
    started = time.monotonic()
    with pytest.raises(NoSpace):
        file_cases.upload_file(c, live_session(c), "a.bin", client_body())
    assert time.monotonic() - started < AT_ONCE_S
    assert len(pushed) < 3 + transfers.MAX_IN_FLIGHT + 2  # sending stopped at once


def test_an_upload_to_a_host_that_died_fails_on_its_heartbeat(c, monkeypatch) -> None:
    monkeypatch.setattr(file_cases, "LIVENESS_POLL_S", 0.05)
    c.redis.delete(keys.host_heartbeat(HOST))  # the host took the task, then died
    started = time.monotonic()
    with pytest.raises(SessionLost, match="stopped answering"):
        file_cases.upload_file(c, live_session(c), "a.bin", iter([b"u" * 1000] * 100))
    assert time.monotonic() - started < AT_ONCE_S
