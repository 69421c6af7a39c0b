"""The liveness check (shoal/liveness.py) on fakeredis: the sessions of a host whose heartbeat
expired are marked lost and their unfinished executions end `lost` (the final record pushed to
the done list, so waiters wake); live hosts and finished executions are left alone.
"""

from __future__ import annotations

import json

import pytest

from shoal import executions, keys, liveness, sessions
from shoal.pools import get_pool
from tests.unit.fakes import live_session, publish_heartbeat, unit_context

TTL = 3600


@pytest.fixture()
def c():
    c = unit_context()
    publish_heartbeat(c.redis, "h1")
    publish_heartbeat(c.redis, "h2")
    return c


def on_host(c, host: str, state: str = sessions.ACTIVE) -> dict:
    entry = sessions.create(c.redis, "t1", get_pool(c.settings, "default"), host)
    sessions.set_state(c.redis, entry["id"], state)
    return sessions.load(c.redis, entry["id"])


def queued(c, entry: dict, seq: int, status: str = executions.QUEUED) -> dict:
    record = executions.new_record(entry, f"x = {seq}", "python", 5, 100, seq)
    record["status"] = status
    executions.save(c.redis, record, TTL)
    c.redis.zadd(keys.session_executions(entry["id"]), {record["id"]: seq})
    return record


def done_list(c, record: dict) -> list[dict]:
    return [json.loads(x) for x in c.redis.lrange(keys.execution_done(record["id"]), 0, -1)]


def silence(c, host: str) -> None:
    c.redis.delete(keys.host_heartbeat(host))  # what the heartbeat's TTL leaves


def test_a_silent_hosts_sessions_are_lost_and_their_executions_end_lost(c) -> None:
    active = on_host(c, "h1")
    creating = on_host(c, "h1", sessions.CREATING)
    waiting = queued(c, active, 1)
    running = queued(c, active, 2, executions.RUNNING)
    silence(c, "h1")

    assert liveness.check_hosts(c.redis, TTL) == ["h1"]

    for entry in (active, creating):
        after = sessions.load(c.redis, entry["id"])
        assert after["state"] == sessions.LOST
        assert after["reason"] == "host h1 stopped answering"
    for record in (waiting, running):
        final = executions.load(c.redis, record["id"])
        assert final["status"] == executions.LOST
        assert final["stderr"] == "The session was lost: host h1 stopped answering"
        assert final["finished_at"] is not None
        assert done_list(c, record) == [final]  # a waiter wakes with the final record
        assert 0 < c.redis.ttl(keys.execution(record["id"])) <= TTL
    assert not c.redis.zcard(keys.session_executions(active["id"]))
    assert executions.wait_done(c.redis, running["id"], 0.01)["status"] == executions.LOST


def test_live_hosts_and_ended_sessions_are_left_alone(c) -> None:
    on_h1 = live_session(c)  # on fakes.HOST, h1
    on_h1_run = queued(c, on_h1, 1, executions.RUNNING)
    on_h2 = on_host(c, "h2")
    on_h2_run = queued(c, on_h2, 1, executions.RUNNING)
    silence(c, "h2")
    gone = on_host(c, "h2")
    sessions.end(c.redis, gone, sessions.DELETED)
    already_lost = on_host(c, "h2", sessions.LOST)
    sessions.set_state(c.redis, already_lost["id"], sessions.LOST, "its VM died")

    assert liveness.check_hosts(c.redis, TTL) == ["h2"]

    assert sessions.load(c.redis, on_h1["id"])["state"] == sessions.ACTIVE
    assert executions.load(c.redis, on_h1_run["id"]) == on_h1_run
    assert done_list(c, on_h1_run) == []
    assert sessions.load(c.redis, on_h2["id"])["state"] == sessions.LOST
    assert executions.load(c.redis, on_h2_run["id"])["status"] == executions.LOST
    assert sessions.load(c.redis, gone["id"])["state"] == sessions.DELETED
    # A session lost earlier keeps its own reason: it is not lost a second time.
    assert sessions.load(c.redis, already_lost["id"])["reason"] == "its VM died"


def test_finished_executions_are_untouched(c) -> None:
    entry = on_host(c, "h1")
    finished = queued(c, entry, 1, executions.RUNNING)
    finished["status"] = executions.SUCCEEDED
    finished["stdout"] = "hello\n"
    executions.finish(c.redis, finished, TTL)
    # A final record still listed as pending (its host died between the two writes).
    straggler = queued(c, entry, 2, executions.FAILED)
    silence(c, "h1")

    liveness.check_hosts(c.redis, TTL)

    assert executions.load(c.redis, finished["id"]) == finished
    assert done_list(c, finished) == [finished]  # only the host's own push
    assert executions.load(c.redis, straggler["id"]) == straggler
    assert done_list(c, straggler) == []
    assert not c.redis.zcard(keys.session_executions(entry["id"]))


def test_a_second_check_changes_nothing(c) -> None:
    entry = on_host(c, "h1")
    record = queued(c, entry, 1)
    silence(c, "h1")
    liveness.check_hosts(c.redis, TTL)
    final = executions.load(c.redis, record["id"])

    assert liveness.check_hosts(c.redis, TTL) == ["h1"]
    assert executions.load(c.redis, record["id"]) == final
    assert len(done_list(c, record)) == 1


def test_no_silent_host_no_change(c) -> None:
    entry = on_host(c, "h1")
    record = queued(c, entry, 1)
    assert liveness.check_hosts(c.redis, TTL) == []
    assert sessions.load(c.redis, entry["id"])["state"] == sessions.ACTIVE
    assert executions.load(c.redis, record["id"]) == record
