"""The host runtime: the one process on a host that owns every VM and its agent channel.

Celery tasks (workers/tasks.py) are thin wrappers around the methods here. The runtime is made
once per worker process, after the fork, so its libvirt connection and agent sockets are its own.
Pools arrive by name and are read from this host's own configuration (shoal/pools.py).

A session's VM is declared lost in one place, `mark_session_lost`: its registry entry says why
and the VM is destroyed. Whatever goes wrong in an execution, its record ends in a final status
and the session's turn passes on (`_run`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis

from pool.ready import ReadyVMs, new_vm_id
from shoal import (
    executions,
    images,
    keys,
    metrics,
    redis_conn,
    replies,
    sessions,
    transfers,
    webhooks,
)
from shoal.celery_app import celery_for
from shoal.errors import SessionLost, ShoalError, from_agent
from shoal.pools import Pool, all_pools, get_pool
from shoal.records import ExecutionRecord, Heartbeat, SessionEntry
from shoal.settings import Settings
from workers.agent_client import AgentClientError, AgentError
from workers.session_queue import SessionQueues
from workers.vm import VMManager, VMSpec
from workers.vm_errors import AgentRefused, VMLost

log = logging.getLogger("shoal.host")


def spec_for(pool: Pool) -> VMSpec:
    return VMSpec(
        image=pool.image,
        vcpus=pool.vcpus,
        memory_mib=pool.memory_mib,
        data_disk_mib=pool.data_disk_mib,
        network=pool.network,
    )


class HostRuntime:
    def __init__(
        self,
        settings: Settings,
        *,
        r: redis.Redis | None = None,
        rb: redis.Redis | None = None,
        vms: VMManager | None = None,
    ) -> None:
        """Redis clients and the VM manager are made from `settings` unless given (tests)."""
        self.settings = settings
        self.host = settings.host_name
        self.r = r or redis_conn.client(settings)
        self.rb = rb or redis_conn.binary_client(settings)
        self.vms = vms or VMManager(settings)
        self.queues = SessionQueues()  # each session's work, one piece at a time
        self.session_vm: dict[str, str] = {}  # session id -> the id its VM has in self.vms
        self.ready = ReadyVMs(self._start_ready_vm, settings.restore_parallel)
        self._stop = threading.Event()
        # The default pool's snapshot template: "building", "ready" or "failed: <why>". Until it
        # is ready, /healthz says so: a session made before would cold-boot (seconds, not ms).
        self.template_state = "building"
        self.started_at = time.time()

    # --- start-up and background duties -----------------------------------------------------
    def start(self, default_spec: VMSpec) -> None:
        self.r.sadd(keys.hosts(), self.host)
        self.beat_once()
        self.publish_image_info(default_spec)
        self.reconcile()
        self.resume_executions()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(
            target=self._warm_up, args=(default_spec,), name="warm-up", daemon=True
        ).start()

    def stop(self) -> None:
        self._stop.set()

    def publish_image_info(self, spec: VMSpec) -> None:
        """Put the image's Python version and packages where the API's `metadata` finds them."""
        artifacts = images.locate(self.settings, spec.image)
        if artifacts is None:
            return
        python = artifacts.read_manifest().get("python", {})
        info = {
            "python_version": python.get("version", ""),
            "python_packages": python.get("packages", {}),
        }
        self.r.set(keys.image_info(spec.image), json.dumps(info))

    def _warm_up(self, spec: VMSpec) -> None:
        """Build the default pool's snapshot template, then fill the ready pools."""
        try:
            self.vms.ensure_template(spec)
            self.template_state = "ready"
        except Exception as exc:
            log.exception("host=%s building the snapshot template failed", self.host)
            self.template_state = f"failed: {exc}"
        self.beat_once()
        self.replenish()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self.beat_once()
            except Exception:
                log.exception("host=%s heartbeat failed", self.host)

    def beat_once(self) -> None:
        live = self._live_sessions()
        pools: dict[str, dict[str, int]] = {}
        for name, state in self.ready.counts().items():
            pools[name] = {"ready": state["ready"], "starting": state["starting"], "busy": 0}
        for entry in live.values():
            counts = pools.setdefault(entry["pool"], {"ready": 0, "starting": 0, "busy": 0})
            counts["busy"] += 1
        status: Heartbeat = {
            "host": self.host,
            "at": time.time(),
            "started_at": self.started_at,
            "sessions": len(live),
            "vms": len(live) + sum(c["ready"] + c["starting"] for c in pools.values()),
            "max_vms": self.settings.host_max_vms,
            "template": self.template_state,
            "pools": pools,
            "pool_errors": {
                name: state["last_error"]
                for name, state in self.ready.counts().items()
                if state["last_error"]
            },
            "driver": self.vms.status(),
        }
        ttl = max(int(self.settings.heartbeat_ttl_s), 1)
        self.r.set(keys.host_heartbeat(self.host), json.dumps(status), ex=ttl)

    def _live_sessions(self) -> dict[str, SessionEntry]:
        """Registry entries of the sessions placed on this host that are not lost or gone."""
        ids = sorted(sessions.host_session_ids(self.r, self.host))
        pipe = self.r.pipeline()
        for session_id in ids:
            pipe.hgetall(keys.session(session_id))
        return {
            session_id: entry
            for session_id, entry in zip(ids, pipe.execute(), strict=True)
            if entry.get("state") in (sessions.CREATING, sessions.ACTIVE)
        }

    def reconcile(self) -> None:
        """Adopt this host's live domains, destroy strays, mark vanished sessions lost."""
        vm_owner = {
            entry.get("vm") or session_id: session_id
            for session_id, entry in self._live_sessions().items()
        }
        known = set(vm_owner) | self.ready.ids()
        report = self.vms.reconcile(known)
        for vm_id in report.missing:
            session_id = vm_owner.get(vm_id)
            if session_id is None:
                continue
            log.warning("session=%s host=%s domain vanished: marked lost", session_id, self.host)
            self.mark_session_lost(session_id, "its VM vanished from the host")
        if report.destroyed:
            log.warning("host=%s destroyed stray domains %s", self.host, report.destroyed)

    def resume_executions(self) -> None:
        """Executions an earlier worker of this host left unfinished (it stopped or was killed;
        what waited in its session queues is only in Redis now): the queued ones run in their
        turn, in the background; one that was running ended with that worker (its answer went
        with it) and ends `lost`, never run twice."""
        for session_id, entry in self._live_sessions().items():
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

    # --- ready pools -------------------------------------------------------------------------
    def _start_ready_vm(self, vm_id: str, pool: Pool) -> None:
        spec = spec_for(pool)
        self.vms.ensure_template(spec)
        vm = self.vms.create(vm_id, spec)
        # The first execution after a restore is slow under TCG (~100-300 ms) while QEMU
        # translates the guest's code again; pay it here, not in the user's first request.
        try:
            vm.execute("pass", "python", 60, 64)
        except Exception:
            self.vms.destroy(vm_id)  # nobody owns it yet but this host: never leave it running
            raise

    def replenish(self) -> None:
        """Top every pool up to its ready target on this host (bounded, in the background)."""
        if self._stop.is_set():
            return
        live_vms = len(self.vms.list_vms())
        if live_vms >= self.settings.host_max_vms:
            return
        self.ready.replenish(p for p in all_pools(self.settings).values() if p.ready_target > 0)

    # --- sessions ----------------------------------------------------------------------------
    def create_session(self, session_id: str, pool_name: str, reply_key: str) -> None:
        """Give the session a VM and answer its creator on `reply_key`; a failure marks the
        session lost and says why."""
        try:
            self._give_vm(session_id, get_pool(self.settings, pool_name))
            replies.send(self.r, reply_key, {"ok": True})
        except ShoalError as exc:
            replies.send_error(self.r, reply_key, exc)
        except Exception as exc:
            log.exception("session=%s host=%s creating the VM failed", session_id, self.host)
            self.mark_session_lost(session_id, f"creating its VM failed: {exc}")
            error = ShoalError(f"creating the session's VM failed: {exc}")
            replies.send_error(self.r, reply_key, error)

    def _give_vm(self, session_id: str, pool: Pool) -> None:
        """A ready VM when the pool has one, else one restored on demand."""
        started = time.monotonic()
        vm_id = self.ready.take(pool.name)
        warm = vm_id is not None
        if vm_id is None:
            vm_id = new_vm_id()
            self.vms.create(vm_id, spec_for(pool))
        self.session_vm[session_id] = vm_id  # so that a failure from here on destroys it
        if not sessions.activate(self.r, session_id, vm_id, warm):
            self.vms.destroy(vm_id)  # nobody will ever use it: the session is gone
            self.session_vm.pop(session_id, None)
            raise ShoalError(f"session {session_id} ended before its VM was ready")
        self.queues.start(session_id)
        log.info(
            "session=%s host=%s vm=%s created in %.0f ms (%s)",
            session_id,
            self.host,
            vm_id,
            (time.monotonic() - started) * 1000,
            "from the ready pool" if warm else "on demand",
        )
        if warm:
            self.replenish()
        metrics.incr(self.r, "shoal_session_acquisitions_total", pool=pool.name,
                     source="ready" if warm else "cold")  # fmt: skip
        self.beat_once()  # placement and pool counts see the acquisition at once

    def _vm_id(self, session_id: str) -> str:
        vm_id = self.session_vm.get(session_id)
        if vm_id is None:
            vm_id = self.r.hget(keys.session(session_id), "vm") or session_id
            self.session_vm[session_id] = vm_id
        return vm_id

    def destroy_session(self, session_id: str) -> None:
        self.vms.destroy(self._vm_id(session_id))
        self.session_vm.pop(session_id, None)
        for execution_id in self.queues.drop(session_id):
            self._end_unrun(execution_id, "the session ended before this execution's turn")
        log.info("session=%s host=%s destroyed", session_id, self.host)

    def _end_unrun(self, execution_id: str, why: str) -> None:
        """End an execution that waited here and will never run: `cancelled`, saying why."""
        record = executions.load(self.r, execution_id)
        if record is None or record["status"] in executions.FINAL:
            return
        record["stderr"] = why
        self._finish_cancelled(record)

    def mark_session_lost(self, session_id: str, reason: str) -> None:
        """The one place a session's VM is declared lost: the registry says why, the VM goes
        (even when Redis cannot be written)."""
        try:
            if sessions.mark_lost(self.r, session_id, reason):
                metrics.incr(self.r, "shoal_sessions_lost_total")
        finally:
            self.vms.destroy(self._vm_id(session_id))
            self.session_vm.pop(session_id, None)

    def _vm(self, session_id: str, pool: Pool):
        vm_id = self._vm_id(session_id)
        vm = self.vms.get(vm_id) or self.vms.attach(vm_id, spec_for(pool))
        if vm is None:
            raise SessionLost(f"session {session_id} has no VM on host {self.host}")
        return vm

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
            pipe = self.r.pipeline(transaction=False)
            self._end_turn(pipe, record)
            sessions.touch(pipe, session_id, cooldown_s)
            metrics.incr(pipe, "shoal_executions_total", pool=pool_name, status=record["status"])
            seconds = record["finished_at"] - record["started_at"]
            metrics.observe(pipe, "shoal_execution_seconds", seconds, pool=pool_name)
            pipe.execute()
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

    def _lose(self, record: ExecutionRecord, reason: str) -> None:
        record["status"] = executions.LOST
        record["stderr"] = f"The session was lost: {reason}"
        try:
            self.mark_session_lost(record["session_id"], reason)
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

    # --- files -------------------------------------------------------------------------------
    def file_op(self, session_id: str, op: str, args: dict, reply_key: str, pool_name: str) -> None:
        """list / stat / delete, answered on `reply_key`."""
        action = lambda vm: self._FILE_OPS[op](vm.agent, **args)  # noqa: E731
        self._reply(reply_key, action, session_id, pool_name)

    _FILE_OPS = {
        "list": lambda agent, path="", recursive=False: {
            "files": agent.list_files(path, recursive)
        },
        "stat": lambda agent, path: {"file": agent.stat(path)},
        "delete": lambda agent, path: {"deleted": agent.delete(path) or True},
    }

    def put_file(
        self, session_id: str, transfer_id: str, path: str, reply_key: str, pool_name: str
    ) -> None:
        """Stream a transfer's chunks into the guest file `path`. When the guest refuses the
        path or a write fails, the transfer is cancelled first, so the API stops sending at once
        and answers the error."""

        def put(vm) -> dict:
            try:
                return {"file": vm.agent.put_file(path, transfers.consume(self.rb, transfer_id))}
            except BaseException:
                transfers.cancel(self.rb, transfer_id)
                raise

        self._reply(reply_key, put, session_id, pool_name)

    def get_file(
        self, session_id: str, transfer_id: str, path: str, reply_key: str, pool_name: str
    ) -> None:
        """Answer with the file's stat on `reply_key`, then stream its bytes into the transfer.

        The agent opens the file before anything is answered: a directory, a symbolic link, a
        FIFO, a socket or a device is refused on `reply_key` like any other error. A failure
        after the answer (the guest, the VM, Redis) ends the transfer with ABORT (produce), so
        the waiting request learns it at once; a client that left cancels the transfer, and the
        agent's stream is stopped."""

        def get(vm) -> dict:
            info, chunks = vm.agent.open_file(path)
            try:
                replies.send(self.r, reply_key, {"ok": True, "file": info})
                transfers.produce(self.rb, transfer_id, chunks)
            except BaseException as exc:
                log.warning("session=%s host=%s download stopped midway (%s)",
                            session_id, self.host, type(exc).__name__)  # fmt: skip
                raise
            finally:
                chunks.close()
            return {}

        self._reply(reply_key, get, session_id, pool_name, reply_on_success=False)

    def _reply(self, reply_key, action, session_id, pool_name, reply_on_success=True) -> None:
        """Run a file operation at the session's next free moment; answer on `reply_key`."""
        work = lambda: self._answer(reply_key, action, session_id, pool_name, reply_on_success)  # noqa: E731
        self.queues.other(session_id, work, lambda: self._done_seq(session_id))

    def _answer(self, reply_key, action, session_id, pool_name, reply_on_success) -> None:
        try:
            pool = get_pool(self.settings, pool_name)
            result = action(self._vm(session_id, pool))
            if reply_on_success:
                replies.send(self.r, reply_key, {"ok": True, **result})
            sessions.touch(self.r, session_id, pool.cooldown_s)
        except AgentError as exc:
            replies.send_error(self.r, reply_key, from_agent(exc.code, exc.message))
        except AgentRefused as exc:
            replies.send_error(self.r, reply_key, from_agent(exc.code, exc.agent_message))
        except AgentClientError as exc:
            # Garbage, a flood, silence or a hang-up from the guest: it is not trusted again.
            self.mark_session_lost(session_id, f"its agent broke the protocol: {exc}")
            replies.send_error(self.r, reply_key, SessionLost(f"the session was lost: {exc}"))
        except ShoalError as exc:
            replies.send_error(self.r, reply_key, exc)
        except transfers.TransferAborted as exc:
            log.info("session=%s host=%s upload abandoned by the client", session_id, self.host)
            replies.send_error(self.r, reply_key, ShoalError(str(exc)))
        except VMLost as exc:
            self.mark_session_lost(session_id, str(exc))
            replies.send_error(self.r, reply_key, SessionLost(f"the session was lost: {exc}"))
        except Exception as exc:  # the host's own fault: the waiting request hears it at once
            log.exception("session=%s host=%s file operation failed", session_id, self.host)
            error = ShoalError(f"the file operation failed on the host ({type(exc).__name__})")
            replies.send_error(self.r, reply_key, error)
