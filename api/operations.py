"""What the views ask of Shoal: one function per operation, shared by the native (/v1) and the
dynamic-sessions (/pools/...) routes. Each looks up the registry, then sends one task to the
queue of the session's host; nothing here touches a VM.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

from api.context import Context
from pool.placement import choose_host
from pool.pools import get_pool
from shoal import executions, keys, liveness, replies, sessions, tenants, transfers
from shoal.errors import (
    HostTimeout,
    PoolExhausted,
    SessionLost,
    SessionNotFound,
    TenantSessionLimit,
)

# A host's backlog older than this is dropped rather than run long after the client gave up.
TASK_EXPIRY_S = 600
# Sessions are made synchronously: allow the host this long beyond the agent's own deadline.
CREATE_MARGIN_S = 30
# How often a request waiting on an execution checks that the session's host is still alive.
LIVENESS_POLL_S = 5.0
# An Idempotency-Key is remembered this long (per tenant); a repeat waits this long at most for
# the execution record of the request that claimed the key first.
IDEMPOTENCY_TTL_S = 86400
IDEMPOTENCY_RACE_S = 5.0


def create_session(c: Context, tenant: str, pool_name: str, identifier: str = "") -> dict:
    pool = get_pool(c.settings, pool_name)
    cap = tenants.max_sessions(c.redis, tenant, c.settings.tenant_max_sessions)
    if sessions.count_for_tenant(c.redis, tenant) >= cap:
        raise TenantSessionLimit(
            f"tenant {tenant!r} already has {cap} live sessions "
            "(SHOAL_TENANT_MAX_SESSIONS, or its own cap); delete one first"
        )
    if sessions.count_for_pool(c.redis, pool.name) >= pool.max_sessions:
        raise PoolExhausted(
            f"pool {pool.name!r} is at its limit of {pool.max_sessions} sessions (max_sessions)"
        )
    host = choose_host(c.redis, pool.name)
    entry = sessions.create(c.redis, tenant, pool, host, identifier)
    reply_key = replies.new_key()
    timeout = c.settings.agent_ready_timeout_s + CREATE_MARGIN_S
    c.celery.send_task(
        "shoal.create_session",
        args=[entry["id"], pool.to_dict(), reply_key],
        queue=keys.host_queue(host),
        expires=timeout,
    )
    try:
        replies.wait(c.redis, reply_key, timeout)
    except Exception:
        sessions.end(c.redis, entry, sessions.DELETED)
        raise
    entry["state"] = sessions.ACTIVE
    return entry


def delete_session(c: Context, entry: dict) -> None:
    sessions.end(c.redis, entry, sessions.DELETED)
    c.celery.send_task(
        "shoal.destroy_session",
        args=[entry["id"]],
        queue=keys.host_queue(entry["host"]),
        expires=TASK_EXPIRY_S,
    )


def submit_execution(
    c: Context, entry: dict, params: dict[str, Any], idempotency_key: str = ""
) -> dict:
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
    pool = get_pool(c.settings, entry["pool"])
    # The record rides along (the worker need not read it back); the short argsrepr spares
    # Celery a repr of the whole message for its logs.
    c.celery.send_task(
        "shoal.execute",
        args=[record["id"], pool.to_dict(), body],
        argsrepr=repr(record["id"]),
        kwargsrepr="",
        queue=keys.host_queue(entry["host"]),
        expires=TASK_EXPIRY_S,
    )
    return record


def _idempotent_earlier(c: Context, execution_id: str) -> dict:
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
        time.sleep(0.01)


def wait_execution(c: Context, record: dict, timeout_s: float) -> dict:
    """Block until the execution ends (or `timeout_s`), noticing a dead host on the way."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
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
        if record["host"] not in liveness.live_hosts(c.redis):
            liveness.check_hosts(c.redis, c.settings.execution_ttl_s)


def cancel_execution(c: Context, record: dict) -> dict:
    if record["status"] in executions.FINAL:
        return record
    c.redis.set(keys.execution_cancel(record["id"]), "1", ex=c.settings.execution_ttl_s)
    c.celery.send_task(
        "shoal.cancel",
        args=[record["id"]],
        queue=keys.host_queue(record["host"]),
        expires=TASK_EXPIRY_S,
    )
    return record


# --- files ---------------------------------------------------------------------------------
FILE_OP_TIMEOUT_S = 60


def _send_to_host(c: Context, entry: dict, task: str, *args: object) -> str:
    """Send a session task with a fresh reply key; return the key."""
    if entry["state"] == sessions.LOST:
        raise SessionLost(f"session {entry['id']} was lost ({entry.get('reason')})")
    reply_key = replies.new_key()
    pool = get_pool(c.settings, entry["pool"])
    c.celery.send_task(
        task,
        args=[entry["id"], *args, reply_key, pool.to_dict()],
        queue=keys.host_queue(entry["host"]),
        expires=TASK_EXPIRY_S,
    )
    return reply_key


def file_op(c: Context, entry: dict, op: str, **args: object) -> dict:
    reply_key = _send_to_host(c, entry, "shoal.file_op", op, args)
    return replies.wait(c.redis, reply_key, FILE_OP_TIMEOUT_S)


def upload_file(c: Context, entry: dict, path: str, chunks: Iterable[bytes]) -> dict:
    """Stream `chunks` into the session's file `path`; return the guest's stat of it."""
    transfer_id = transfers.new_id()
    reply_key = _send_to_host(c, entry, "shoal.put_file", transfer_id, path)
    # The host replies before the end only with an error (busy, a refused path): stop sending.
    transfers.produce(c.redis_bin, transfer_id, chunks, lambda: bool(c.redis.exists(reply_key)))
    return replies.wait(c.redis, reply_key, FILE_OP_TIMEOUT_S)["file"]


def download_file(c: Context, entry: dict, path: str) -> tuple[dict, Iterator[bytes]]:
    """The file's stat and an iterator over its bytes, streamed from the guest."""
    transfer_id = transfers.new_id()
    reply_key = _send_to_host(c, entry, "shoal.get_file", transfer_id, path)
    info = replies.wait(c.redis, reply_key, FILE_OP_TIMEOUT_S)["file"]
    return info, transfers.consume(c.redis_bin, transfer_id)


# --- dynamic-sessions identifiers ------------------------------------------------------------
IDENT_LOCK_S = 300


def session_for_identifier(
    c: Context, tenant: str, pool_name: str, identifier: str, create: bool = True
) -> dict:
    """The live session behind `identifier` (per tenant and pool); made on first use, and made
    afresh once the old one expired, was deleted or was lost."""
    get_pool(c.settings, pool_name)
    ident_key = keys.identifier(tenant, pool_name, identifier)
    deadline = time.monotonic() + c.settings.agent_ready_timeout_s + CREATE_MARGIN_S
    while True:
        session_id = c.redis.get(ident_key)
        entry = sessions.load(c.redis, session_id) if session_id else None
        if entry and entry["state"] in (sessions.ACTIVE, sessions.CREATING):
            return entry
        if not create:
            raise SessionNotFound(f"no session with identifier {identifier!r}")
        lock = ident_key + ":lock"
        if c.redis.set(lock, "1", nx=True, ex=IDENT_LOCK_S):
            try:
                if entry is not None:
                    delete_session(c, entry)
                entry = create_session(c, tenant, pool_name, identifier)
                c.redis.set(ident_key, entry["id"])
                return entry
            finally:
                c.redis.delete(lock)
        if time.monotonic() > deadline:
            raise HostTimeout(f"the session for identifier {identifier!r} is still being made")
        time.sleep(0.05)


def pool_metadata(c: Context, pool_name: str) -> dict:
    """Runtimes and preinstalled packages of a pool's image, as its hosts published them."""
    pool = get_pool(c.settings, pool_name)
    raw = c.redis.get(keys.image_info(pool.image))
    info = json.loads(raw) if raw else {}
    packages = info.get("python_packages", {})
    return {
        "pool": pool.name,
        "image": pool.image,
        "runtimes": [{"name": "python", "version": info.get("python_version", "")}],
        "packages": [{"name": n, "version": v} for n, v in sorted(packages.items())],
    }
