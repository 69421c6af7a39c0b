"""A host's forks of its sessions (issue 15): new sessions whose VMs start as copies of a running
session's VM, on the same host (workers/fork_base.py and workers/vm_forks.py have the VM side).

Part of the host runtime (workers/host.py `HostRuntime`, which provides `r`, `host`,
`settings`, `vms`, `queues`, `session_vm`, `_vm`, `_done_seq`, `memory`, `mark_session_lost`
and `beat_once`). A fork is two steps. The capture runs at the parent's next free moment
(workers/session_queue.py), so it never cuts into an execution or a file transfer; the parent is
away for the capture only. The forks then start from the captured base on the host's fork
threads while the parent takes its next work: a fork of 16 never holds the parent. The creator
(shoal/use_cases/sessions.py `fork_session`, waiting on `reply_key`) is answered once every
start has ended: with the forks, or, when any failed, with the first failure and none kept (the
starts not begun by then are skipped).

Room: the forks' VMs are reserved on this host (count and memory) before the capture and until
they have started, so two fork requests at once cannot both take the last room.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from pool.ready import new_vm_id
from shoal import keys, replies, sessions
from shoal.errors import (
    ForkFailed,
    HostStorageFull,
    NoHostAvailable,
    SessionLost,
    ShoalError,
)
from shoal.pools import Pool, get_pool
from workers.fork_base import ForkBase
from workers.running_vm import spec_for
from workers.vm_errors import VMError, VMLost, out_of_space

log = logging.getLogger("shoal.host")


def _client_error(exc: BaseException, what: str) -> ShoalError:
    """What the creator is told: a ShoalError as it is; the host's own trouble without its
    paths and domain names (the worker's log has them)."""
    if isinstance(exc, ShoalError):
        return exc
    if out_of_space(exc):
        return HostStorageFull(f"the host's disk has no room: {what} failed; retry once space "
                               "is freed")  # fmt: skip
    if isinstance(exc, VMError) and "next request restores it" in exc.message:
        return ForkFailed(f"{what} failed; the session is saved and its next request restores it")
    return ForkFailed(f"{what} failed on the host (its worker's log says why); no fork was made")


class _Starting:
    """One fork request's VMs being started: the creator is answered once all have ended."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs  # (fork session id, its VM id)
        self.failures: list[BaseException] = []
        self._left = len(pairs)
        self._lock = threading.Lock()

    def one_ended(self, failure: BaseException | None) -> bool:
        """Record one start's outcome; True for the last one."""
        with self._lock:
            if failure is not None:
                self.failures.append(failure)
            self._left -= 1
            return self._left == 0


class ForksOnHost:
    _fork_threads: ThreadPoolExecutor | None  # made on the first fork
    _fork_lock: threading.Lock  # the executor's making and the room reserved
    _forks_reserved: int  # VMs of fork requests not started yet (this host, all requests)
    _forks_reserved_mib: int  # ... and their memory, with their captures'

    def fork_session(
        self, session_id: str, pool_name: str, fork_ids: list[str], reply_key: str, reuse: bool
    ) -> None:
        """Capture the session's VM at its next free moment, then start its forks (sessions
        `fork_ids`, registered `creating` by the API) and answer on `reply_key`. With `reuse`,
        a capture kept from an earlier fork serves if the session ran nothing since."""
        work = lambda: self._fork(session_id, pool_name, fork_ids, reply_key, reuse)  # noqa: E731
        self.queues.other(session_id, work, lambda: self._done_seq(session_id))

    def _fork(
        self, session_id: str, pool_name: str, fork_ids: list[str], reply_key: str, reuse: bool
    ) -> None:
        count, base = len(fork_ids), None
        try:
            pool = get_pool(self.settings, pool_name)
            self._check_request(session_id, fork_ids)
            self._reserve(pool, count)
        except Exception as exc:
            if not isinstance(exc, ShoalError):
                log.exception("session=%s host=%s a fork request failed", session_id, self.host)
            replies.send_error(self.r, reply_key, _client_error(exc, "checking the fork request"))
            return
        try:
            vm = self._vm(session_id, pool, keep_fork_base=reuse)
            base = self.vms.base_for_forks(vm.vm_id, count, reuse)
            sessions.touch(self.r, session_id, pool.cooldown_s)
            self._check_request(session_id, fork_ids)  # still wanted after the capture?
            self.vms.check_fork_disks(base, count)
            self._start_forks(base, vm.vm_id, pool, fork_ids, reply_key)
        except Exception as exc:
            if base is not None:
                self.vms.fork_bases.release(base)
            self._unreserve(pool, count)
            if isinstance(exc, VMLost):
                reason = self.mark_session_lost(session_id, f"forking it failed: {exc}")
                exc = SessionLost(f"session {session_id} was lost while it was forked: {reason}")
            elif not isinstance(exc, ShoalError):
                log.error("session=%s host=%s capturing it for forks failed: %s", session_id,
                          self.host, exc)  # fmt: skip
            replies.send_error(self.r, reply_key, _client_error(exc, "capturing the session"))

    def _activate(self, starting: _Starting) -> list[str]:
        """Record each fork's VM and make it active; the forks kept (one whose creator gave
        up and ended it is destroyed)."""
        for fork_id, vm_id in starting.pairs:
            self.session_vm[fork_id] = vm_id  # from here a destroy of the session finds it
        kept = []
        for fork_id, vm_id in starting.pairs:
            if sessions.activate(self.r, fork_id, vm_id, warm=False):
                self.queues.start(fork_id)
                kept.append(fork_id)
            else:
                self.vms.destroy(vm_id)
                self.session_vm.pop(fork_id, None)
        return kept

    def _discard(self, starting: _Starting) -> None:
        """Every fork's VM destroyed, each on its own (libvirt trouble with one spares none
        of the others); the creator ends the sessions."""
        for fork_id, vm_id in starting.pairs:
            try:
                self.vms.destroy(vm_id)
            except Exception:
                log.exception("host=%s destroying fork %s failed", self.host, vm_id)
            self.session_vm.pop(fork_id, None)

    def _check_request(self, session_id: str, fork_ids: list[str]) -> None:
        """The parent still lives and the forks are still wanted (their creator may have given
        up while the parent ran a long execution)."""
        if not fork_ids:
            raise ShoalError("a fork request names no fork")
        pipe = self.r.pipeline()
        for sid in (session_id, *fork_ids):
            pipe.hget(keys.session(sid), "state")
        parent, *forks = pipe.execute()
        if parent not in sessions.HELD_STATES:
            raise SessionLost(f"session {session_id} ended before it could be forked")
        if any(state != sessions.CREATING for state in forks):
            raise ShoalError("the fork request was given up before its turn came")

    def _reserve(self, pool: Pool, count: int) -> None:
        """Room on this host for `count` more VMs of the pool and the capture's memory, by
        count and by memory (each counted whole, though forks share what they do not write),
        taken until the forks have started."""
        needed_mib = (count + 1) * pool.memory_mib
        with self._fork_lock:
            taken = len(self.vms.list_vms()) + self._forks_reserved
            if taken + count > self.settings.host_max_vms:
                raise NoHostAvailable(
                    f"host {self.host} holds {taken} VMs of its {self.settings.host_max_vms} "
                    f"(SHOAL_HOST_MAX_VMS): no room for {count} forks; retry when sessions end"
                )
            memory = self.memory()
            if memory.spare_mib() - self._forks_reserved_mib < needed_mib:
                raise NoHostAvailable(
                    f"host {self.host} is short of memory for {count} forks of "
                    f"{pool.memory_mib} MiB ({memory.available_mib} MiB available, "
                    f"{memory.reserve_mib} MiB kept free)"
                )
            self._forks_reserved += count
            self._forks_reserved_mib += needed_mib

    def _unreserve(self, pool: Pool, count: int) -> None:
        with self._fork_lock:
            self._forks_reserved -= count
            self._forks_reserved_mib -= (count + 1) * pool.memory_mib

    def _start_forks(
        self, base: ForkBase, parent_vm: str, pool: Pool, fork_ids: list[str], reply_key: str
    ) -> None:
        """Start the forks on the fork threads; from the first one handed over, the threads
        own the base's use and the room reserved, and answer the creator (never this call)."""
        spec = spec_for(pool)
        with self._fork_lock:
            if self._fork_threads is None:
                self._fork_threads = ThreadPoolExecutor(
                    max(self.settings.restore_parallel, 1), thread_name_prefix="fork"
                )
            threads = self._fork_threads
        starting = _Starting([(fork_id, new_vm_id()) for fork_id in fork_ids])

        def start(vm_id: str) -> None:
            failure = None
            try:
                if not starting.failures:  # one failed: none will be kept, skip the rest
                    self.vms.start_fork(base, vm_id, spec, parent_vm)
            except BaseException as exc:
                failure = exc
            if starting.one_ended(failure):
                self._forks_started(base, pool, starting, reply_key)

        for index, (_fork_id, vm_id) in enumerate(starting.pairs):
            try:
                threads.submit(start, vm_id)
            except Exception as exc:  # the worker is shutting down: these never start
                for _rest in starting.pairs[index:]:
                    if starting.one_ended(exc):
                        self._forks_started(base, pool, starting, reply_key)
                return

    def _forks_started(
        self, base: ForkBase, pool: Pool, starting: _Starting, reply_key: str
    ) -> None:
        """All starts ended: keep every fork and answer, or, after any failure, none. Answers
        the creator on every path (it runs on a fork thread: nothing above it would)."""
        try:
            self._keep_or_discard(base, pool, starting, reply_key)
        except Exception as exc:
            log.exception("host=%s finishing forks failed", self.host)
            self._discard(starting)
            with contextlib.suppress(Exception):
                replies.send_error(self.r, reply_key, _client_error(exc, "finishing the forks"))

    def _keep_or_discard(
        self, base: ForkBase, pool: Pool, starting: _Starting, reply_key: str
    ) -> None:
        try:
            self.vms.fork_bases.release(base)
        finally:
            self._unreserve(pool, len(starting.pairs))
        failure = starting.failures[0] if starting.failures else None
        kept: list[str] = []
        if failure is None:
            try:
                kept = self._activate(starting)
            except Exception as exc:
                log.exception("host=%s recording forks failed", self.host)
                failure = exc
        if failure is not None:
            self._discard(starting)
            log.error("host=%s starting forks failed: %s", self.host, failure)
            replies.send_error(self.r, reply_key, _client_error(failure, "starting a fork"))
            return
        replies.send(self.r, reply_key, {"ok": True})
        log.info("host=%s forks running: %s", self.host, kept)
        try:
            self.beat_once()
        except Exception:
            log.exception("host=%s heartbeat after forks failed", self.host)
