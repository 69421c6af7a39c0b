"""A host's executions: each runs in its session's turn, and its record always ends.

Part of the host runtime (workers/host.py `HostRuntime`, which provides `r`, `host`,
`settings`, `queues`, `vms`, `mark_session_lost`, `_vm`, `_vm_id` and `_live_sessions`). An
execution arrives as a task carrying its record; it runs at once when its session is free, or
waits in the session's queue (workers/session_queue.py) holding no thread. Whatever goes wrong,
its record ends in a final status and the session's turn passes on (`_run`): an error of the
host's own ends it `failed` (InternalError), a guest that breaks the protocol ends it `lost` with
its VM. A worker that starts again resumes what its predecessor left queued
(`resume_executions`), and an execution runs at most once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis

from shoal import executions, keys, metrics, sessions, webhooks
from shoal.celery_app import celery_for
from shoal.errors import SessionLost, ShoalError
from shoal.pools import Pool, get_pool
from shoal.records import ExecutionRecord
from workers.agent_client import AgentClientError
from workers.vm_errors import AgentRefused, VMLost

log = logging.getLogger("shoal.host")

# How long a finished execution's worker keeps trying to store its end while Redis is down.
FINISH_RETRY_S = 60.0
FINISH_RETRY_PAUSE_S = 0.5


class ExecutionsOnHost:
    # --- executions --------------------------------------------------------------------------
    def execute(self, execution_id: str, pool_name: str, record_json: str) -> None:
        """Run an execution in its turn. The task carries the record as the API stored it
        (status queued), so the worker need not read it back."""
        try:
            record: ExecutionRecord = json.loads(record_json)
            if not isinstance(record, dict) or record.get("id") != execution_id:
                raise ValueError("the task does not carry this execution's record")
            session_id = record["session_id"]
        except Exception as exc:
            self._fail_stored(execution_id, pool_name, exc)
            return
        record["timings"] = {"received_at": time.time()}  # for scripts/bench's breakdown
        self.queues.execution(
            session_id,
            record["seq"],
            execution_id,
            lambda: self._run(record, pool_name),
            lambda: self._done_seq(session_id),
        )

    def _fail_stored(self, execution_id: str, pool_name: str, exc: Exception) -> None:
        """A task this worker cannot read: end the stored record, so it never stays queued."""
        log.error("execution=%s host=%s unreadable task: %s", execution_id, self.host, exc)
        record = executions.load(self.r, execution_id)
        if record is not None and record["status"] not in executions.FINAL:
            record["started_at"] = time.time()
            executions.fail_internal(record, exc)
            self._finish(record, pool_name)

    def _done_seq(self, session_id: str) -> int:
        """Where a session new to this worker stands; when Redis cannot say, its executions
        wait for predecessors that may never come for at most PREDECESSOR_WAIT_S."""
        try:
            return int(self.r.hget(keys.session(session_id), "done_seq") or 0)
        except Exception:
            log.exception("session=%s host=%s reading its turn failed", session_id, self.host)
            return 0

    def _cancel_requested(self, execution_id: str) -> bool:
        return bool(self.r.exists(keys.execution_cancel(execution_id)))

    def _finish_cancelled(self, record: ExecutionRecord) -> None:
        record["status"] = executions.CANCELLED
        record["cancel_requested"] = True
        pipe = self.r.pipeline(transaction=False)
        self._end_turn(pipe, record)
        pipe.execute()
        self._notify(record)

    def _end_turn(self, pipe: Any, record: ExecutionRecord) -> None:
        """Queue on `pipe`: the final record (which wakes its waiter) and the session's turn
        passed on. One connection keeps them in order, so no MULTI/EXEC is needed."""
        executions.finish(pipe, record, self.settings.execution_ttl_s)
        pipe.hset(keys.session(record["session_id"]), "done_seq", record["seq"])

    def _notify(self, record: ExecutionRecord) -> None:
        """Queue the execution's webhook (shoal/webhooks.py) when it asked for one."""
        if record.get("callback_url"):
            webhooks.schedule_for_execution(
                self.r, celery_for(self.settings), record, self.settings.execution_ttl_s
            )

    def _run(self, record: ExecutionRecord, pool_name: str) -> None:
        """Run the execution and end its record, whatever happens on the way: an error of the
        host's own ends it `failed` (InternalError), a guest that breaks the protocol ends it
        `lost` with its VM. Either way the session's turn passes on and its idle clock runs."""
        queued: ExecutionRecord = dict(record)  # type: ignore[assignment]
        record["status"] = executions.RUNNING
        record["started_at"] = time.time()
        cooldown_s = self.settings.cooldown_s
        try:
            pool = get_pool(self.settings, pool_name)
            cooldown_s = pool.cooldown_s
            started = executions.mark_running(self.r, record, self.settings.execution_ttl_s)
            if started == executions.CANCELLED_FIRST:
                self._finish_cancelled(queued)  # it never runs
                return
            if started == executions.NOT_QUEUED:
                log.info("execution=%s host=%s ran already; not again", record["id"], self.host)
                return
            self._run_in_vm(record, pool)
        except Exception as exc:
            log.exception(
                "session=%s execution=%s host=%s failed on the host",
                record["session_id"],
                record["id"],
                self.host,
            )
            executions.fail_internal(record, exc)
        self._finish(record, pool_name, cooldown_s)

    def _run_in_vm(self, record: ExecutionRecord, pool: Pool) -> None:
        """Send the code to the session's VM and copy the answer into the record."""
        try:
            vm = self._vm(record["session_id"], pool)
            answer = vm.execute(
                record["code"], record["language"], record["timeout_s"], record["max_output"]
            )
            timings = record["timings"]
            timings["answered_at"] = time.time()
            timings["guest"] = executions.guest_phases(answer)
            if answer.get("status") == "interrupted":
                record["cancel_requested"] = self._cancel_requested(record["id"])
            executions.apply_agent_result(record, answer)
        except AgentRefused as exc:
            record["status"] = executions.FAILED
            record["stderr"] = f"The session refused the execution: {exc}"
        except (VMLost, SessionLost) as exc:
            self._lose(record, str(exc))
        except AgentClientError as exc:
            self._lose(record, f"its agent broke the protocol: {exc}")
        except ShoalError as exc:
            record["status"] = executions.FAILED
            record["stderr"] = exc.message

    def _finish(
        self, record: ExecutionRecord, pool_name: str, cooldown_s: int | None = None
    ) -> None:
        """One round trip: the final record, the waiter's wake-up, the turn, the idle clock
        and the metrics; then the webhook, if one was asked for."""
        session_id = record["session_id"]
        cooldown_s = cooldown_s or self.settings.cooldown_s
        try:
            self._store_final(record, pool_name, cooldown_s)
            self._notify(record)
        except Exception:
            log.exception(
                "session=%s execution=%s host=%s storing the final record failed",
                session_id,
                record["id"],
                self.host,
            )
        log.info(
            "session=%s execution=%s host=%s status=%s duration_ms=%s",
            session_id,
            record["id"],
            self.host,
            record["status"],
            record["duration_ms"],
        )

    def _store_final(self, record: ExecutionRecord, pool_name: str, cooldown_s: int) -> None:
        """Write the final record; while Redis does not answer (it restarts), try again for
        up to FINISH_RETRY_S, so the record does not stay `running` for ever."""
        deadline = time.monotonic() + FINISH_RETRY_S
        while True:
            try:
                pipe = self.r.pipeline(transaction=False)
                self._end_turn(pipe, record)
                sessions.touch(pipe, record["session_id"], cooldown_s)
                metrics.incr(pipe, "shoal_executions_total", pool=pool_name,
                             status=record["status"])  # fmt: skip
                seconds = record["finished_at"] - record["started_at"]
                metrics.observe(pipe, "shoal_execution_seconds", seconds, pool=pool_name)
                pipe.execute()
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("execution=%s host=%s Redis unavailable storing its end (%s); "
                            "retrying", record["id"], self.host, exc)  # fmt: skip
                time.sleep(FINISH_RETRY_PAUSE_S)

    def _lose(self, record: ExecutionRecord, reason: str) -> None:
        record["status"] = executions.LOST
        record["stderr"] = f"The session was lost: {reason}"
        try:
            reason = self.mark_session_lost(record["session_id"], reason)
            record["stderr"] = f"The session was lost: {reason}"
        except Exception:  # the record still says lost; the operator's log says what failed
            log.exception("session=%s host=%s marking it lost failed", record["session_id"],
                          self.host)  # fmt: skip

    def cancel(self, execution_id: str) -> None:
        """Interrupt the execution if it is running here; a queued one sees the cancel mark
        when its turn comes and ends `cancelled` without running."""
        record = executions.load(self.r, execution_id)
        if record is None:
            return
        if self.queues.running_execution(record["session_id"]) == execution_id:
            vm = self.vms.get(self._vm_id(record["session_id"]))
            if vm is not None:
                vm.agent.interrupt()
        elif record["status"] == executions.QUEUED:
            self._finish_cancelled(record)

    def resume_executions(self) -> None:
        """Executions an earlier worker of this host left unfinished (it stopped or was killed;
        what waited in its session queues is only in Redis now): the queued ones run in their
        turn, in the background; one that was running ended with that worker (its answer went
        with it) and ends `lost`, never run twice."""
        for session_id, entry in self._live_sessions(sessions.HELD_STATES).items():
            queued = []
            for execution_id in self.r.zrange(keys.session_executions(session_id), 0, -1):
                record = executions.load(self.r, execution_id)
                if record is None or record["status"] in executions.FINAL:
                    continue
                if record["status"] == executions.RUNNING:
                    record["started_at"] = record["started_at"] or time.time()
                    record["status"] = executions.LOST
                    record["stderr"] = (
                        "The host's worker stopped while this execution ran; its result is gone "
                        "(an execution is never run twice)"
                    )
                    self._finish(record, entry["pool"])
                else:
                    queued.append(record)
            if queued:
                log.info("session=%s host=%s resuming %d queued execution(s)", session_id,
                         self.host, len(queued))  # fmt: skip
                threading.Thread(
                    target=self._resume, args=(entry["pool"], queued), daemon=True
                ).start()

    def _resume(self, pool_name: str, records: list[ExecutionRecord]) -> None:
        for record in records:
            self.execute(record["id"], pool_name, json.dumps(record))

    def _end_unrun(self, execution_id: str, why: str) -> None:
        """End an execution that waited here and will never run: `cancelled`, saying why."""
        record = executions.load(self.r, execution_id)
        if record is None or record["status"] in executions.FINAL:
            return
        record["stderr"] = why
        self._finish_cancelled(record)
