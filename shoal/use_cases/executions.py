"""Executions: submit one to its session's host, wait for it to end, cancel it."""

from __future__ import annotations

import secrets
import time
from typing import Any

import redis

from shoal import executions, keys, liveness, queue, storage
from shoal.context import Context
from shoal.errors import HostTimeout
from shoal.hosts import live_hosts
from shoal.records import ExecutionRecord, SessionEntry
from shoal.use_cases.sessions import check_reachable

# How often a request waiting on an execution checks that the session's host is still alive.
LIVENESS_POLL_S = 5.0
# An Idempotency-Key is remembered this long (per tenant); a repeat waits this long at most for
# the execution record of the request that claimed the key first.
IDEMPOTENCY_TTL_S = 86400
IDEMPOTENCY_RACE_S = 5.0
IDEMPOTENCY_POLL_S = 0.01
# A wait slot lapses this long after its wait's own deadline: an API process that dies while
# waiting leaks no slot for longer.
WAIT_SLOT_MARGIN_S = 10
# A wait that loses Redis (it restarts) tries again this often until its deadline.
REDIS_RETRY_S = 0.5


def admission(c: Context) -> executions.Admission:
    """The default bounds a new execution is admitted within (docs/limits.md)."""
    s = c.settings
    return executions.Admission(
        session_pending=s.session_max_pending,
        tenant_pending=s.tenant_max_pending,
        waits=s.tenant_max_waits,
        longest_s=queue.execution_wait_s(s, s.max_timeout_s),
        storage=storage.caps(s),
    )


def submit_execution(
    c: Context,
    entry: SessionEntry,
    params: dict[str, Any],
    idempotency_key: str = "",
    wait_id: str = "",
) -> ExecutionRecord:
    """Queue an execution on the session's host and return its record (status `queued`).
    Refused (TooManyPendingExecutions) when its session or tenant already has as many
    unfinished executions as it may have, and (TenantStorageFull, StorageFull) when its tenant,
    or all tenants, hold as many bytes in Redis as they may (shoal/storage.py). Given
    `wait_id`, the request also takes one of its tenant's wait slots (TooManyWaits when none is
    free), to give back with executions.end_wait."""
    check_reachable(c, entry)
    record = executions.new_record(
        entry, params["code"], params["language"], params["timeout_s"], params["max_output"], 0
    )
    record["callback_url"] = params.get("callback_url") or None  # shoal/webhooks.py
    wait = None
    if wait_id:
        longest = queue.execution_wait_s(c.settings, record["timeout_s"]) + IDEMPOTENCY_RACE_S
        wait = (wait_id, time.time() + longest + WAIT_SLOT_MARGIN_S)
    # One round trip: admitted, numbered, stored, counted; an idempotency key claimed before
    # anything runs, so two requests racing with it make one execution.
    earlier, body = executions.admit(
        c.redis,
        record,
        admission(c),
        ttl_s=c.settings.execution_ttl_s,
        cooldown_s=int(entry["cooldown_s"]),
        idempotency=(idempotency_key, IDEMPOTENCY_TTL_S) if idempotency_key else None,
        wait=wait,
    )
    if earlier:
        return _idempotent_earlier(c, earlier)
    # The record rides along: the worker need not read it back.
    queue.EXECUTE.send(
        c.celery,
        host=entry["host"],
        execution_id=record["id"],
        pool_name=entry["pool"],
        record_json=body,
    )
    return record


def run_execution(
    c: Context,
    entry: SessionEntry,
    params: dict[str, Any],
    idempotency_key: str = "",
    wait: bool = False,
) -> ExecutionRecord:
    """Submit an execution and, with `wait`, wait for it to end (wait_execution) while holding
    one of the tenant's wait slots: a tenant's waiting requests never take all of the API's
    threads (TooManyWaits beyond SHOAL_TENANT_MAX_WAITS)."""
    if not wait:
        return submit_execution(c, entry, params, idempotency_key)
    wait_id = "wait_" + secrets.token_hex(8)
    try:
        record = submit_execution(c, entry, params, idempotency_key, wait_id)
        if record["status"] not in executions.FINAL:
            record = wait_execution(c, record)
        return record
    finally:
        executions.end_wait(c.redis, entry["tenant"], wait_id)


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
        try:
            final = executions.wait_done(c.redis, record["id"], min(remaining, LIVENESS_POLL_S))
            if final is not None:
                return final
            latest = executions.load(c.redis, record["id"])
            if latest is None or latest["status"] in executions.FINAL:
                return latest or record
            if record["host"] not in live_hosts(c.redis):
                liveness.check_hosts(c.redis, c.settings.execution_ttl_s)
        except (redis.ConnectionError, redis.TimeoutError):
            # Redis is restarting: the execution goes on, and its end waits in its "done" list
            # (the host stores it once Redis is back), so keep waiting within the deadline.
            time.sleep(min(REDIS_RETRY_S, max(deadline - time.monotonic(), 0)))


def cancel_execution(c: Context, record: ExecutionRecord) -> ExecutionRecord:
    """Ask for the execution to stop: a queued one never runs, a running one is interrupted."""
    if record["status"] in executions.FINAL:
        return record
    c.redis.set(keys.execution_cancel(record["id"]), "1", ex=c.settings.execution_ttl_s)
    queue.CANCEL.send(c.celery, host=record["host"], execution_id=record["id"])
    return record
