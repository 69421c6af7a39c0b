"""Execution records in Redis: created by the API, advanced by the session's host worker.

Statuses: queued -> running -> succeeded | failed | timed_out | cancelled | lost.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from typing import Any

import redis

from shoal import keys
from shoal.errors import ExecutionNotFound
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


def save(r: redis.Redis | redis.client.Pipeline, record: ExecutionRecord, ttl_s: int) -> str:
    """Store the record; return the JSON stored."""
    body = json.dumps(record)
    r.set(keys.execution(record["id"]), body, ex=ttl_s)
    return body


# Atomically: unless a cancel is waiting for the execution (KEYS[2]), store its running record.
_MARK_RUNNING = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


def mark_running(r: redis.Redis, record: ExecutionRecord, ttl_s: int) -> bool:
    """Store the (running) record in one round trip; False, storing nothing, when the
    execution was cancelled before it started."""
    keys_ = [keys.execution(record["id"]), keys.execution_cancel(record["id"])]
    return bool(r.eval(_MARK_RUNNING, 2, *keys_, json.dumps(record), int(ttl_s)))


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


def finish(r: redis.Redis | redis.client.Pipeline, record: ExecutionRecord, ttl_s: int) -> None:
    """Store the final record and wake whoever waits for it. Given a pipeline, only queue the
    commands (the caller executes it with its own)."""
    record["finished_at"] = time.time()
    done = keys.execution_done(record["id"])
    pipe = r if isinstance(r, redis.client.Pipeline) else r.pipeline()
    body = save(pipe, record, ttl_s)
    pipe.rpush(done, body if len(body) <= INLINE_DONE_BYTES else "1")
    pipe.expire(done, 600)
    pipe.zrem(keys.session_executions(record["session_id"]), record["id"])
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
