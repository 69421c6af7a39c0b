"""Execution records in Redis: created by the API, advanced by the session's host worker.

Statuses: queued -> running -> succeeded | failed | timed_out | cancelled | lost.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from shoal import keys, redis_conn, storage
from shoal.errors import (
    ExecutionNotFound,
    SessionExpired,
    SessionNotFound,
    TooManyPendingExecutions,
    TooManyWaits,
)
from shoal.records import ExecutionRecord, SessionEntry
from shoal.timeutil import iso

QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, LOST = (
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "lost",
)
FINAL = frozenset({SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, LOST})

# The agent's execute outcomes, as execution statuses.
AGENT_STATUS = {"ok": SUCCEEDED, "error": FAILED, "timed_out": TIMED_OUT, "interrupted": CANCELLED}

RESULT_FIELDS = (
    "stdout",
    "stderr",
    "stdout_truncated",
    "stderr_truncated",
    "result",
    "result_truncated",
    "outputs",
    "outputs_truncated",
    "output_notes",
    "error",
    "exit_code",
    "interpreter_restarted",
)
# Fields added after records were first stored: a record from before has none of them.
LATER_FIELDS = {"result_truncated": False, "outputs_truncated": False, "output_notes": []}


def new_id() -> str:
    return "exe_" + secrets.token_hex(10)


def new_record(
    session: SessionEntry, code: str, language: str, timeout_s: int, max_output: int, seq: int
) -> ExecutionRecord:
    return {
        "id": new_id(),
        "session_id": session["id"],
        "tenant": session["tenant"],
        "host": session["host"],
        "seq": seq,
        "language": language,
        "code": code,
        "timeout_s": timeout_s,
        "max_output": max_output,
        "status": QUEUED,
        "stdout": "",
        "stderr": "",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "result": None,
        "result_truncated": False,
        "outputs": [],
        "outputs_truncated": False,
        "output_notes": [],
        "error": None,
        "exit_code": None,
        "interpreter_restarted": False,
        "created_at": time.time(),
        "started_at": None,
        "finished_at": None,
        "duration_ms": None,
        "cancel_requested": False,
    }


# Room for the execution's number in its stored record (the admission counts it before it has
# one).
SEQ_DIGITS = 10


def save(r: redis.Redis | redis.client.Pipeline, record: ExecutionRecord, ttl_s: int) -> str:
    """Store the record; return the JSON stored."""
    body = json.dumps(record)
    r.set(keys.execution(record["id"]), body, ex=ttl_s)
    return body


@dataclass(frozen=True)
class Admission:
    """What admitting a new execution checks, with the tenant's own limits winning over these
    defaults (shoal/tenants.py LIMITS): unfinished executions per session and per tenant, the
    tenant's waiting requests, and the bytes the tenant holds in Redis (shoal/storage.py)."""

    session_pending: int
    tenant_pending: int
    waits: int
    longest_s: float  # the most one execution can take: counted no longer than its queue's
    storage: storage.Caps


# Atomically: admit a new execution within its session's and tenant's bounds, number it,
# store its record, count it as unfinished in its session and its tenant and as bytes the
# tenant holds (shoal/storage.py), claim its idempotency key and (when the request waits) one
# of the tenant's wait slots, and touch the session (what sessions.touch does). The sorted
# sets it adds to get a TTL that outlasts their newest member (they never live for ever),
# pushed out by 5 minutes more once it runs short, so not on every admission. A session that
# has ended admits nothing (its keys would come back without a TTL).
# KEYS: the record, the session's and the tenant's unfinished sets, the session's seq, the
# session, the idle deadlines, the tenant's own limits, the idempotency key, the tenant's waits,
# the tenant's three storage keys.
# ARGV: the execution id, the session id, the record's JSON before and after its seq, its TTL,
# now, the session's cooldown, the longest one execution takes, the default session, tenant and
# wait caps, the wait's deadline (0: no wait), the idempotency key's TTL (0: none), the wait id,
# the record's size counted, the default and all-tenants storage caps.
# Returns {'ok', seq}, {'earlier', id} for an idempotency key claimed before, {'gone', state}
# for a session that has ended, or {'session'|'tenant'|'waits', cap} or a storage refusal
# ({'storage'|'storage_all', cap, used, retry_s}), admitting nothing.
_ADMIT = redis_conn.script(
    storage.LUA
    + """
local function expire_after(key, seconds)
  if redis.call('TTL', key) < seconds then redis.call('EXPIRE', key, seconds + 300) end
end
local now = tonumber(ARGV[6])
local state = redis.call('HGET', KEYS[5], 'state')
if state ~= 'active' and state ~= 'creating' and state ~= 'lost' and state ~= 'sleeping'
   and state ~= 'waking' then
  return {'gone', state or ''}
end
local own = redis.call(
  'HMGET', KEYS[7], 'max_session_pending', 'max_pending', 'max_waits', 'max_redis_mib')
local waits = ARGV[12] ~= '0'
if waits then
  redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now)
  local cap = tonumber(own[3]) or tonumber(ARGV[11])
  if redis.call('ZCARD', KEYS[9]) >= cap then return {'waits', cap} end
end
if ARGV[13] ~= '0' then
  local earlier = redis.call('GET', KEYS[8])
  if earlier then
    if waits then
      redis.call('ZADD', KEYS[9], ARGV[12], ARGV[14])
      expire_after(KEYS[9], math.ceil(tonumber(ARGV[12]) - now) + 1)
    end
    return {'earlier', earlier}
  end
end
local session_cap = tonumber(own[1]) or tonumber(ARGV[9])
if redis.call('ZCARD', KEYS[2]) >= session_cap then return {'session', session_cap} end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local tenant_cap = tonumber(own[2]) or tonumber(ARGV[10])
if redis.call('ZCARD', KEYS[3]) >= tenant_cap then return {'tenant', tenant_cap} end
local tenant = ARGV[18]
local size = tonumber(ARGV[15])
local storage_cap = tonumber(own[4]) or tonumber(ARGV[16]) / 1048576
local full = room(
  tenant, KEYS[10], KEYS[11], KEYS[12], size, storage_cap * 1048576, tonumber(ARGV[17]), now)
if full then return full end
local seq = redis.call('INCR', KEYS[4])
redis.call('SET', KEYS[1], ARGV[3] .. seq .. ARGV[4], 'EX', ARGV[5])
local expiry = now + tonumber(ARGV[5])
charge(tenant, KEYS[10], KEYS[11], KEYS[12], 'exec:' .. ARGV[1], size, expiry, now, true)
redis.call('ZADD', KEYS[2], seq, ARGV[1])
expire_after(KEYS[2], tonumber(ARGV[5]))
local lapse = session_cap * tonumber(ARGV[8])
redis.call('ZADD', KEYS[3], now + lapse, ARGV[1])
expire_after(KEYS[3], math.ceil(lapse) + 1)
redis.call('HSET', KEYS[5], 'last_used_at', ARGV[6])
redis.call('ZADD', KEYS[6], 'XX', now + tonumber(ARGV[7]), ARGV[2])
if ARGV[13] ~= '0' then redis.call('SET', KEYS[8], ARGV[1], 'EX', ARGV[13]) end
if waits then
  redis.call('ZADD', KEYS[9], ARGV[12], ARGV[14])
  expire_after(KEYS[9], math.ceil(tonumber(ARGV[12]) - now) + 1)
end
return {'ok', seq}
"""
)


def admit(
    r: redis.Redis,
    record: ExecutionRecord,
    admission: Admission,
    *,
    ttl_s: int,
    cooldown_s: int,
    idempotency: tuple[str, int] | None = None,
    wait: tuple[str, float] | None = None,
) -> tuple[str, str]:
    """Admit the new execution `record` (its seq is given here) in one round trip; see _ADMIT.
    `idempotency` is (key, ttl_s); `wait` is (wait id, deadline as epoch seconds), the slot
    end_wait gives back. Returns ("", the stored JSON) when admitted, (earlier id, "") when the
    idempotency key was claimed before; TooManyPendingExecutions, TooManyWaits,
    TenantStorageFull, StorageFull, or SessionNotFound / SessionExpired (the session ended)
    otherwise."""
    tenant, session_id = record["tenant"], record["session_id"]
    rest = {k: v for k, v in record.items() if k != "seq"}
    head, tail = '{"seq": ', ", " + json.dumps(rest)[1:]
    now = time.time()
    script_keys = [
        keys.execution(record["id"]),
        keys.session_executions(session_id),
        keys.tenant_executions(tenant),
        keys.session_seq(session_id),
        keys.session(session_id),
        keys.session_deadlines(),
        keys.tenant_limits(tenant),
        keys.idempotency(tenant, idempotency[0] if idempotency else ""),  # untouched without
        keys.tenant_waits(tenant),
        *storage.tenant_keys(tenant),
    ]
    args = [
        record["id"],
        session_id,
        head,
        tail,
        int(ttl_s),
        f"{now:.6f}",
        cooldown_s,
        admission.longest_s,
        admission.session_pending,
        admission.tenant_pending,
        admission.waits,
        wait[1] if wait else 0,
        idempotency[1] if idempotency else 0,
        wait[0] if wait else "",
        len(head) + len(tail) + SEQ_DIGITS + storage.ENTRY_OVERHEAD,
        admission.storage.tenant,
        admission.storage.all_tenants,
        tenant,
    ]
    outcome, value, *more = _ADMIT(keys=script_keys, args=args, client=r)
    if outcome == "ok":
        record["seq"] = int(value)
        return "", head + str(value) + tail
    if outcome == "earlier":
        return str(value), ""
    if outcome == "gone":
        if value == "expired":
            raise SessionExpired(f"session {session_id!r} expired after being idle")
        raise SessionNotFound(f"session {session_id!r} has ended")
    if outcome in ("storage", "storage_all"):
        raise storage.refuse(outcome, tenant, int(value), int(more[0]), int(more[1]))
    if outcome == "waits":
        raise TooManyWaits(
            f"tenant {tenant!r} already has {value} requests waiting for an execution "
            "(SHOAL_TENANT_MAX_WAITS, or its own); send it with wait false and poll, or retry"
        )
    where = f"session {session_id}" if outcome == "session" else f"tenant {tenant!r}"
    setting = "SHOAL_SESSION_MAX_PENDING" if outcome == "session" else "SHOAL_TENANT_MAX_PENDING"
    raise TooManyPendingExecutions(
        f"{where} already has {value} unfinished executions ({setting}, or the tenant's own); "
        "wait for one to end"
    )


def end_wait(r: redis.Redis, tenant: str, wait_id: str) -> None:
    """Give back the wait slot admit() took for `wait_id`."""
    r.zrem(keys.tenant_waits(tenant), wait_id)


# Atomically: unless a cancel is waiting for the execution (KEYS[2]), store its running record.
# ... and only while the stored record is still queued: an execution runs at most once, even
# when its task arrives after a restarted worker already ran it (workers/host.py resumes them).
_MARK_RUNNING = """
local stored = redis.call('GET', KEYS[1])
if stored and not string.find(stored, '"status": "queued"', 1, true) then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
STARTED, CANCELLED_FIRST, NOT_QUEUED = 1, 0, -1


def mark_running(r: redis.Redis, record: ExecutionRecord, ttl_s: int) -> int:
    """Store the (running) record in one round trip: STARTED; CANCELLED_FIRST, storing nothing,
    when a cancel came before it started; NOT_QUEUED, storing nothing, when it is no longer
    queued (it ran, runs or ended already)."""
    keys_ = [keys.execution(record["id"]), keys.execution_cancel(record["id"])]
    return int(r.eval(_MARK_RUNNING, 2, *keys_, json.dumps(record), int(ttl_s)))


def load(r: redis.Redis, execution_id: str) -> ExecutionRecord | None:
    raw = r.get(keys.execution(execution_id))
    return json.loads(raw) if raw else None


def get_for_tenant(r: redis.Redis, tenant: str, execution_id: str) -> ExecutionRecord:
    record = load(r, execution_id) if execution_id.startswith("exe_") else None
    if record is None or record["tenant"] != tenant:
        raise ExecutionNotFound(f"no execution {execution_id!r}")
    return record


def apply_agent_result(record: ExecutionRecord, answer: dict[str, Any]) -> None:
    """Copy an agent's execute answer into the record and set the final status. The answer is
    already held to the execution's output bounds (workers/agent_client.py, with
    protocol.bound_answer)."""
    for name in RESULT_FIELDS:
        if name in answer:
            record[name] = answer[name]
    status = AGENT_STATUS.get(answer.get("status", ""), FAILED)
    if status == CANCELLED and not record.get("cancel_requested"):
        status = TIMED_OUT
    record["status"] = status
    record["duration_ms"] = answer.get("duration_ms")


def fail_internal(record: ExecutionRecord, exc: BaseException) -> None:
    """End the record `failed` for an error of Shoal's own, not of the user's code. The client
    learns what kind of error it was; the details (which may name hosts, paths or URLs) stay in
    the host's log, under the execution's id."""
    value = (
        f"Shoal could not run this execution because of an error on its host "
        f"({type(exc).__name__}); the host's log has the details under {record['id']}"
    )
    record["status"] = FAILED
    record["error"] = {"name": "InternalError", "value": value, "traceback": ""}
    record["stderr"] = f"InternalError: {value}"


def guest_phases(answer: dict[str, Any]) -> dict[str, float] | None:
    """The agent's `phases_ms` (where the guest's time went) when well formed, for the latency
    breakdown of scripts/bench; anything else from the guest is dropped."""
    phases = answer.get("phases_ms")
    if not isinstance(phases, dict) or len(phases) > 8:
        return None
    if not all(
        isinstance(k, str) and len(k) <= 32 and isinstance(v, int | float) and v == v
        for k, v in phases.items()
    ):
        return None
    return phases


# A final record up to this size also travels in the done list, so a waiting request has it
# without reading it back; a larger one (images, long output) is read from its key.
INLINE_DONE_BYTES = 64 << 10


# How long a "done" list waits to be read.
DONE_TTL_S = 600


def finish(r: redis.Redis | redis.client.Pipeline, record: ExecutionRecord, ttl_s: int) -> None:
    """Store the final record and wake whoever waits for it. Given a pipeline, only queue the
    commands (the caller executes it with its own).

    The record replaces the queued one in what its tenant holds in Redis (shoal/storage.py),
    with the copy in the done list: always stored, even past the tenant's cap (a result is
    never lost); the tenant's next submission is refused instead."""
    record["finished_at"] = time.time()
    done = keys.execution_done(record["id"])
    pipe = r if isinstance(r, redis.client.Pipeline) else r.pipeline()
    body = save(pipe, record, ttl_s)
    inline = len(body) <= INLINE_DONE_BYTES
    pipe.rpush(done, body if inline else "1")
    pipe.expire(done, DONE_TTL_S)
    counted = [("exec:" + record["id"], len(body), ttl_s)]
    if inline:
        counted.append(("done:" + record["id"], len(body), DONE_TTL_S))
    storage.charge(pipe, record["tenant"], counted)
    pipe.zrem(keys.session_executions(record["session_id"]), record["id"])
    pipe.zrem(keys.tenant_executions(record["tenant"]), record["id"])
    if pipe is not r:
        pipe.execute()


def wait_done(r: redis.Redis, execution_id: str, timeout_s: float) -> ExecutionRecord | None:
    """Block until the execution ends or `timeout_s` passes; its final record when it ended."""
    done = keys.execution_done(execution_id)
    popped = r.blpop([done], timeout=max(timeout_s, 0.01))
    if popped is None:
        return None
    _key, body = popped
    if body != "1":
        with contextlib.suppress(ValueError):
            record = json.loads(body)
            if isinstance(record, dict) and record.get("id") == execution_id:
                return record
    return load(r, execution_id)


def public_view(record: ExecutionRecord) -> dict[str, Any]:
    """The execution object of the native API."""

    def stamp(value: float | None) -> str | None:
        return iso(value) if value else None

    view = {
        "id": record["id"],
        "session_id": record["session_id"],
        "language": record["language"],
        "status": record["status"],
    }
    for name in RESULT_FIELDS:
        view[name] = record[name] if name in record else LATER_FIELDS[name]
    view.update(
        created_at=stamp(record["created_at"]),
        started_at=stamp(record["started_at"]),
        finished_at=stamp(record["finished_at"]),
        duration_ms=record["duration_ms"],
    )
    return view
