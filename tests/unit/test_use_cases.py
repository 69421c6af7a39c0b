"""The use cases (shoal/use_cases/) on fakeredis: what each one writes to the registry, which
tasks it sends to which queue, and how it waits for the host's answer.

No host runs here: a recording Celery app keeps the tasks sent, and where a use case waits for an
answer, a thread plays the host as soon as the task is sent (AnsweringCelery), answering through
the same reply lists and transfers (shoal/replies.py, shoal/transfers.py) as workers/host.py.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from shoal import batches, executions, keys, queue, replies, sessions, tenants, transfers
from shoal.errors import (
    FileNotFoundInSession,
    HostTimeout,
    NotAFile,
    PoolExhausted,
    PoolNotFound,
    SessionBusy,
    SessionExpired,
    SessionLost,
    SessionNotFound,
    ShoalError,
    TenantSessionLimit,
    ValidationFailed,
)
from shoal.use_cases import batches as batch_cases
from shoal.use_cases import executions as execution_cases
from shoal.use_cases import files as file_cases
from shoal.use_cases import pools as pool_cases
from shoal.use_cases import sessions as session_cases
from tests.unit.fakes import (
    HOST,
    AnsweringCelery,
    RecordingCelery,
    SentTask,
    live_session,
    publish_heartbeat,
    unit_context,
    unit_settings,
)

POOLS_TOML = """
[pools.small]
max_sessions = 1

[pools.data]
image = "python"
cooldown_s = 60
"""

PARAMS = {"code": "1 + 1", "language": "python", "timeout_s": 5, "max_output": 1000}


@pytest.fixture()
def c(tmp_path):
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(POOLS_TOML)
    c = unit_context(unit_settings(pools_file=str(pools_file)), celery=AnsweringCelery())
    publish_heartbeat(c.redis)
    yield c
    c.celery.join()


def host_creates(c):
    """The host's side of CREATE_SESSION when the VM comes up (workers/host.py create_session)."""

    def answer(task: SentTask) -> None:
        session_id = task.kwargs["session_id"]
        c.redis.hset(
            keys.session(session_id), mapping={"vm": "vm_" + session_id, "state": sessions.ACTIVE}
        )
        replies.send(c.redis, task.kwargs["reply_key"], {"ok": True})

    return answer


def fill(c, tenant: str, pool: str, n: int) -> None:
    for _ in range(n):
        live_session(c, tenant, pool)


# --- sessions --------------------------------------------------------------------------------
def test_create_session_refuses_at_the_tenant_cap_before_sending_anything() -> None:
    c = unit_context(unit_settings(tenant_max_sessions=2))
    publish_heartbeat(c.redis)
    fill(c, "t1", "default", 2)
    with pytest.raises(TenantSessionLimit, match="SHOAL_TENANT_MAX_SESSIONS"):
        session_cases.create_session(c, "t1", "default")
    # A tenant's own cap overrides the instance's.
    tenants.set_max_sessions(c.redis, "t2", 1)
    fill(c, "t2", "default", 1)
    with pytest.raises(TenantSessionLimit):
        session_cases.create_session(c, "t2", "default")
    assert c.celery.sent == []
    assert sessions.count_for_tenant(c.redis, "t1") == 2
    assert sessions.count_for_tenant(c.redis, "t2") == 1
    assert sessions.count_for_pool(c.redis, "default") == 3


def test_create_session_refuses_at_the_pool_cap_before_sending_anything(c) -> None:
    fill(c, "t1", "small", 1)  # max_sessions = 1, counted across tenants
    with pytest.raises(PoolExhausted, match="max_sessions"):
        session_cases.create_session(c, "t2", "small")
    assert c.celery.sent == []
    assert sessions.count_for_pool(c.redis, "small") == 1
    assert sessions.count_for_tenant(c.redis, "t2") == 0


def test_create_session_asks_the_chosen_host_and_returns_the_session_active(c) -> None:
    publish_heartbeat(c.redis, "h2", ready={"data": 1})  # placement prefers a ready VM
    c.celery.answer(queue.CREATE_SESSION.name, host_creates(c))

    entry = session_cases.create_session(c, "t1", "data")

    assert entry["host"] == "h2" and entry["pool"] == "data" and entry["tenant"] == "t1"
    assert entry["state"] == sessions.ACTIVE
    (task,) = c.celery.take(queue.CREATE_SESSION.name)
    assert task.queue == keys.host_queue("h2")
    assert task.kwargs["session_id"] == entry["id"]
    assert task.kwargs["pool_name"] == "data"  # the pool travels by name, not as an object
    assert task.kwargs["reply_key"].startswith(f"{keys.PREFIX}:reply:")
    assert task.expires == queue.create_wait_s(c.settings)  # dropped once its creator gave up
    assert sessions.load(c.redis, entry["id"])["state"] == sessions.ACTIVE
    assert sessions.host_session_ids(c.redis, "h2") == {entry["id"]}
    assert sessions.count_for_tenant(c.redis, "t1") == 1
    assert c.celery.sent == []


def test_a_failed_creation_ends_the_session_deleted_and_raises(c) -> None:
    def host_fails(task: SentTask) -> None:
        # What the host does when the VM cannot be made: mark it lost, then say why.
        sessions.set_state(c.redis, task.kwargs["session_id"], sessions.LOST, "no room")
        error = ShoalError("creating the session's VM failed: no room on the disk")
        replies.send_error(c.redis, task.kwargs["reply_key"], error)

    c.celery.answer(queue.CREATE_SESSION.name, host_fails)
    with pytest.raises(ShoalError, match="no room on the disk"):
        session_cases.create_session(c, "t1", "default")

    (task,) = c.celery.take(queue.CREATE_SESSION.name)
    session_id = task.kwargs["session_id"]
    assert sessions.load(c.redis, session_id)["state"] == sessions.DELETED
    assert sessions.count_for_tenant(c.redis, "t1") == 0
    assert sessions.count_for_pool(c.redis, "default") == 0
    assert sessions.host_session_ids(c.redis, HOST) == set()
    with pytest.raises(SessionNotFound):
        sessions.get_for_tenant(c.redis, "t1", session_id)


def test_a_host_that_never_answers_times_out_and_the_session_ends(monkeypatch) -> None:
    monkeypatch.setattr(queue, "CREATE_MARGIN_S", 0)
    c = unit_context(unit_settings(agent_ready_timeout_s=0.2))
    publish_heartbeat(c.redis)
    started = time.monotonic()
    with pytest.raises(HostTimeout):
        session_cases.create_session(c, "t1", "default")
    assert time.monotonic() - started < 2
    (task,) = c.celery.take(queue.CREATE_SESSION.name)
    assert task.expires == pytest.approx(0.2)
    assert sessions.load(c.redis, task.kwargs["session_id"])["state"] == sessions.DELETED
    assert sessions.count_for_tenant(c.redis, "t1") == 0


def test_delete_session_tombstones_it_and_asks_its_host_to_destroy_the_vm(c) -> None:
    entry = live_session(c)
    session_cases.delete_session(c, entry)

    assert sessions.load(c.redis, entry["id"])["state"] == sessions.DELETED
    assert 0 < c.redis.ttl(keys.session(entry["id"])) <= sessions.TOMBSTONE_TTL_S
    with pytest.raises(SessionNotFound, match="was deleted"):
        sessions.get_for_tenant(c.redis, "t1", entry["id"])
    assert sessions.count_for_tenant(c.redis, "t1") == 0
    assert sessions.count_for_pool(c.redis, "default") == 0
    assert sessions.host_session_ids(c.redis, HOST) == set()
    assert c.redis.zscore(keys.session_deadlines(), entry["id"]) is None
    (task,) = c.celery.take(queue.DESTROY_SESSION.name)
    assert task.queue == keys.host_queue(HOST)
    assert task.kwargs == {"session_id": entry["id"]}


def test_expire_session_leaves_an_expired_tombstone_and_destroys_the_vm(c) -> None:
    entry = live_session(c)
    session_cases.expire_session(c, entry)

    assert sessions.load(c.redis, entry["id"])["state"] == sessions.EXPIRED
    with pytest.raises(SessionExpired):
        sessions.get_for_tenant(c.redis, "t1", entry["id"])
    assert sessions.count_for_tenant(c.redis, "t1") == 0
    assert sessions.due_for_expiry(c.redis, now=10**10) == []
    (task,) = c.celery.take(queue.DESTROY_SESSION.name)
    assert task.queue == keys.host_queue(HOST)
    assert task.kwargs == {"session_id": entry["id"]}


def test_an_identifier_gets_a_session_on_first_use_and_the_same_one_after(c) -> None:
    c.celery.answer(queue.CREATE_SESSION.name, host_creates(c))
    first = session_cases.session_for_identifier(c, "t1", "default", "notebook-1")
    assert first["identifier"] == "notebook-1" and first["state"] == sessions.ACTIVE
    assert len(c.celery.take(queue.CREATE_SESSION.name)) == 1

    again = session_cases.session_for_identifier(c, "t1", "default", "notebook-1")
    assert again["id"] == first["id"]
    assert c.celery.sent == []

    # The identifier is per tenant (and per pool): another tenant's is another session.
    other = session_cases.session_for_identifier(c, "t2", "default", "notebook-1")
    assert other["id"] != first["id"]
    assert len(c.celery.take(queue.CREATE_SESSION.name)) == 1


def test_an_identifier_gets_a_new_session_once_its_session_ended(c) -> None:
    c.celery.answer(queue.CREATE_SESSION.name, host_creates(c))
    first = session_cases.session_for_identifier(c, "t1", "default", "nb")
    session_cases.delete_session(c, first)
    c.celery.take(queue.DESTROY_SESSION.name)

    second = session_cases.session_for_identifier(c, "t1", "default", "nb")
    assert second["id"] != first["id"] and second["state"] == sessions.ACTIVE

    # A lost session is replaced too, and the lost one is deleted (its VM destroyed).
    sessions.set_state(c.redis, second["id"], sessions.LOST, "its VM died")
    third = session_cases.session_for_identifier(c, "t1", "default", "nb")
    assert third["id"] not in (first["id"], second["id"])
    assert sessions.load(c.redis, second["id"])["state"] == sessions.DELETED
    assert [t.kwargs for t in c.celery.take(queue.DESTROY_SESSION.name)] == [
        {"session_id": second["id"]}
    ]
    assert len(c.celery.take(queue.CREATE_SESSION.name)) == 3
    assert sessions.count_for_tenant(c.redis, "t1") == 1


def test_an_unknown_identifier_is_not_found_when_not_creating(c) -> None:
    with pytest.raises(SessionNotFound):
        session_cases.session_for_identifier(c, "t1", "default", "nb", create=False)
    assert c.celery.sent == []


def test_concurrent_first_uses_of_an_identifier_make_one_session(c) -> None:
    def slow_host(task: SentTask) -> None:
        time.sleep(0.2)  # the second caller arrives while the first waits for its VM
        host_creates(c)(task)

    c.celery.answer(queue.CREATE_SESSION.name, slow_host)
    found: list[str] = []

    def use() -> None:
        found.append(session_cases.session_for_identifier(c, "t1", "default", "nb")["id"])

    callers = [threading.Thread(target=use) for _ in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(5)
    assert len(found) == 3 and len(set(found)) == 1
    assert len(c.celery.take(queue.CREATE_SESSION.name)) == 1
    assert sessions.count_for_tenant(c.redis, "t1") == 1


# --- executions ------------------------------------------------------------------------------
def test_submit_execution_numbers_stores_and_queues_each_execution(c) -> None:
    entry = live_session(c)
    other = live_session(c)
    before = time.time()

    first = execution_cases.submit_execution(c, entry, PARAMS)
    second = execution_cases.submit_execution(c, entry, PARAMS | {"callback_url": "https://x"})
    elsewhere = execution_cases.submit_execution(c, other, PARAMS)

    assert (first["seq"], second["seq"], elsewhere["seq"]) == (1, 2, 1)
    assert first["status"] == executions.QUEUED and first["host"] == HOST
    assert first["session_id"] == entry["id"] and first["tenant"] == "t1"
    assert first["code"] == "1 + 1" and first["timeout_s"] == 5 and first["max_output"] == 1000
    assert second["callback_url"] == "https://x" and first["callback_url"] is None
    assert executions.load(c.redis, first["id"]) == first
    assert executions.load(c.redis, second["id"]) == second
    pending = c.redis.zrange(keys.session_executions(entry["id"]), 0, -1, withscores=True)
    assert pending == [(first["id"], 1.0), (second["id"], 2.0)]
    # Each submission counts as a use of the session: its idle deadline moves on.
    deadline = c.redis.zscore(keys.session_deadlines(), entry["id"])
    assert deadline >= before + int(entry["cooldown_s"])

    sent = c.celery.take(queue.EXECUTE.name)
    assert [t.kwargs["execution_id"] for t in sent] == [first["id"], second["id"], elsewhere["id"]]
    task = sent[0]
    assert task.queue == keys.host_queue(HOST)
    assert task.kwargs["pool_name"] == "default"
    assert json.loads(task.kwargs["record_json"]) == first


def test_submit_execution_refuses_a_lost_session(c) -> None:
    entry = live_session(c)
    sessions.set_state(c.redis, entry["id"], sessions.LOST, "its VM died")
    entry = sessions.load(c.redis, entry["id"])
    with pytest.raises(SessionLost, match="its VM died"):
        execution_cases.submit_execution(c, entry, PARAMS)
    assert c.celery.sent == []
    assert c.redis.get(keys.session_seq(entry["id"])) is None
    assert not c.redis.zcard(keys.session_executions(entry["id"]))


def test_an_idempotency_key_returns_the_same_execution_and_sends_one_task(c) -> None:
    entry = live_session(c)
    first = execution_cases.submit_execution(c, entry, PARAMS, idempotency_key="k1")
    again = execution_cases.submit_execution(c, entry, PARAMS, idempotency_key="k1")
    assert again == first
    assert len(c.celery.take(queue.EXECUTE.name)) == 1
    assert c.redis.get(keys.session_seq(entry["id"])) == "1"

    # Keys are per tenant: another tenant's same key is its own execution.
    theirs = execution_cases.submit_execution(
        c, live_session(c, tenant="t2"), PARAMS, idempotency_key="k1"
    )
    assert theirs["id"] != first["id"]
    assert len(c.celery.take(queue.EXECUTE.name)) == 1


def test_an_idempotency_key_waits_for_the_record_of_the_request_that_claimed_it(c) -> None:
    entry = live_session(c)
    claimed = executions.new_record(entry, "1", "python", 5, 100, 1)
    c.redis.set(keys.idempotency("t1", "k1"), claimed["id"])  # the first request is mid-way

    def first_request_finishes() -> None:
        time.sleep(0.05)
        executions.save(c.redis, claimed, c.settings.execution_ttl_s)

    writer = threading.Thread(target=first_request_finishes)
    writer.start()
    record = execution_cases.submit_execution(c, entry, PARAMS, idempotency_key="k1")
    writer.join()
    assert record == claimed
    assert c.celery.sent == []


def test_an_idempotency_key_whose_record_never_comes_times_out(c, monkeypatch) -> None:
    monkeypatch.setattr(execution_cases, "IDEMPOTENCY_RACE_S", 0.05)
    entry = live_session(c)
    c.redis.set(keys.idempotency("t1", "k1"), "exe_crashed")
    with pytest.raises(HostTimeout, match="Idempotency-Key"):
        execution_cases.submit_execution(c, entry, PARAMS, idempotency_key="k1")
    assert c.celery.sent == []


def finish_as_host(c, record: dict, status: str = executions.SUCCEEDED) -> None:
    final = executions.load(c.redis, record["id"])
    final["status"] = status
    final["result"] = {"text/plain": "2"}
    executions.finish(c.redis, final, c.settings.execution_ttl_s)


def test_wait_execution_returns_the_final_record_once_it_finished(c) -> None:
    record = execution_cases.submit_execution(c, live_session(c), PARAMS)
    timer = threading.Timer(0.05, finish_as_host, args=(c, record))
    timer.start()
    started = time.monotonic()
    final = execution_cases.wait_execution(c, record, timeout_s=5)
    timer.join()
    assert time.monotonic() - started < 1  # woken by the done list, not by a poll
    assert final["id"] == record["id"]
    assert final["status"] == executions.SUCCEEDED and final["result"] == {"text/plain": "2"}
    assert final["finished_at"] is not None


def test_a_second_waiter_also_gets_the_final_record(c, monkeypatch) -> None:
    monkeypatch.setattr(execution_cases, "LIVENESS_POLL_S", 0.05)
    record = execution_cases.submit_execution(c, live_session(c), PARAMS)
    finish_as_host(c, record, executions.FAILED)
    first = execution_cases.wait_execution(c, record, timeout_s=2)
    second = execution_cases.wait_execution(c, record, timeout_s=2)  # the done list is empty
    assert first["status"] == second["status"] == executions.FAILED


def test_a_wait_outlives_a_redis_restart(c, monkeypatch) -> None:
    """Redis restarting under a waiting request: the wait tries again (the host stores the end
    once Redis is back) instead of failing the request."""
    monkeypatch.setattr(execution_cases, "REDIS_RETRY_S", 0.01)
    record = execution_cases.submit_execution(c, live_session(c), PARAMS)
    real = executions.wait_done
    outage = [redis.ConnectionError("Connection refused")] * 2

    def restarting(*args, **kwargs):
        if outage:
            raise outage.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(executions, "wait_done", restarting)
    finish_as_host(c, record)
    final = execution_cases.wait_execution(c, record, timeout_s=5)
    assert final["status"] == executions.SUCCEEDED and outage == []


def test_wait_execution_times_out_when_nothing_happens(c) -> None:
    record = execution_cases.submit_execution(c, live_session(c), PARAMS)
    started = time.monotonic()
    with pytest.raises(HostTimeout, match=record["id"]):
        execution_cases.wait_execution(c, record, timeout_s=0.1)
    assert time.monotonic() - started < 1
    assert executions.load(c.redis, record["id"])["status"] == executions.QUEUED


def test_wait_execution_notices_a_dead_host_and_the_execution_ends_lost(c, monkeypatch) -> None:
    monkeypatch.setattr(execution_cases, "LIVENESS_POLL_S", 0.05)
    entry = live_session(c)
    record = execution_cases.submit_execution(c, entry, PARAMS)
    c.redis.delete(keys.host_heartbeat(HOST))  # its heartbeat expired: the host went silent

    started = time.monotonic()
    final = execution_cases.wait_execution(c, record, timeout_s=5)
    assert time.monotonic() - started < 1
    assert final["id"] == record["id"] and final["status"] == executions.LOST
    assert f"host {HOST} stopped answering" in final["stderr"]
    assert executions.load(c.redis, record["id"])["status"] == executions.LOST
    assert sessions.load(c.redis, entry["id"])["state"] == sessions.LOST


def test_cancelling_a_finished_execution_sends_nothing(c) -> None:
    record = execution_cases.submit_execution(c, live_session(c), PARAMS)
    c.celery.take(queue.EXECUTE.name)
    finish_as_host(c, record)
    final = executions.load(c.redis, record["id"])
    assert execution_cases.cancel_execution(c, final) == final
    assert c.celery.sent == []
    assert not c.redis.exists(keys.execution_cancel(record["id"]))


def test_cancelling_a_queued_execution_marks_it_and_tells_its_host(c) -> None:
    record = execution_cases.submit_execution(c, live_session(c), PARAMS)
    c.celery.take(queue.EXECUTE.name)
    execution_cases.cancel_execution(c, record)
    assert c.redis.get(keys.execution_cancel(record["id"])) == "1"
    assert 0 < c.redis.ttl(keys.execution_cancel(record["id"])) <= c.settings.execution_ttl_s
    (task,) = c.celery.take(queue.CANCEL.name)
    assert task.queue == keys.host_queue(HOST)
    assert task.kwargs == {"execution_id": record["id"]}


# --- files -----------------------------------------------------------------------------------
def test_file_op_asks_the_sessions_host_and_returns_its_answer(c) -> None:
    entry = live_session(c, pool="data")
    listing = [{"path": "sub/a.txt", "type": "file", "size": 3}]
    c.celery.answer(
        queue.FILE_OP.name,
        lambda task: replies.send(
            c.redis, task.kwargs["reply_key"], {"ok": True, "files": listing}
        ),
    )
    answer = file_cases.file_op(c, entry, "list", path="sub", recursive=True)
    assert answer["files"] == listing
    (task,) = c.celery.take(queue.FILE_OP.name)
    assert task.queue == keys.host_queue(HOST)
    assert task.kwargs["session_id"] == entry["id"]
    assert task.kwargs["op"] == "list"
    assert task.kwargs["args"] == {"path": "sub", "recursive": True}
    assert task.kwargs["pool_name"] == "data"


def test_file_op_raises_the_error_the_host_answered(c) -> None:
    entry = live_session(c)
    c.celery.answer(
        queue.FILE_OP.name,
        lambda task: replies.send_error(
            c.redis, task.kwargs["reply_key"], FileNotFoundInSession("no file 'x'")
        ),
    )
    with pytest.raises(FileNotFoundInSession, match="no file 'x'"):
        file_cases.file_op(c, entry, "stat", path="x")


def test_file_op_times_out_when_the_host_never_answers(c, monkeypatch) -> None:
    monkeypatch.setattr(file_cases, "FILE_OP_TIMEOUT_S", 0.1)
    with pytest.raises(HostTimeout):
        file_cases.file_op(c, live_session(c), "stat", path="x")


def test_file_operations_on_a_lost_session_are_refused_before_sending(c) -> None:
    entry = live_session(c)
    sessions.set_state(c.redis, entry["id"], sessions.LOST, "its VM died")
    entry = sessions.load(c.redis, entry["id"])
    with pytest.raises(SessionLost):
        file_cases.file_op(c, entry, "list")
    with pytest.raises(SessionLost):
        file_cases.upload_file(c, entry, "a.txt", [b"x"])
    with pytest.raises(SessionLost):
        file_cases.download_file(c, entry, "a.txt")
    assert c.celery.sent == []


def test_upload_file_streams_every_chunk_to_the_host(c) -> None:
    entry = live_session(c, pool="data")
    chunks = [bytes([i]) * 1000 for i in range(3 * transfers.MAX_IN_FLIGHT)]
    received: list[bytes] = []

    def host_writes(task: SentTask) -> None:
        received.extend(transfers.consume(c.redis_bin, task.kwargs["transfer_id"]))
        info = {"path": task.kwargs["path"], "size": sum(map(len, received))}
        replies.send(c.redis, task.kwargs["reply_key"], {"ok": True, "file": info})

    c.celery.answer(queue.PUT_FILE.name, host_writes)
    info = file_cases.upload_file(c, entry, "in/data.bin", iter(chunks))
    assert info == {"path": "in/data.bin", "size": len(chunks) * 1000}
    assert b"".join(received) == b"".join(chunks)
    (task,) = c.celery.take(queue.PUT_FILE.name)
    assert task.queue == keys.host_queue(HOST)
    assert task.kwargs["session_id"] == entry["id"] and task.kwargs["pool_name"] == "data"
    assert task.kwargs["path"] == "in/data.bin"


def test_an_upload_the_host_refuses_stops_at_once(c) -> None:
    entry = live_session(c)
    transfer_ids: list[str] = []

    def host_busy(task: SentTask) -> None:
        transfer_ids.append(task.kwargs["transfer_id"])
        replies.send_error(c.redis, task.kwargs["reply_key"], SessionBusy("busy"))

    c.celery.answer(queue.PUT_FILE.name, host_busy)
    chunks = [b"x" * 100] * (4 * transfers.MAX_IN_FLIGHT)
    started = time.monotonic()
    with pytest.raises(SessionBusy):
        file_cases.upload_file(c, entry, "a.txt", chunks)
    assert time.monotonic() - started < 2  # not after CHUNK_TIMEOUT_S
    c.celery.join()
    items = c.redis_bin.lrange(keys.transfer(transfer_ids[0]), 0, -1)
    assert items[-1] == transfers.ABORT and len(items) <= transfers.MAX_IN_FLIGHT + 1


def test_download_file_returns_the_hosts_stat_and_streams_the_bytes(c) -> None:
    entry = live_session(c, pool="data")
    body = [b"a" * 5000, b"b" * 5000, b"c" * 17] * transfers.MAX_IN_FLIGHT
    info = {"path": "out.bin", "type": "file", "size": sum(map(len, body))}

    def host_reads(task: SentTask) -> None:
        replies.send(c.redis, task.kwargs["reply_key"], {"ok": True, "file": info})
        transfers.produce(c.redis_bin, task.kwargs["transfer_id"], iter(body))

    c.celery.answer(queue.GET_FILE.name, host_reads)
    got_info, stream = file_cases.download_file(c, entry, "out.bin")
    assert got_info == info
    assert b"".join(stream) == b"".join(body)
    (task,) = c.celery.take(queue.GET_FILE.name)
    assert task.queue == keys.host_queue(HOST)
    assert task.kwargs["session_id"] == entry["id"] and task.kwargs["pool_name"] == "data"
    assert task.kwargs["path"] == "out.bin"


def test_download_file_raises_the_error_the_host_answered(c) -> None:
    c.celery.answer(
        queue.GET_FILE.name,
        lambda task: replies.send_error(
            c.redis, task.kwargs["reply_key"], NotAFile("'d' is a directory")
        ),
    )
    with pytest.raises(NotAFile, match="is a directory"):
        file_cases.download_file(c, live_session(c), "d")


# --- batches ---------------------------------------------------------------------------------
def test_submit_batch_stores_it_and_queues_its_coordinator(c) -> None:
    meta = batch_cases.submit_batch(
        c, "t1", "data", [{"code": "1"}, {"code": 2}], 4, callback_url="https://cb"
    )
    assert meta["tenant"] == "t1" and meta["pool"] == "data" and meta["total"] == "2"
    assert batches.load(c.redis, meta["id"]) == meta
    items = batches.load_items(c.redis, meta["id"])
    assert [items[0]["status"], items[1]["status"]] == [batches.PENDING, batches.INVALID]
    (task,) = c.celery.take(queue.RUN_BATCH.name)
    assert task.kwargs == {"batch_id": meta["id"]}
    assert task.queue == queue.BATCH_QUEUE and task.expires is None
    assert c.celery.sent == []


def test_submit_batch_refuses_an_unknown_pool_or_no_items_before_sending(c) -> None:
    with pytest.raises(PoolNotFound):
        batch_cases.submit_batch(c, "t1", "nope", [{"code": "1"}], 4)
    with pytest.raises(ValidationFailed):
        batch_cases.submit_batch(c, "t1", "default", [], 4)
    assert c.celery.sent == []
    assert not c.redis.smembers(keys.batches_running())


def test_cancel_batch_cancels_it_and_interrupts_only_its_running_executions(c) -> None:
    meta = batch_cases.submit_batch(c, "t1", "default", [{"code": "1"}] * 3, 4)
    c.celery.take(queue.RUN_BATCH.name)
    entry = live_session(c)
    running = execution_cases.submit_execution(c, entry, PARAMS)
    done = execution_cases.submit_execution(c, entry, PARAMS)
    c.celery.take(queue.EXECUTE.name)
    finish_as_host(c, done)
    batches.save_item(
        c.redis,
        meta["id"],
        {"index": 0, "status": batches.RUNNING, "execution_id": running["id"]},
        3600,
    )
    batches.save_item(
        c.redis,
        meta["id"],
        {"index": 1, "status": batches.RUNNING, "execution_id": done["id"]},
        3600,
    )

    batch_cases.cancel_batch(c, meta)

    assert meta["status"] == batches.CANCELLED
    assert batches.load(c.redis, meta["id"])["status"] == batches.CANCELLED
    assert batches.cancel_requested(c.redis, meta["id"])
    assert [t.kwargs for t in c.celery.take(queue.CANCEL.name)] == [{"execution_id": running["id"]}]
    assert c.redis.exists(keys.execution_cancel(running["id"]))
    assert not c.redis.exists(keys.execution_cancel(done["id"]))
    assert c.celery.sent == []


# --- pools -----------------------------------------------------------------------------------
def test_pool_metadata_reads_what_the_hosts_published_for_its_image(c) -> None:
    info = {"python_version": "3.11.2", "python_packages": {"numpy": "2.0", "attrs": "24.1"}}
    c.redis.set(keys.image_info("python"), json.dumps(info))
    assert pool_cases.pool_metadata(c, "data") == {
        "pool": "data",
        "image": "python",
        "runtimes": [{"name": "python", "version": "3.11.2"}],
        "packages": [{"name": "attrs", "version": "24.1"}, {"name": "numpy", "version": "2.0"}],
    }


def test_pool_metadata_before_any_host_published_and_of_an_unknown_pool(c) -> None:
    meta = pool_cases.pool_metadata(c, "default")
    assert meta["runtimes"] == [{"name": "python", "version": ""}] and meta["packages"] == []
    with pytest.raises(PoolNotFound):
        pool_cases.pool_metadata(c, "nope")


# --- the task table --------------------------------------------------------------------------
def test_a_task_refuses_wrong_keyword_arguments() -> None:
    celery = RecordingCelery()
    with pytest.raises(TypeError, match="shoal.cancel"):
        queue.CANCEL.send(celery, host=HOST, execution_id="exe_1", extra=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        queue.EXECUTE.send(celery, host=HOST, execution_id="exe_1", pool_name="default")
    assert celery.sent == []


def test_a_host_task_needs_a_host_and_a_fixed_queue_task_does_not() -> None:
    celery = RecordingCelery()
    with pytest.raises(TypeError, match="name the host"):
        queue.DESTROY_SESSION.send(celery, session_id="ses_1")
    assert celery.sent == []

    queue.DESTROY_SESSION.send(celery, host="h9", session_id="ses_1")
    queue.DELIVER_WEBHOOK.send(celery, owner_id="exe_1")
    destroy, webhook = celery.sent
    assert destroy.queue == keys.host_queue("h9") and destroy.expires == queue.TASK_EXPIRY_S
    assert webhook.queue == queue.WEBHOOK_QUEUE and webhook.expires is None


def test_the_execution_wait_adds_the_interrupt_grace_and_the_margin() -> None:
    settings = unit_settings(interrupt_grace_s=7.0)
    assert queue.execution_wait_s(settings, 10) == 10 + 7.0 + queue.EXECUTION_WAIT_MARGIN_S


def test_a_batch_over_its_item_limit_is_too_large_and_an_empty_one_invalid() -> None:
    from shoal import batches
    from shoal.errors import PayloadTooLarge, ValidationFailed
    from shoal.use_cases.batches import submit_batch

    c = unit_context()
    item = {"code": "1"}
    with pytest.raises(PayloadTooLarge, match="at most 1000 items"):
        submit_batch(c, "t1", "default", [item] * (batches.MAX_ITEMS + 1), 1)
    with pytest.raises(ValidationFailed):
        submit_batch(c, "t1", "default", [], 1)
    assert c.celery.sent == [] and not c.redis.keys("*batch*")
