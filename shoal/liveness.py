"""Which hosts are alive, and what happens to the sessions of a host that stopped answering.

Every worker refreshes a heartbeat key with a TTL (workers/host.py). Beat runs `check_hosts`
every few seconds: the sessions of a host whose heartbeat has expired are marked lost, and their
unfinished executions end `lost`, so polling never shows `running` forever.
"""

from __future__ import annotations

import logging

import redis

from shoal import executions, keys, metrics, sessions
from shoal.hosts import heartbeats

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
