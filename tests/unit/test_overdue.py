"""An execution whose task never reached its host (a Redis failover can lose the last writes
before it) does not stay `queued` for ever: beat ends it `lost` once it is past any time it
could have ended in, and it stops holding its session's pending slot. Never earlier."""

from __future__ import annotations

import time

from shoal import executions, keys, liveness, queue
from shoal.use_cases import executions as execution_cases
from tests.unit.fakes import live_session, unit_context

PARAMS = {"code": "1", "language": "python", "timeout_s": 10, "max_output": 100}


def test_a_queued_execution_whose_task_was_lost_ends_lost() -> None:
    c = unit_context()
    entry = live_session(c)
    c.redis.sadd(keys.hosts(), entry["host"])  # as its worker registered it
    first = execution_cases.submit_execution(c, entry, PARAMS)
    second = execution_cases.submit_execution(c, entry, PARAMS)
    c.celery.take(queue.EXECUTE.name)  # both tasks vanish with the old primary
    wait_s = queue.execution_wait_s(c.settings, PARAMS["timeout_s"])
    grace = liveness.OVERDUE_GRACE_S
    now = time.time()

    assert liveness.end_overdue(c.redis, c.settings, now + wait_s + grace - 5) == 0
    assert executions.load(c.redis, first["id"])["status"] == executions.QUEUED
    # The first is past its own wait; the second may still be waiting for the first's turn.
    assert liveness.end_overdue(c.redis, c.settings, now + wait_s + grace + 5) == 1
    lost = executions.load(c.redis, first["id"])
    assert lost["status"] == executions.LOST and "was still queued" in lost["stderr"]
    assert executions.load(c.redis, second["id"])["status"] == executions.QUEUED
    assert liveness.end_overdue(c.redis, c.settings, now + 2 * wait_s + grace + 5) == 1
    assert executions.load(c.redis, second["id"])["status"] == executions.LOST
    assert c.redis.zcard(keys.session_executions(entry["id"])) == 0
    # Its waiter is woken with the final record.
    assert executions.wait_done(c.redis, first["id"], 0.1)["status"] == executions.LOST


def test_a_running_execution_counts_from_its_start() -> None:
    c = unit_context()
    entry = live_session(c)
    c.redis.sadd(keys.hosts(), entry["host"])  # as its worker registered it
    record = execution_cases.submit_execution(c, entry, PARAMS)
    started = time.time() + 500  # it waited long for its turn, then started
    record["status"], record["started_at"] = executions.RUNNING, started
    executions.mark_running(c.redis, record, c.settings.execution_ttl_s)
    wait_s = queue.execution_wait_s(c.settings, PARAMS["timeout_s"])
    assert liveness.end_overdue(c.redis, c.settings, started + wait_s) == 0
    assert executions.load(c.redis, record["id"])["status"] == executions.RUNNING
    assert liveness.end_overdue(c.redis, c.settings, started + wait_s + 61) == 1
    assert executions.load(c.redis, record["id"])["status"] == executions.LOST
