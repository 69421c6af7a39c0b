"""Which hosts are alive, and what happens to the sessions of a host that stopped answering.

Every worker refreshes a heartbeat key with a TTL (workers/host.py). Beat runs `check_hosts`
every few seconds: the sessions of a host whose heartbeat has expired are marked lost, and their
unfinished executions end `lost`, so polling never shows `running` forever.

Beat also runs `end_overdue`: an execution whose host is alive but whose record is still
unfinished long after it could possibly have ended (its task was lost, as a Redis failover can
lose the last writes before it, docs/security.md) ends `lost` too, and stops holding its
session's pending slot.
"""

from __future__ import annotations

import logging
import time

import redis

from shoal import executions, keys, metrics, queue, sessions
from shoal.hosts import heartbeats
from shoal.settings import Settings

log = logging.getLogger("shoal.liveness")


def check_hosts(r: redis.Redis, ttl_s: int = 86400) -> list[str]:
    """Mark the sessions of every silent host lost; return the silent hosts."""
    silent = [h for h, beat in heartbeats(r).items() if beat is None]
    for host in silent:
        for session_id in sessions.host_session_ids(r, host):
            entry = sessions.load(r, session_id)
            if entry and entry["state"] in (sessions.CREATING, sessions.ACTIVE):
                reason = f"host {host} stopped answering"
                sessions.set_state(r, session_id, sessions.LOST, reason)
                metrics.incr(r, "shoal_sessions_lost_total")
                fail_pending(r, session_id, reason, ttl_s)
                log.warning("session=%s host=%s marked lost: %s", session_id, host, reason)
    return silent


def fail_pending(r: redis.Redis, session_id: str, reason: str, ttl_s: int) -> None:
    """End every unfinished execution of the session as `lost` (executions.finish also stops
    counting it against its session's and tenant's bounds)."""
    tenant = r.hget(keys.session(session_id), "tenant") or ""
    for execution_id in r.zrange(keys.session_executions(session_id), 0, -1):
        record = executions.load(r, execution_id)
        if record is None or record["status"] in executions.FINAL:
            r.zrem(keys.session_executions(session_id), execution_id)
            r.zrem(keys.tenant_executions(tenant), execution_id)
            continue
        record["status"] = executions.LOST
        record["stderr"] = f"The session was lost: {reason}"
        executions.finish(r, record, ttl_s)


# Beyond the sum of its waits: a worker waits this long for a predecessor that never came
# (workers/session_queue.py PREDECESSOR_WAIT_S) before it runs what follows.
OVERDUE_GRACE_S = 60.0


def end_overdue(r: redis.Redis, settings: Settings, now: float | None = None) -> int:
    """End `lost` every unfinished execution that is past any time it could still end in; the
    number ended. A session runs its executions one at a time, so a queued one may wait for
    every one ahead of it: its deadline is its arrival plus the longest wait of each pending
    execution up to and including it; a running one's is its start plus its own."""
    now = time.time() if now is None else now
    ended = 0
    for host in r.smembers(keys.hosts()):
        for session_id in r.smembers(keys.host_sessions(host)):
            ended += _end_overdue_in(r, settings, session_id, now)
    return ended


def _end_overdue_in(r: redis.Redis, settings: Settings, session_id: str, now: float) -> int:
    pending = r.zrange(keys.session_executions(session_id), 0, -1)
    ended, ahead_s = 0, 0.0
    for execution_id in pending:
        record = executions.load(r, execution_id)
        if record is None or record["status"] in executions.FINAL:
            r.zrem(keys.session_executions(session_id), execution_id)
            continue
        wait_s = queue.execution_wait_s(settings, record["timeout_s"])
        ahead_s += wait_s
        if record["status"] == executions.RUNNING and record.get("started_at"):
            deadline = record["started_at"] + wait_s + OVERDUE_GRACE_S
        else:
            deadline = record["created_at"] + ahead_s + OVERDUE_GRACE_S
        if now > deadline:
            was = record["status"]
            record["status"] = executions.LOST
            record["stderr"] = (
                f"The execution was lost: it was still {was} long after it "
                "could have ended (its task or its result did not survive, as a Redis "
                "failover can lose the last writes before it); run it again"
            )
            executions.finish(r, record, settings.execution_ttl_s)
            metrics.incr(r, "shoal_executions_overdue_total")
            log.warning("execution=%s session=%s overdue: ended lost", execution_id, session_id)
            ended += 1
    return ended
