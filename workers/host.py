"""The host runtime: the one process on a host that owns every VM and its agent channel.

Celery tasks (workers/tasks.py) are thin wrappers around the methods here. The runtime is made
once per worker process, after the fork, so its libvirt connection and agent sockets are its own.
Pools arrive by name and are read from this host's own configuration (shoal/pools.py).

A session's VM is declared lost in one place, `mark_session_lost`: its registry entry says why
and the VM is destroyed. Executions (workers/host_executions.py) and file operations
(workers/host_files.py) are parts of the runtime in modules of their own.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import redis

from pool.ready import ReadyVMs, new_vm_id
from pool.sizing import ready_changes
from shoal import (
    host_memory,
    images,
    keys,
    metrics,
    redis_conn,
    replies,
    sessions,
)
from shoal.errors import HostStorageFull, NoHostAvailable, SessionLost, ShoalError
from shoal.pools import Pool, all_pools, get_pool
from shoal.records import Heartbeat, SessionEntry
from shoal.settings import Settings
from workers.host_executions import ExecutionsOnHost
from workers.host_files import FilesOnHost
from workers.host_forks import ForksOnHost
from workers.host_sleep import SleepOnHost
from workers.running_vm import VMSpec, spec_for
from workers.session_queue import SessionQueues
from workers.vm import VMManager
from workers.vm_errors import out_of_space

log = logging.getLogger("shoal.host")

# Every this many heartbeats the host destroys VM domains and directories nobody owns.
SWEEP_EVERY_BEATS = 10
DISK_FULL_REASON = (
    "the host's disk is full: its VM paused on a write to its disk (no space left on device)"
)


class HostRuntime(ExecutionsOnHost, FilesOnHost, SleepOnHost, ForksOnHost):
    """The host's VMs, its sessions and their work; executions, file operations, sleep and
    forks live in workers/host_executions.py, host_files.py, host_sleep.py and host_forks.py."""

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
        # Each VM that joins a ready pool is announced at once: placement sends new sessions
        # to hosts with ready VMs, and a heartbeat can be SHOAL_HEARTBEAT_S old.
        self.ready = ReadyVMs(self._start_ready_vm, settings.restore_parallel, self.beat_once)
        self._stop = threading.Event()
        self._fork_threads, self._fork_lock = None, threading.Lock()
        self._forks_reserved = self._forks_reserved_mib = 0
        # The default pool's snapshot template: "building", "ready" or "failed: <why>". Until it
        # is ready, /healthz says so: a session made before would cold-boot (seconds, not ms).
        self.template_state = "building"
        self.started_at = time.time()

    # --- start-up and background duties -----------------------------------------------------
    def start(self, default_spec: VMSpec) -> None:
        self.vms.domains.shared.active()  # the memory broker: before any VM starts
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
        beats = 0
        while not self._stop.wait(self.settings.heartbeat_s):
            beats += 1
            try:
                self.beat_once()
            except Exception:
                log.exception("host=%s heartbeat failed", self.host)
            if beats % SWEEP_EVERY_BEATS == 0:
                try:
                    self.vms.sweep(self._owned_vm_ids)
                except Exception:
                    log.exception("host=%s sweeping unowned VMs failed", self.host)

    def _owned_vm_ids(self) -> set[str]:
        """The VMs this host must keep: its live sessions' (the registry's and those being
        handed over right now) and its ready pools'."""
        held = self._live_sessions(sessions.HELD_STATES)  # sleeping ones keep their files
        owners = {entry.get("vm") or sid for sid, entry in held.items()}
        return owners | set(self.session_vm.values()) | self.ready.ids()

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
            "memory": self.memory().as_dict(),
        }
        ttl = max(int(self.settings.heartbeat_ttl_s), 1)
        self.r.set(keys.host_heartbeat(self.host), json.dumps(status), ex=ttl)

    def _live_sessions(
        self, states: tuple[str, ...] = (sessions.CREATING, sessions.ACTIVE)
    ) -> dict[str, SessionEntry]:
        """Registry entries of the sessions placed on this host in `states` (by default those
        whose VM runs or is being made: not asleep, lost or gone)."""
        ids = sorted(sessions.host_session_ids(self.r, self.host))
        pipe = self.r.pipeline()
        for session_id in ids:
            pipe.hgetall(keys.session(session_id))
        return {
            session_id: entry
            for session_id, entry in zip(ids, pipe.execute(), strict=True)
            if entry.get("state") in states
        }

    def reconcile(self) -> None:
        """Adopt this host's live domains, destroy strays, mark vanished sessions lost."""
        vm_owner = {
            entry.get("vm") or session_id: session_id
            for session_id, entry in self._live_sessions(sessions.HELD_STATES).items()
        }
        known = set(vm_owner) | self.ready.ids()
        report = self.vms.reconcile(known)
        for vm_id in report.missing:
            session_id = vm_owner.get(vm_id)
            if session_id is None or self.vms.is_asleep(vm_id):
                continue  # a sleeping session's VM has no domain: its image is its state
            log.warning("session=%s host=%s domain vanished: marked lost", session_id, self.host)
            self.mark_session_lost(session_id, "its VM vanished from the host")
        if report.destroyed:
            log.warning("host=%s destroyed stray domains %s", self.host, report.destroyed)

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

    def memory(self) -> host_memory.HostMemory:
        return host_memory.read(self.settings.host_memory_reserve_mib)

    def replenish(self) -> None:
        """Bring every pool's ready VMs on this host to what its memory allows (pool/sizing.py):
        start restores in the background, destroy the ready VMs let go."""
        if self._stop.is_set():
            return
        pools = [p for p in all_pools(self.settings).values() if p.ready_ceiling > 0]
        held = self.ready.held()
        changes = ready_changes(pools, held, self.memory())
        for name, change in changes.items():
            for vm_id in self.ready.let_go(name, -change) if change < 0 else ():
                log.info("pool=%s vm=%s let go (host short of memory)", name, vm_id)
                self.vms.destroy(vm_id)
        room = self.settings.host_max_vms - len(self.vms.list_vms()) - self._forks_reserved
        goals = []
        for pool in pools:
            start = min(max(changes[pool.name], 0), max(room, 0))
            room -= start
            goals.append((pool, held.get(pool.name, 0) + start))
        self.ready.replenish(goals)

    # --- sessions ----------------------------------------------------------------------------
    def create_session(self, session_id: str, pool_name: str, reply_key: str) -> None:
        """Give the session a VM and answer its creator on `reply_key`; a failure marks the
        session lost and says why."""
        try:
            pool = get_pool(self.settings, pool_name)
            warm = self._give_vm(session_id, pool)
            replies.send(self.r, reply_key, {"ok": True})
        except ShoalError as exc:
            replies.send_error(self.r, reply_key, exc)
        except Exception as exc:
            log.exception("session=%s host=%s creating the VM failed", session_id, self.host)
            if out_of_space(exc):
                error: ShoalError = HostStorageFull(
                    f"host {self.host} has no disk space left for a new VM; nothing was "
                    "started: retry once space is freed"
                )
            else:
                error = ShoalError(f"creating the session's VM failed: {exc}")
            self.mark_session_lost(session_id, error.message)
            replies.send_error(self.r, reply_key, error)
        else:
            self._acquired(pool, warm)

    def _acquired(self, pool: Pool, warm: bool) -> None:
        """Once the creator has its answer (none of this is on its path): count the
        acquisition, refill the pool, and let placement see the new counts at once."""
        try:
            metrics.incr(self.r, "shoal_session_acquisitions_total", pool=pool.name,
                         source="ready" if warm else "cold")  # fmt: skip
            if warm:
                self.replenish()
            self.beat_once()
        except Exception:
            log.exception("host=%s after an acquisition from pool %s", self.host, pool.name)

    def _give_vm(self, session_id: str, pool: Pool) -> bool:
        """A ready VM when the pool has one (True), else one restored on demand (False)."""
        started = time.monotonic()
        vm_id = self.ready.take(pool.name)
        warm = vm_id is not None
        if vm_id is None:
            self._check_memory(pool)
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
        return warm

    def _check_memory(self, pool: Pool) -> None:
        """Placement read a heartbeat seconds old; the host itself refuses a VM its memory
        cannot hold above the reserve."""
        memory = self.memory()
        if memory.room_for(pool.memory_mib) < 1:
            raise NoHostAvailable(
                f"host {self.host} is short of memory for a {pool.memory_mib} MiB VM "
                f"({memory.available_mib} MiB available, {memory.reserve_mib} MiB kept free): "
                "retry when sessions end"
            )

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

    def mark_session_lost(self, session_id: str, reason: str) -> str:
        """The one place a session's VM is declared lost: the registry says why, the VM goes
        (even when Redis cannot be written). A VM that went silent because it paused on a full
        host disk is reported as such. Returns the reason recorded."""
        vm_id = self._vm_id(session_id)
        try:
            if self.vms.paused_on_full_disk(vm_id):
                reason = DISK_FULL_REASON
            if sessions.mark_lost(self.r, session_id, reason):
                metrics.incr(self.r, "shoal_sessions_lost_total")
        finally:
            self.vms.destroy(vm_id)
            self.session_vm.pop(session_id, None)
        return reason

    def _vm(self, session_id: str, pool: Pool, keep_fork_base: bool = False):
        """The session's running VM: this process's, adopted after a restart, or woken from
        its sleep image (workers/host_sleep.py). What asks for it is about to change it, so a
        fork base kept of it goes (workers/host_forks.py), unless `keep_fork_base`."""
        vm_id = self._vm_id(session_id)
        if not keep_fork_base:
            self.vms.fork_bases.drop(vm_id)
        spec = spec_for(pool)
        vm = self.vms.get(vm_id) or self.vms.attach(vm_id, spec)
        if vm is None:
            vm = self._wake(session_id, vm_id, pool, spec)
        elif self.vms.is_asleep(vm_id):
            self._finish_wake(session_id, vm_id, pool)  # a wake its worker did not record
        if vm is None:
            raise SessionLost(f"session {session_id} has no VM on host {self.host}")
        return vm
