"""Batches are shared fairly between tenants: a tenant's batches take turns for the coordinators,
an item waiting for a session has a deadline, and a tenant's unfinished batches are capped at
submission. Real coordinators (workers/batch_runner.py) on fakeredis; Celery records."""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest

from api.app import create_app
from shoal import batch_turns, batches, keys, leases, queue, sessions, tenants
from shoal.errors import TooManyBatches, ValidationFailed
from shoal.settings import Settings
from shoal.use_cases import batches as batch_cases
from tests.unit.fakes import RecordingCelery, live_session, publish_heartbeat, unit_context
from tests.unit.fakes import unit_settings as base_settings
from workers import batch_runner
from workers.batch_runner import BatchRunner

POOLS_TOML = """
[pools.small]
max_sessions = 1
"""


@pytest.fixture()
def make(tmp_path):
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(POOLS_TOML)

    def make_context(**overrides):
        c = unit_context(base_settings(pools_file=str(pools_file), **overrides))
        publish_heartbeat(c.redis)
        return c

    return make_context


def submit(c, tenant: str, items: list | None = None, pool: str = "default") -> str:
    meta = batch_cases.submit_batch(c, tenant, pool, items or [{"code": "1"}], 8)
    c.celery.take(queue.RUN_BATCH.name)
    return meta["id"]


def run_in_thread(c, batch_id: str) -> threading.Thread:
    thread = threading.Thread(target=BatchRunner(c, batch_id).run, daemon=True)
    thread.start()
    return thread


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never came true"
        time.sleep(0.02)


def turns(c, tenant: str) -> int:
    return leases.holders(c.redis, keys.batch_coordinators(tenant))


def waiting(c, tenant: str) -> list[str]:
    return c.redis.zrange(keys.batches_waiting(tenant), 0, -1)


def woken(c) -> list[str]:
    return [t.kwargs["batch_id"] for t in c.celery.take(queue.RUN_BATCH.name)]


# --- turns for the coordinators --------------------------------------------------------------
def test_the_running_cap_stays_below_the_coordinators() -> None:
    assert batch_turns.running_cap(Settings()) == 2
    assert batch_turns.running_cap(Settings(batch_tenant_running=9)) == 3
    assert batch_turns.running_cap(Settings(batch_concurrency=1)) == 1


def test_a_capped_tenants_batches_wait_without_holding_a_coordinator(make) -> None:
    """Tenant a is at its session cap, held by a session that stays: its first two batches
    run (their items wait for a session), the next two wait in Redis and let their coordinator
    go at once, and tenant b's batch runs to the end meanwhile."""
    c = make(tenant_max_sessions=1)
    live_session(c, "a")
    a1, a2, a3, a4 = (submit(c, "a") for _ in range(4))
    running = [run_in_thread(c, a1), run_in_thread(c, a2)]
    wait_for(lambda: turns(c, "a") == 2)

    for batch_id in (a3, a4):
        started = time.monotonic()
        BatchRunner(c, batch_id).run()  # returns at once: the coordinator is free again
        assert time.monotonic() - started < 1.0
        meta = batches.load(c.redis, batch_id)
        assert not meta["started_at"] and not c.redis.exists(keys.batch_lease(batch_id))
    assert waiting(c, "a") == [a3, a4]

    b1 = submit(c, "b", [{"code": 2}])  # an invalid item: the batch ends as soon as it runs
    BatchRunner(c, b1).run()
    assert batches.load(c.redis, b1)["status"] == batches.COMPLETED

    # a's first batch ends (cancelled): its turn goes to the longest-waiting batch.
    batch_cases.cancel_batch(c, batches.load(c.redis, a1))
    running[0].join(5)
    assert not running[0].is_alive()
    assert batches.load(c.redis, a1)["status"] == batches.CANCELLED
    assert woken(c) == [a3] and waiting(c, "a") == [a4]
    run_in_thread(c, a3)
    wait_for(lambda: leases.holds(c.redis, keys.batch_coordinators("a"), a3))
    assert turns(c, "a") == 2

    # A waiting batch that is cancelled is queued at once and ends without a turn.
    batch_cases.cancel_batch(c, batches.load(c.redis, a4))
    assert woken(c) == [a4] and waiting(c, "a") == []
    BatchRunner(c, a4).run()
    assert batches.load_items(c.redis, a4)[0]["status"] == "cancelled"
    assert batches.load(c.redis, a4)["finished_at"]

    for batch_id in (a2, a3):
        batch_cases.cancel_batch(c, batches.load(c.redis, batch_id))
    running[1].join(5)
    wait_for(lambda: turns(c, "a") == 0)


def test_a_turn_freed_between_the_take_and_the_line_is_not_lost(make, monkeypatch) -> None:
    c = make(batch_tenant_running=1)
    other = "bat_other"
    leases.take(c.redis, keys.batch_coordinators("a"), other, 1, 30)
    mine = submit(c, "a")
    real_zadd = c.redis.zadd

    def zadd_after_the_other_ends(key, mapping, **kwargs):
        leases.release(c.redis, keys.batch_coordinators("a"), other)
        batch_turns.wake(c, "a")  # finds no one waiting yet
        return real_zadd(key, mapping, **kwargs)

    monkeypatch.setattr(c.redis, "zadd", zadd_after_the_other_ends)
    assert batch_turns.take_turn(c, batches.load(c.redis, mine), 30)
    assert waiting(c, "a") == [] and woken(c) == []


def test_the_resume_loop_wakes_waiting_batches_and_never_resumes_them_as_orphans(make) -> None:
    c = make(batch_tenant_running=1)
    held, left = submit(c, "a"), submit(c, "a")
    leases.take(c.redis, keys.batch_coordinators("a"), held, 1, 30)
    c.redis.hset(keys.batch(held), "started_at", "1")  # its coordinator runs it (lease below)
    c.redis.set(keys.batch_lease(held), "token", ex=30)
    # `left` started once, its coordinator died, and on resuming it found no turn: it waits.
    c.redis.hset(keys.batch(left), "started_at", "1")
    assert not batch_turns.take_turn(c, batches.load(c.redis, left), 30)

    assert batch_runner.resume_orphans(c) == []  # neither an orphan nor any room
    assert woken(c) == []
    # The running one's coordinator dies: its turn runs out with its lease.
    c.redis.delete(keys.batch_lease(held))
    leases.release(c.redis, keys.batch_coordinators("a"), held)
    assert sorted(batch_runner.resume_orphans(c)) == sorted([held, left])
    assert sorted(woken(c)) == sorted([held, left]) and waiting(c, "a") == []


# --- an item's wait for a session ------------------------------------------------------------
def test_an_item_waiting_on_a_cap_held_by_sessions_that_stay_ends_with_an_error(make) -> None:
    c = make(tenant_max_sessions=1, batch_session_wait_s=0.5)
    live_session(c, "a")
    batch_id = submit(c, "a")
    started = time.monotonic()
    BatchRunner(c, batch_id).run()
    assert 0.5 <= time.monotonic() - started < 2.0
    [item] = batches.load_items(c.redis, batch_id).values()
    assert item["status"] == batches.ERROR
    assert "the tenant stayed at its session cap (1 sessions) for 0.5 s" in item["error"]
    assert "SHOAL_BATCH_SESSION_WAIT_S" in item["error"] and item.get("execution") is None
    assert batches.load(c.redis, batch_id)["status"] == batches.COMPLETED
    assert c.celery.take(queue.CREATE_SESSION.name) == []
    assert turns(c, "a") == 0


def test_a_full_pool_is_named_when_the_wait_ends(make) -> None:
    c = make(batch_session_wait_s=0.3)
    live_session(c, "someone-else", "small")
    batch_id = submit(c, "a", pool="small")
    BatchRunner(c, batch_id).run()
    [item] = batches.load_items(c.redis, batch_id).values()
    assert item["status"] == batches.ERROR
    assert "pool 'small' stayed at its max_sessions for 0.3 s" in item["error"]


def test_a_session_of_the_tenant_ending_restarts_the_clock(make) -> None:
    """A cap that turns over is not stuck: the wait is counted from the last session that
    ended, so items queued behind their own batch's items are not cut off."""
    c = make(batch_session_wait_s=2.0)
    tenants.set_max_sessions(c.redis, "a", 1)
    first = live_session(c, "a")
    batch_id = submit(c, "a")
    started = time.monotonic()
    runner = run_in_thread(c, batch_id)
    time.sleep(1.0)
    sessions.end(c.redis, first, sessions.DELETED)  # one ends, another takes its place
    live_session(c, "a")
    time.sleep(1.4)  # 2.4 s since the start: past the limit, but not since the turnover
    assert batches.load_items(c.redis, batch_id)[0]["status"] == batches.PENDING
    runner.join(5)
    assert not runner.is_alive() and time.monotonic() - started >= 3.0
    assert batches.load_items(c.redis, batch_id)[0]["status"] == batches.ERROR


# --- unfinished batches per tenant, at submission ---------------------------------------------
def test_a_tenants_unfinished_batches_are_capped_at_submission(make) -> None:
    c = make(tenant_max_batches=2)
    first, _ = submit(c, "a"), submit(c, "a")
    with pytest.raises(TooManyBatches, match="SHOAL_TENANT_MAX_BATCHES") as refused:
        batch_cases.submit_batch(c, "a", "default", [{"code": "1"}], 8)
    assert refused.value.status == 429 and refused.value.retry_after_s
    assert c.celery.sent == [] and len(c.redis.smembers(keys.batches_running())) == 2
    submit(c, "b")  # another tenant is not affected
    # A refused submission takes no place; a finished batch gives its place back.
    with pytest.raises(ValidationFailed):
        batch_cases.submit_batch(c, "b", "default", [], 8)
    assert leases.holders(c.redis, keys.tenant_batches("b")) == 1
    batch_cases.cancel_batch(c, batches.load(c.redis, first))
    BatchRunner(c, first).run()
    assert batches.load(c.redis, first)["finished_at"]
    submit(c, "a")
    assert leases.holders(c.redis, keys.tenant_batches("a")) == 2


def test_too_many_batches_is_a_429_with_retry_after_in_the_error_shape() -> None:
    app = create_app(
        Settings(redis_url="redis://127.0.0.1:1/0", home="/tmp/shoal-unit", tenant_max_batches=1)
    )
    app.extensions["shoal"].redis = fakeredis.FakeRedis(decode_responses=True)
    app.extensions["shoal"].celery = RecordingCelery()
    key = tenants.create_key(app.extensions["shoal"].redis, "acme")[1]
    client = app.test_client()
    body = {"items": [{"code": "1"}]}
    headers = {"Authorization": f"Bearer {key}"}
    assert client.post("/v1/batches", json=body, headers=headers).status_code == 202
    response = client.post("/v1/batches", json=body, headers=headers)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "30"
    assert response.headers["x-ms-error-code"] == "TooManyBatches"
    error = response.get_json()["error"]
    assert error["code"] == "TooManyBatches" and "1 unfinished batches" in error["message"]
