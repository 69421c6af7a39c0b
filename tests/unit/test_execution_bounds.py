"""Unfinished executions per session and per tenant, and requests waiting for one per tenant,
on fakeredis: each bound is checked and taken in the same step as the record is made, so
concurrent submissions never get past it; every way an execution ends gives its place back; a
refused submission stores, numbers and queues nothing."""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest

from api.app import create_app
from shoal import batches, executions, keys, liveness, queue, sessions, tenants
from shoal.errors import HostTimeout, TooManyPendingExecutions, TooManyWaits
from shoal.pools import get_pool
from shoal.settings import Settings, load
from shoal.use_cases import executions as execution_cases
from tests.unit.fakes import (
    AnsweringCelery,
    FakeVMManager,
    SentTask,
    live_session,
    publish_heartbeat,
    unit_context,
    unit_settings,
)
from workers.agent_client import AgentProtocolError
from workers.batch_runner import BatchRunner
from workers.host import HostRuntime

PARAMS = {"code": "1 + 1", "language": "python", "timeout_s": 5, "max_output": 1000}


def context(**settings):
    c = unit_context(unit_settings(**settings), celery=AnsweringCelery())
    publish_heartbeat(c.redis)
    return c


def finish(c, record_id: str, status: str = executions.SUCCEEDED) -> None:
    """What the host does when an execution ends (every path goes through executions.finish)."""
    record = executions.load(c.redis, record_id)
    record["status"] = status
    executions.finish(c.redis, record, c.settings.execution_ttl_s)


def host_finishes_after(c, delay_s: float):
    def answer(task: SentTask) -> None:
        time.sleep(delay_s)
        finish(c, task.kwargs["execution_id"])

    return answer


def stored_records(c) -> int:
    return sum(1 for k in c.redis.keys(keys.execution("*")) if not k.endswith(":done"))


def tenant_count(c, tenant: str = "t1") -> int:
    return c.redis.zcard(keys.tenant_executions(tenant))


# --- unfinished executions -------------------------------------------------------------------
def test_a_session_past_its_bound_is_refused_and_nothing_is_made() -> None:
    c = context(session_max_pending=3)
    entry = live_session(c)
    admitted = [execution_cases.submit_execution(c, entry, PARAMS) for _ in range(3)]
    with pytest.raises(TooManyPendingExecutions, match="SHOAL_SESSION_MAX_PENDING") as refused:
        execution_cases.submit_execution(c, entry, PARAMS, idempotency_key="k1")
    assert refused.value.status == 429 and refused.value.retry_after_s == 1
    assert len(c.celery.take(queue.EXECUTE.name)) == 3
    assert c.redis.get(keys.session_seq(entry["id"])) == "3"  # no number burned
    assert stored_records(c) == 3
    assert c.redis.get(keys.idempotency("t1", "k1")) is None  # the key was not claimed

    finish(c, admitted[0]["id"])
    again = execution_cases.submit_execution(c, entry, PARAMS, idempotency_key="k1")
    assert again["seq"] == 4
    assert c.redis.get(keys.idempotency("t1", "k1")) == again["id"]


def test_a_tenant_past_its_bound_across_sessions_is_refused() -> None:
    c = context(tenant_max_pending=4)
    first, second = live_session(c), live_session(c)
    for entry in (first, second, first, second):
        execution_cases.submit_execution(c, entry, PARAMS)
    with pytest.raises(TooManyPendingExecutions, match="SHOAL_TENANT_MAX_PENDING"):
        execution_cases.submit_execution(c, live_session(c), PARAMS)
    # Another tenant has its own count.
    execution_cases.submit_execution(c, live_session(c, tenant="t2"), PARAMS)
    assert tenant_count(c) == 4 and tenant_count(c, "t2") == 1


def test_a_tenants_own_bounds_win_over_the_settings() -> None:
    c = context(session_max_pending=1, tenant_max_pending=1)
    tenants.set_limits(c.redis, "big", max_session_pending=3, max_pending=5)
    entry = live_session(c, tenant="big")
    for _ in range(3):
        execution_cases.submit_execution(c, entry, PARAMS)
    with pytest.raises(TooManyPendingExecutions):
        execution_cases.submit_execution(c, entry, PARAMS)
    other = live_session(c, tenant="big")
    for _ in range(2):
        execution_cases.submit_execution(c, other, PARAMS)
    with pytest.raises(TooManyPendingExecutions, match="tenant 'big'"):
        execution_cases.submit_execution(c, other, PARAMS)


def test_concurrent_submissions_never_exceed_the_bounds_and_number_without_gaps() -> None:
    c = context(session_max_pending=5, tenant_max_pending=8)
    entries = [live_session(c), live_session(c)]
    admitted: list[dict] = []
    refused: list[Exception] = []
    start = threading.Barrier(60)

    def submit(i: int) -> None:
        start.wait()
        try:
            admitted.append(execution_cases.submit_execution(c, entries[i % 2], PARAMS))
        except TooManyPendingExecutions as exc:
            refused.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(admitted) == 8 and len(refused) == 52
    assert tenant_count(c) == 8
    for entry in entries:
        mine = sorted(r["seq"] for r in admitted if r["session_id"] == entry["id"])
        assert len(mine) <= 5 and mine == list(range(1, len(mine) + 1))
        assert c.redis.zcard(keys.session_executions(entry["id"])) == len(mine)


def test_an_execution_that_never_ends_stops_counting_after_the_longest_it_could_take() -> None:
    c = context(tenant_max_pending=1)
    entry = live_session(c)
    stuck = execution_cases.submit_execution(c, entry, PARAMS)
    with pytest.raises(TooManyPendingExecutions):
        execution_cases.submit_execution(c, live_session(c), PARAMS)
    until = c.redis.zscore(keys.tenant_executions("t1"), stuck["id"])
    longest = queue.execution_wait_s(c.settings, c.settings.max_timeout_s)
    assert until == pytest.approx(time.time() + c.settings.session_max_pending * longest, abs=5)
    c.redis.zadd(keys.tenant_executions("t1"), {stuck["id"]: time.time() - 1})  # time passed
    execution_cases.submit_execution(c, live_session(c), PARAMS)


def test_liveness_ending_a_lost_sessions_executions_gives_their_places_back() -> None:
    c = context()
    entry = live_session(c)
    for _ in range(3):
        execution_cases.submit_execution(c, entry, PARAMS)
    c.redis.zadd(keys.session_executions(entry["id"]), {"exe_expired": 99})  # record gone
    c.redis.zadd(keys.tenant_executions("t1"), {"exe_expired": time.time() + 100})
    assert tenant_count(c) == 4
    liveness.fail_pending(c.redis, entry["id"], "host h1 stopped answering", 60)
    assert tenant_count(c) == 0
    assert not c.redis.zcard(keys.session_executions(entry["id"]))


def test_a_batchs_items_wait_for_room_in_their_session_instead_of_failing() -> None:
    c = context(session_max_pending=2)
    c.celery.answer(queue.EXECUTE.name, host_finishes_after(c, 0.1))
    entry = live_session(c)
    items = [{"code": "1", "session_id": entry["id"]}] * 6
    meta = batches.create(c.settings, c.redis, "t1", "default", items, 6, None)
    BatchRunner(c, meta["id"]).run()
    c.celery.join()
    found = batches.load_items(c.redis, meta["id"])
    assert [found[i]["status"] for i in range(6)] == [executions.SUCCEEDED] * 6, found


# --- every way an execution ends on its host --------------------------------------------------
@pytest.fixture()
def host():
    c = unit_context()
    vms = FakeVMManager()
    runtime = HostRuntime(c.settings, r=c.redis, rb=c.redis_bin, vms=vms)
    entry = live_session(c)
    vm = vms.create("vm_1", None)
    runtime.session_vm[entry["id"]] = vm.vm_id
    c.redis.hset(keys.session(entry["id"]), "vm", vm.vm_id)
    return c, runtime, vm, entry


def run_on_host(c, runtime, entry) -> dict:
    record = execution_cases.submit_execution(c, entry, PARAMS)
    assert tenant_count(c) == 1
    (task,) = c.celery.take(queue.EXECUTE.name)
    runtime.execute(**task.kwargs)
    return executions.load(c.redis, record["id"])


@pytest.mark.parametrize(
    "answer, status",
    [
        (None, executions.SUCCEEDED),
        (RuntimeError("libvirt: something odd"), executions.FAILED),  # internal failure
        (AgentProtocolError("garbage"), executions.LOST),
    ],
    ids=["succeeded", "internal-failure", "lost"],
)
def test_every_ending_on_the_host_gives_the_place_back(host, answer, status) -> None:
    c, runtime, vm, entry = host
    if answer is not None:
        vm.answers = [answer]
    assert run_on_host(c, runtime, entry)["status"] == status
    assert tenant_count(c) == 0


def test_a_cancelled_execution_gives_its_place_back(host) -> None:
    c, runtime, vm, entry = host
    record = execution_cases.submit_execution(c, entry, PARAMS)
    execution_cases.cancel_execution(c, record)
    (cancel,) = c.celery.take(queue.CANCEL.name)
    runtime.cancel(**cancel.kwargs)
    (task,) = c.celery.take(queue.EXECUTE.name)
    runtime.execute(**task.kwargs)
    assert executions.load(c.redis, record["id"])["status"] == executions.CANCELLED
    assert tenant_count(c) == 0


def test_an_unreadable_task_gives_its_place_back(host) -> None:
    c, runtime, vm, entry = host
    record = execution_cases.submit_execution(c, entry, PARAMS)
    c.celery.take(queue.EXECUTE.name)
    runtime.execute(execution_id=record["id"], pool_name="default", record_json="not json")
    assert executions.load(c.redis, record["id"])["status"] == executions.FAILED
    assert tenant_count(c) == 0


# --- requests waiting for an execution --------------------------------------------------------
def test_waits_past_the_bound_are_refused_and_nothing_is_queued() -> None:
    c = context(tenant_max_waits=2)
    c.celery.answer(queue.EXECUTE.name, host_finishes_after(c, 0.5))
    entry = live_session(c)
    done: list[dict] = []
    waiters = [
        threading.Thread(
            target=lambda: done.append(execution_cases.run_execution(c, entry, PARAMS, wait=True))
        )
        for _ in range(2)
    ]
    for waiter in waiters:
        waiter.start()
    deadline = time.monotonic() + 2
    while c.redis.zcard(keys.tenant_waits("t1")) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(TooManyWaits, match="SHOAL_TENANT_MAX_WAITS") as refused:
        execution_cases.run_execution(c, entry, PARAMS, wait=True)
    assert refused.value.status == 429
    # Not waiting is not counted; another tenant has its own slots.
    execution_cases.run_execution(c, entry, PARAMS, wait=False)
    other = execution_cases.run_execution(c, live_session(c, tenant="t2"), PARAMS, wait=True)
    assert other["status"] == executions.SUCCEEDED
    for waiter in waiters:
        waiter.join(5)
    c.celery.join()
    assert [r["status"] for r in done] == [executions.SUCCEEDED] * 2
    assert stored_records(c) == 4  # the refused request made no record
    # The slots came back as the waits ended.
    assert c.redis.zcard(keys.tenant_waits("t1")) == 0
    assert execution_cases.run_execution(c, entry, PARAMS, wait=True)["seq"] == 4


def test_concurrent_waits_never_exceed_the_bound() -> None:
    c = context(tenant_max_waits=3)
    c.celery.answer(queue.EXECUTE.name, host_finishes_after(c, 1.0))
    entries = [live_session(c) for _ in range(4)]
    admitted: list[dict] = []
    refused: list[Exception] = []
    start = threading.Barrier(24)

    def run(i: int) -> None:
        start.wait()
        try:
            admitted.append(execution_cases.run_execution(c, entries[i % 4], PARAMS, wait=True))
        except TooManyWaits as exc:
            refused.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    c.celery.join()
    assert len(admitted) == 3 and len(refused) == 21
    assert c.redis.zcard(keys.tenant_waits("t1")) == 0


def test_a_wait_slot_is_given_back_when_the_wait_fails_and_lapses_if_never_given_back(
    monkeypatch,
) -> None:
    c = context(tenant_max_waits=1)
    entry = live_session(c)
    wait = execution_cases.wait_execution
    monkeypatch.setattr(
        execution_cases, "wait_execution", lambda c, record: wait(c, record, timeout_s=0.05)
    )
    with pytest.raises(HostTimeout):
        execution_cases.run_execution(c, entry, PARAMS, wait=True)
    assert c.redis.zcard(keys.tenant_waits("t1")) == 0
    # An API process that died mid-wait never gave its slot back: it lapses at its deadline.
    c.redis.zadd(keys.tenant_waits("t1"), {"wait_dead": time.time() + 60})
    with pytest.raises(TooManyWaits):
        execution_cases.run_execution(c, entry, PARAMS, wait=True)
    c.redis.zadd(keys.tenant_waits("t1"), {"wait_dead": time.time() - 1})
    with pytest.raises(HostTimeout):  # admitted: its wait, not its admission, fails
        execution_cases.run_execution(c, entry, PARAMS, wait=True)
    # A wait's slot lasts as long as the wait may, and a little more.
    assert c.redis.zcard(keys.tenant_waits("t1")) == 0


def test_a_wait_slot_lasts_as_long_as_its_wait_may() -> None:
    c = context()
    entry = live_session(c)
    seen: list[float] = []

    def look(task: SentTask) -> None:
        seen.extend(c.redis.zrange(keys.tenant_waits("t1"), 0, -1, withscores=True)[0][1:])
        finish(c, task.kwargs["execution_id"])

    c.celery.answer(queue.EXECUTE.name, look)
    execution_cases.run_execution(c, entry, PARAMS, wait=True)
    c.celery.join()
    longest = queue.execution_wait_s(c.settings, PARAMS["timeout_s"])
    assert time.time() + longest < seen[0] < time.time() + longest + 60


def test_the_default_wait_bound_stays_well_below_the_apis_threads() -> None:
    s = load({})
    assert s.tenant_max_waits == 8 <= s.api_workers * s.api_threads // 4
    assert load({"SHOAL_API_WORKERS": "1", "SHOAL_API_THREADS": "8"}).tenant_max_waits == 2


# --- at the front door ------------------------------------------------------------------------
@pytest.fixture()
def app():
    settings = Settings(
        redis_url="redis://127.0.0.1:1/0",
        home="/tmp/shoal-unit",
        session_max_pending=1,
        tenant_max_waits=1,
    )
    app = create_app(settings)
    c = app.extensions["shoal"]
    c.redis = fakeredis.FakeRedis(decode_responses=True)
    c.celery = AnsweringCelery()
    return app


def test_the_api_answers_each_bound_with_429_and_retry_after(app) -> None:
    c = app.extensions["shoal"]
    headers = {"Authorization": f"Bearer {tenants.create_key(c.redis, 'acme')[1]}"}
    pool = get_pool(c.settings, "default")
    entry = sessions.create(c.redis, "acme", pool, "h1")
    named = sessions.create(c.redis, "acme", pool, "h1", identifier="x")
    c.redis.set(keys.identifier("acme", "default", "x"), named["id"])
    for session in (entry, named):
        sessions.set_state(c.redis, session["id"], sessions.ACTIVE)
    client = app.test_client()
    url = f"/v1/sessions/{entry['id']}/executions"
    assert client.post(url, json={"code": "1", "wait": False}, headers=headers).status_code == 202
    refused = client.post(url, json={"code": "1", "wait": False}, headers=headers)
    assert refused.status_code == 429, refused.get_data(as_text=True)
    assert refused.get_json()["error"]["code"] == "TooManyPendingExecutions"
    assert refused.headers["x-ms-error-code"] == "TooManyPendingExecutions"
    assert refused.headers["Retry-After"] == "1"

    c.redis.zadd(keys.tenant_waits("acme"), {"wait_other": time.time() + 60})
    for path, body in [
        (url, {"code": "1", "wait": True}),
        ("/pools/default/code/execute?identifier=x", {"properties": {"code": "1"}}),
    ]:
        waits = client.post(path, json=body, headers=headers)
        assert waits.status_code == 429, waits.get_data(as_text=True)
        assert waits.get_json()["error"]["code"] == "TooManyWaits"
        assert waits.headers["Retry-After"] == "1"
