"""The host runtime's execution path on fakeredis with scripted VMs: whatever goes wrong, the
record ends in a final status that says what happened, the session's turn passes on, and the
session still expires."""

from __future__ import annotations

import errno
import json
import threading
import time

import pytest
import redis

from pool.expiry import expire_idle
from shoal import executions, keys, queue, sessions
from shoal.pools import get_pool
from shoal.use_cases import executions as execution_cases
from tests.unit.fakes import FakeVMManager, live_session, ok_answer, unit_context
from workers import host_executions
from workers.agent_client import AgentProtocolError, AgentTimeout
from workers.host import HostRuntime
from workers.vm_errors import VMError, VMLost


@pytest.fixture()
def c():
    return unit_context()


@pytest.fixture()
def vms():
    return FakeVMManager()


@pytest.fixture()
def runtime(c, vms):
    return HostRuntime(c.settings, r=c.redis, rb=c.redis_bin, vms=vms)


@pytest.fixture()
def entry(c, vms, runtime):
    """An active session whose VM is a scripted FakeVM."""
    entry = live_session(c)
    vm = vms.create("vm_1", None)
    runtime.session_vm[entry["id"]] = vm.vm_id
    c.redis.hset(keys.session(entry["id"]), "vm", vm.vm_id)
    return entry


def submit_and_run(c, runtime, entry, code: str = "1 + 1") -> dict:
    """Submit through the use case, run the task the host would receive, return the record."""
    params = {"code": code, "language": "python", "timeout_s": 5, "max_output": 1000}
    record = execution_cases.submit_execution(c, entry, params)
    (task,) = c.celery.take(queue.EXECUTE.name)
    assert task.queue == keys.host_queue(entry["host"])
    runtime.execute(**task.kwargs)
    return executions.load(c.redis, record["id"])


def test_an_execution_succeeds_and_passes_the_turn(c, runtime, vms, entry) -> None:
    record = submit_and_run(c, runtime, entry)
    assert record["status"] == executions.SUCCEEDED
    assert record["result"] == {"text/plain": "2"}
    assert set(record["timings"]) == {"received_at", "answered_at", "guest"}
    assert "received_at" not in record and "guest_phases" not in record
    assert c.redis.hget(keys.session(entry["id"]), "done_seq") == str(record["seq"])
    assert executions.wait_done(c.redis, record["id"], 0.01)["status"] == executions.SUCCEEDED
    assert not c.redis.zcard(keys.session_executions(entry["id"]))


def test_an_unexpected_error_fails_the_execution_and_the_session_carries_on(
    c, runtime, vms, entry
) -> None:
    vms.get("vm_1").answers = [RuntimeError("libvirt: internal error: something odd")]
    record = submit_and_run(c, runtime, entry)
    assert record["status"] == executions.FAILED
    assert record["error"]["name"] == "InternalError"
    assert "(RuntimeError)" in record["error"]["value"] and record["id"] in record["error"]["value"]
    assert "something odd" not in record["error"]["value"]  # details stay in the host's log
    assert record["finished_at"] is not None
    assert vms.destroyed == {}  # the host's fault, not the guest's: the VM is kept

    following = submit_and_run(c, runtime, entry, "2 + 2")
    assert following["status"] == executions.SUCCEEDED
    assert vms.get("vm_1").ran == ["1 + 1", "2 + 2"]

    expired = expire_idle(c, now=10**10)
    assert expired == [entry["id"]]
    assert sessions.load(c.redis, entry["id"])["state"] == sessions.EXPIRED
    assert c.celery.take(queue.DESTROY_SESSION.name)[0].kwargs == {"session_id": entry["id"]}


def test_a_redis_error_before_the_run_still_ends_the_record(
    c, runtime, vms, entry, monkeypatch
) -> None:
    def broken(*_args, **_kwargs):
        raise ConnectionError("Redis went away for a moment")

    monkeypatch.setattr(executions, "mark_running", broken)
    record = submit_and_run(c, runtime, entry)
    assert record["status"] == executions.FAILED
    assert record["error"]["name"] == "InternalError"
    assert vms.get("vm_1").ran == []
    monkeypatch.undo()
    assert submit_and_run(c, runtime, entry)["status"] == executions.SUCCEEDED


@pytest.mark.parametrize(
    "failure",
    [AgentProtocolError("frame body is nested too deeply"), VMLost("the agent channel closed")],
    ids=["protocol", "vm-lost"],
)
def test_a_guest_that_breaks_the_protocol_loses_the_session_once(
    c, runtime, vms, entry, failure
) -> None:
    vms.get("vm_1").answers = [failure]
    record = submit_and_run(c, runtime, entry)
    assert record["status"] == executions.LOST
    assert "The session was lost" in record["stderr"]
    assert sessions.load(c.redis, entry["id"])["state"] == sessions.LOST
    assert vms.destroyed == {"vm_1": 1}
    assert not c.redis.zcard(keys.session_executions(entry["id"]))


def test_a_cancel_before_the_turn_means_it_never_runs(c, runtime, vms, entry) -> None:
    params = {"code": "1", "language": "python", "timeout_s": 5, "max_output": 100}
    record = execution_cases.submit_execution(c, entry, params)
    execution_cases.cancel_execution(c, record)
    (cancel,) = c.celery.take(queue.CANCEL.name)
    runtime.cancel(**cancel.kwargs)
    (task,) = c.celery.take(queue.EXECUTE.name)
    runtime.execute(**task.kwargs)
    assert executions.load(c.redis, record["id"])["status"] == executions.CANCELLED
    assert vms.get("vm_1").ran == []


@pytest.mark.parametrize("carried", ["not json", '{"id": "exe_someone_else"}', "[]"])
def test_an_unreadable_task_ends_its_execution(c, runtime, vms, entry, carried) -> None:
    params = {"code": "1", "language": "python", "timeout_s": 5, "max_output": 100}
    record = execution_cases.submit_execution(c, entry, params)
    (task,) = c.celery.take(queue.EXECUTE.name)
    runtime.execute(execution_id=record["id"], pool_name="default", record_json=carried)
    final = executions.load(c.redis, record["id"])
    assert final["status"] == executions.FAILED and final["error"]["name"] == "InternalError"
    assert vms.get("vm_1").ran == []
    assert not c.redis.zcard(keys.session_executions(entry["id"]))  # expiry can reclaim it


def test_a_libvirt_error_fails_the_execution_and_keeps_the_session(c, runtime, vms, entry) -> None:
    runtime.session_vm.clear()  # the VM must be found again through libvirt, which fails
    vms.vms.pop("vm_1")

    def attach(vm_id, spec):
        raise VMError("libvirt: cannot reach libvirtd")

    vms.attach = attach
    record = submit_and_run(c, runtime, entry)
    assert record["status"] == executions.FAILED and record["error"]["name"] == "InternalError"
    assert sessions.load(c.redis, entry["id"])["state"] == sessions.ACTIVE
    assert vms.destroyed == {}


def creating_session(c):
    """A session as the API leaves it before its host answers: `creating`."""
    return sessions.create(c.redis, "t1", get_pool(c.settings, "default"), "h1")


def test_session_creation_answers_its_creator(c, runtime, vms) -> None:
    entry = creating_session(c)
    runtime.create_session(entry["id"], "default", "reply:1")
    assert json.loads(c.redis.lpop("reply:1"))["ok"] is True
    stored = sessions.load(c.redis, entry["id"])
    assert stored["state"] == sessions.ACTIVE and stored["vm"] in vms.vms

    vms.create_error = RuntimeError("no room on the disk")
    other = creating_session(c)
    runtime.create_session(other["id"], "default", "reply:2")
    answer = json.loads(c.redis.lpop("reply:2"))
    assert answer["ok"] is False and "no room on the disk" in answer["error"]["message"]
    assert sessions.load(c.redis, other["id"])["state"] == sessions.LOST


def test_a_full_host_disk_is_said_plainly(c, runtime, vms, entry) -> None:
    """Creating a VM on a full disk answers HostStorageFull; a VM that went silent because it
    paused on a full disk is lost for that reason, not for a protocol error."""
    vms.create_error = OSError(errno.ENOSPC, "No space left on device")
    other = creating_session(c)
    runtime.create_session(other["id"], "default", "reply:1")
    error = json.loads(c.redis.lpop("reply:1"))["error"]
    assert error["code"] == "HostStorageFull" and "disk space" in error["message"]

    vms.paused_full.add("vm_1")
    vms.get("vm_1").answers = [AgentTimeout("no answer within 7 s")]
    record = submit_and_run(c, runtime, entry)
    assert record["status"] == executions.LOST
    assert "the host's disk is full" in record["stderr"]
    assert "disk is full" in sessions.load(c.redis, entry["id"])["reason"]
    assert vms.destroyed["vm_1"] == 1


def test_an_end_is_stored_once_redis_is_back(c, runtime, vms, entry, monkeypatch) -> None:
    """Redis restarting while an execution runs: its end is written when Redis answers again,
    so the record does not stay `running`."""
    monkeypatch.setattr(host_executions, "FINISH_RETRY_PAUSE_S", 0.01)
    real = runtime.r.pipeline
    failures = [redis.ConnectionError("Connection refused")] * 3

    def flaky(*args, **kwargs):
        pipe = real(*args, **kwargs)
        if failures:
            error = failures.pop()

            def broken():
                raise error

            pipe.execute = broken
        return pipe

    monkeypatch.setattr(runtime.r, "pipeline", flaky)
    record = submit_and_run(c, runtime, entry)
    assert record["status"] == executions.SUCCEEDED and failures == []


def test_a_session_deleted_while_its_vm_is_made_does_not_keep_the_vm(c, runtime, vms) -> None:
    entry = creating_session(c)
    sessions.end(c.redis, entry, sessions.DELETED)  # its creator gave up waiting
    runtime.create_session(entry["id"], "default", "reply:1")
    assert json.loads(c.redis.lpop("reply:1"))["ok"] is False
    assert vms.vms == {} and len(vms.destroyed) == 1
    assert sessions.load(c.redis, entry["id"])["state"] == sessions.DELETED


def test_deleting_a_session_ends_the_executions_waiting_for_it(c, runtime, vms, entry) -> None:
    release = threading.Event()
    vms.get("vm_1").answers = [lambda: release.wait() and ok_answer()]
    params = {"code": "import time", "language": "python", "timeout_s": 5, "max_output": 100}
    first = execution_cases.submit_execution(c, entry, params)
    (task,) = c.celery.take(queue.EXECUTE.name)
    runner = threading.Thread(target=runtime.execute, kwargs=task.kwargs)
    runner.start()
    waiting = []
    for _ in range(3):  # behind the first: queued on the host, holding no thread
        record = execution_cases.submit_execution(c, entry, params)
        (task,) = c.celery.take(queue.EXECUTE.name)
        runtime.execute(**task.kwargs)
        waiting.append(record["id"])
    assert runtime.queues.waiting(entry["id"]) == 3

    runtime.destroy_session(entry["id"])
    for execution_id in waiting:
        final = executions.load(c.redis, execution_id)
        assert final["status"] == executions.CANCELLED
        assert "ended before" in final["stderr"]
    release.set()
    runner.join(timeout=5)
    assert executions.load(c.redis, first["id"])["status"] in executions.FINAL


def test_a_restarted_worker_resumes_what_waited_and_never_runs_anything_twice(
    c, runtime, vms, entry
) -> None:
    params = {"code": "1", "language": "python", "timeout_s": 5, "max_output": 100}
    running = execution_cases.submit_execution(c, entry, params)
    stored = executions.load(c.redis, running["id"])
    stored["status"] = executions.RUNNING  # the old worker died while this one ran
    executions.save(c.redis, stored, 3600)
    waiting = [execution_cases.submit_execution(c, entry, params)["id"] for _ in range(3)]
    tasks = c.celery.take(queue.EXECUTE.name)  # these tasks died with the old worker's memory

    runtime.resume_executions()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        executions.load(c.redis, e)["status"] != executions.SUCCEEDED for e in waiting
    ):
        time.sleep(0.02)
    assert [executions.load(c.redis, e)["status"] for e in waiting] == ["succeeded"] * 3
    lost = executions.load(c.redis, running["id"])
    assert lost["status"] == executions.LOST and "never run twice" in lost["stderr"]
    assert vms.get("vm_1").ran == ["1"] * 3

    for task in tasks:  # the tasks arrive after all: nothing runs a second time
        runtime.execute(**task.kwargs)
    assert vms.get("vm_1").ran == ["1"] * 3
    assert not c.redis.zcard(keys.session_executions(entry["id"]))
