"""Executions: submit one to its session's host, wait for it to end, cancel it."""

from __future__ import annotations

import time
from typing import Any

from shoal import executions, keys, liveness, queue, sessions
from shoal.context import Context
from shoal.errors import HostTimeout, SessionLost
from shoal.hosts import live_hosts
from shoal.records import ExecutionRecord, SessionEntry

# How often a request waiting on an execution checks that the session's host is still alive.
LIVENESS_POLL_S = 5.0
# An Idempotency-Key is remembered this long (per tenant); a repeat waits this long at most for
# the execution record of the request that claimed the key first.
IDEMPOTENCY_TTL_S = 86400
IDEMPOTENCY_RACE_S = 5.0
IDEMPOTENCY_POLL_S = 0.01


def submit_execution(
    c: Context, entry: SessionEntry, params: dict[str, Any], idempotency_key: str = ""
) -> ExecutionRecord:
    """Queue an execution on the session's host and return its record (status `queued`)."""
    if entry["state"] == sessions.LOST:
        raise SessionLost(
            f"session {entry['id']} was lost ({entry.get('reason') or 'its VM died'}); "
            "create a new session"
        )
    r = c.redis
    execution_id = executions.new_id()
    if idempotency_key:
        # Claim the key before anything runs, so two requests racing with it make one execution.
        idem = keys.idempotency(entry["tenant"], idempotency_key)
        if not r.set(idem, execution_id, nx=True, ex=IDEMPOTENCY_TTL_S):
            return _idempotent_earlier(c, r.get(idem) or "")
    seq = r.incr(keys.session_seq(entry["id"]))
    record = executions.new_record(
        entry, params["code"], params["language"], params["timeout_s"], params["max_output"], seq
    )
    record["id"] = execution_id
    record["callback_url"] = params.get("callback_url") or None  # shoal/webhooks.py
    pipe = r.pipeline(transaction=False)  # one round trip; nothing reads these in between
    body = executions.save(pipe, record, c.settings.execution_ttl_s)
    pipe.zadd(keys.session_executions(entry["id"]), {record["id"]: seq})
    sessions.touch(pipe, entry["id"], int(entry["cooldown_s"]))
    pipe.execute()
    # The record rides along: the worker need not read it back.
    queue.EXECUTE.send(
        c.celery,
        host=entry["host"],
        execution_id=execution_id,
        pool_name=entry["pool"],
        record_json=body,
    )
    return record


def _idempotent_earlier(c: Context, execution_id: str) -> ExecutionRecord:
    """The execution that claimed an idempotency key; its record may be a moment behind."""
    deadline = time.monotonic() + IDEMPOTENCY_RACE_S
    while True:
        record = executions.load(c.redis, execution_id) if execution_id else None
        if record is not None:
            return record
        if time.monotonic() > deadline:
            raise HostTimeout(
                "an earlier request with this Idempotency-Key did not record its execution; "
                "retry with a new key"
            )
        time.sleep(IDEMPOTENCY_POLL_S)


def wait_execution(
    c: Context, record: ExecutionRecord, timeout_s: float | None = None
) -> ExecutionRecord:
    """Block until the execution ends, noticing a dead host on the way. `timeout_s` defaults
    to what its own timeout allows (shoal/queue.py); past it, HostTimeout."""
    if timeout_s is None:
        timeout_s = queue.execution_wait_s(c.settings, record["timeout_s"])
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            latest = executions.load(c.redis, record["id"])
            if latest is not None and latest["status"] in executions.FINAL:
                return latest  # it ended (or was marked lost) just as time ran out
            raise HostTimeout(
                f"execution {record['id']} did not finish within {timeout_s:.0f} s; "
                f"poll GET /v1/executions/{record['id']}"
            )
        final = executions.wait_done(c.redis, record["id"], min(remaining, LIVENESS_POLL_S))
        if final is not None:
            return final
        latest = executions.load(c.redis, record["id"])
        if latest is None or latest["status"] in executions.FINAL:
            return latest or record
        if record["host"] not in live_hosts(c.redis):
            liveness.check_hosts(c.redis, c.settings.execution_ttl_s)


def cancel_execution(c: Context, record: ExecutionRecord) -> ExecutionRecord:
    """Ask for the execution to stop: a queued one never runs, a running one is interrupted."""
    if record["status"] in executions.FINAL:
        return record
    c.redis.set(keys.execution_cancel(record["id"]), "1", ex=c.settings.execution_ttl_s)
    queue.CANCEL.send(c.celery, host=record["host"], execution_id=record["id"])
    return record
