"""A host's sleeping sessions: their VMs saved to disk at the cooldown of a pool that sleeps (or
when asked), and woken by the next request that needs the VM.

Part of the host runtime (workers/host.py `HostRuntime`, which provides `r`, `host`,
`settings`, `vms`, `queues`, `_vm`, `_vm_id`, `_done_seq` and `mark_session_lost`). Both run at
the session's next free moment (workers/session_queue.py), so a sleep never cuts into an
execution or a file transfer, and whatever was queued behind a sleep wakes the VM again.

The registry follows the VM: `sleeping` only once the image is complete on disk
(shoal/sessions.py `asleep`), `waking` while it is restored, `active` once it runs. A sleeping
session survives a worker restart: its image and its VM directory are files, its state is in
Redis, and `_vm` wakes it wherever a running VM is expected (workers/vm_sleep.py).
"""

from __future__ import annotations

import logging

from shoal import keys, metrics, queue, sessions
from shoal.celery_app import celery_for
from shoal.errors import SessionLost, ShoalError
from shoal.pools import Pool, get_pool
from shoal.records import SessionEntry
from workers.running_vm import VM, VMSpec
from workers.vm_errors import VMError

log = logging.getLogger("shoal.host")


def oldest_to_end(held: list[tuple[str, int]], image_bytes: int, cap: int) -> list[str] | None:
    """Of the sleeping sessions `held` ((id, bytes), oldest first), the oldest to end so that a
    new image of `image_bytes` fits under `cap` with the rest; None when it cannot fit alone."""
    if image_bytes > cap:
        return None
    total = sum(size for _id, size in held) + image_bytes
    ending = []
    for session_id, size in held:
        if total <= cap:
            break
        ending.append(session_id)
        total -= size
    return ending


class SleepOnHost:
    def sleep_session(self, session_id: str, pool_name: str) -> None:
        """Save the session's VM to disk at its next free moment, if it is still active."""
        work = lambda: self._sleep(session_id, pool_name)  # noqa: E731
        self.queues.other(session_id, work, lambda: self._done_seq(session_id))

    def wake_session(self, session_id: str, pool_name: str) -> None:
        """Wake the session's VM at its next free moment, if it sleeps."""
        work = lambda: self._wake_queued(session_id, pool_name)  # noqa: E731
        self.queues.other(session_id, work, lambda: self._done_seq(session_id))

    def _sleep(self, session_id: str, pool_name: str) -> None:
        try:
            entry = sessions.load(self.r, session_id)
            if entry is None or entry["state"] != sessions.ACTIVE:
                return  # asleep already, ended, or lost
            pool = get_pool(self.settings, pool_name)
            if self.r.zcard(keys.session_executions(session_id)):
                sessions.touch(self.r, session_id, pool.cooldown_s)
                return  # executions wait for it: they would wake it at once
            vm_id = self._vm_id(session_id)
            self._vm(session_id, pool)  # adopted, if this worker restarted since
            if self._host_full(pool):
                self._end_instead(entry, vm_id, "this host's sleeping sessions are at their cap")
                return
            image = self.vms.sleep(vm_id)
        except Exception:
            log.exception("session=%s host=%s putting it to sleep failed", session_id, self.host)
            self._retry_later(session_id, pool_name)
            return
        try:
            if not self._make_room(entry, image.bytes):
                why = f"its image ({image.bytes >> 20} MiB) is over its tenant's sleeping cap"
                self._end_instead(entry, vm_id, why)
                return
            tenant = entry["tenant"]
            recorded = sessions.asleep(
                self.r, session_id, tenant, pool.sleep_retention_s, image.bytes
            )
        except Exception:  # the image stays: the next request for the session wakes it
            log.exception("session=%s host=%s recording its sleep failed", session_id, self.host)
            return
        if not recorded:
            log.info("session=%s host=%s ended while it went to sleep", session_id, self.host)
            self.vms.destroy(vm_id)  # nobody will wake it
            return
        self.session_vm.pop(session_id, None)
        metrics.incr(self.r, "shoal_session_sleeps_total", pool=pool.name)
        log.info("session=%s host=%s asleep (%d MB in %.1f s)", session_id, self.host,
                 image.bytes >> 20, image.seconds)  # fmt: skip

    def _make_room(self, entry: SessionEntry, image_bytes: int) -> bool:
        """Keep the tenant's sleeping sessions within SHOAL_TENANT_MAX_SLEEP_MIB with this image
        among them: its oldest sleeping sessions end first. False when this image alone is over
        the cap."""
        cap = self.settings.tenant_max_sleep_mib << 20
        if not cap:
            return True
        ending = oldest_to_end(sessions.sleepers(self.r, entry["tenant"]), image_bytes, cap)
        if ending is None:
            return False
        for session_id in ending:
            self._end_sleeper(session_id)
        return True

    def _end_sleeper(self, session_id: str) -> None:
        """Expire a sleeping session to make room: its host removes its image and VM files."""
        entry = sessions.load(self.r, session_id)
        if entry is None or entry["state"] != sessions.SLEEPING:
            return
        sessions.end(self.r, entry, sessions.EXPIRED)
        queue.DESTROY_SESSION.send(
            celery_for(self.settings), host=entry["host"], session_id=session_id
        )
        log.info("session=%s host=%s ended: its tenant's sleeping sessions were over their cap",
                 session_id, entry["host"])  # fmt: skip

    def _host_full(self, pool: Pool) -> bool:
        """Whether one more image (at most the pool's memory) would pass SHOAL_HOST_MAX_SLEEP_MIB.
        A full host takes no more sleepers: it never ends another tenant's to make room."""
        cap = self.settings.host_max_sleep_mib << 20
        return bool(cap) and self.vms.sleeping_bytes() + (pool.memory_mib << 20) > cap

    def _end_instead(self, entry: SessionEntry, vm_id: str, why: str) -> None:
        """A session that cannot sleep ends, as in a pool that does not sleep."""
        sessions.end(self.r, entry, sessions.EXPIRED)
        self.vms.destroy(vm_id)
        self.session_vm.pop(entry["id"], None)
        log.warning("session=%s host=%s expired instead of sleeping: %s", entry["id"], self.host,
                    why)  # fmt: skip

    def _retry_later(self, session_id: str, pool_name: str) -> None:
        """The session stays active; its idle clock starts again, so the next try comes after
        another cooldown, not at the next beat."""
        try:
            sessions.touch(self.r, session_id, get_pool(self.settings, pool_name).cooldown_s)
        except Exception:
            log.exception("session=%s host=%s touching it failed", session_id, self.host)

    def _wake_queued(self, session_id: str, pool_name: str) -> None:
        try:
            entry = sessions.load(self.r, session_id)
            if entry is not None and entry["state"] == sessions.SLEEPING:
                self._vm(session_id, get_pool(self.settings, pool_name))
        except Exception:
            log.exception("session=%s host=%s waking it failed", session_id, self.host)

    def _wake(self, session_id: str, vm_id: str, pool: Pool, spec: VMSpec) -> VM | None:
        """The session's VM woken from its sleep image; None when it has none on this host.
        A wake that fails leaves the session asleep with its image (the next request tries
        again) and fails the request; a host short of memory refuses it (NoHostAvailable)."""
        if not self.vms.is_asleep(vm_id):
            return None
        self._check_memory(pool)
        sessions.set_waking(self.r, session_id)
        try:
            vm = self.vms.wake(vm_id, spec)
        except (VMError, OSError) as exc:
            sessions.back_to_sleep(self.r, session_id)
            log.error("session=%s host=%s waking it failed: %s", session_id, self.host, exc)
            raise ShoalError(f"waking the session failed; it still sleeps: {exc}") from None
        self.session_vm[session_id] = vm_id
        self._finish_wake(session_id, vm_id, pool)
        metrics.incr(self.r, "shoal_session_wakes_total", pool=pool.name)
        log.info("session=%s host=%s awake in %.0f ms", session_id, self.host,
                 vm.timings.get("wake", 0))  # fmt: skip
        return vm

    def _finish_wake(self, session_id: str, vm_id: str, pool: Pool) -> None:
        """The VM runs: record the session awake, then drop its image. A session that ended
        meanwhile loses the VM too (SessionLost)."""
        if not sessions.awake(self.r, session_id, pool):
            self.vms.destroy(vm_id)
            self.session_vm.pop(session_id, None)
            raise SessionLost(f"session {session_id} ended while it was woken")
        self.vms.drop_sleep_image(vm_id)
