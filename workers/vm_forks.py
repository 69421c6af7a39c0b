"""The VM manager's forks (workers/vm.py `VMManager` mixes this in): capture a running VM as a
fork base, keep it for later forks, start forks from it (workers/fork_base.py has the
mechanism), and sweep the bases a dead worker left.

Uses the manager's `settings`, `domains`, `_lock`, `_vms`, `_busy`, `get`, `destroy`, `_save` and
`_forget_asleep`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
import shutil
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.settings import Settings
from workers import domain as dom
from workers import fork_base, sleep_images, vm_sleep
from workers.agent_client import AgentClient
from workers.running_vm import VM, VMSpec
from workers.vm_domains import DomainOps
from workers.vm_errors import VMError, VMLost
from workers.vm_identity import VMIdentity

log = logging.getLogger("shoal.vm")

# A fork base no fork has used for this long is freed (its memory is the parent's size).
FORK_BASE_KEEP_S = 60.0
# A fork base directory that no base of this process names, older than this, is a leftover.
FORK_LEFTOVER_S = 600.0
# Disk a capture leaves free at least (MiB), beyond what it and its forks' disks take.
FORK_DISK_RESERVE_MIB = 1024
# How long a fork's agent may take to answer after its start (a parent's, the usual timeout).
FORK_AGENT_TIMEOUT_S = 60.0


class ForkingVMs:
    settings: Settings
    domains: DomainOps
    _lock: threading.Lock
    _vms: dict[str, VM]
    _busy: set[str]
    _capturing: dict[str, bool]  # VM id -> whether it was destroyed during its capture
    _one_capture: threading.Lock
    fork_bases: fork_base.ForkBases
    if TYPE_CHECKING:

        def _save(self, vm: VM, image: Path, why: str) -> vm_sleep.SleepImage: ...
        def _forget_asleep(self, vm: VM, why: str = "") -> None: ...
        def get(self, vm_id: str) -> VM | None: ...

    def base_for_forks(self, vm_id: str, count: int, reuse: bool = False) -> fork_base.ForkBase:
        """The running VM's state as a fork base for `count` forks (workers/fork_base.py),
        marked in use: call `fork_bases.release` once its forks are up. With `reuse`, the base
        kept from an earlier such fork serves when the VM has run nothing since (the host drops
        a base when its VM runs anything), and a new one is kept; else the VM is captured
        afresh (workers/fork_base.py says how long it pauses).

        A failed capture leaves the VM running as it was; or, when it could not be started
        again, saved on this host as a sleeping VM is (VMError: the session's next request
        wakes it); VMLost only when its state is gone or it could not be resumed.
        OSError(ENOSPC) when the host's disk has no room for the capture and the forks'
        disks."""
        if reuse:
            base = self.fork_bases.take(vm_id)
            if base is not None:
                return base
        with self._lock:
            parent = self._vms.get(vm_id)
            if parent is None or vm_id in self._busy:
                raise VMError(f"VM {vm_id} is not running on this host")
            self._busy.add(vm_id)
            self._capturing[vm_id] = False
        try:
            self._check_disk_room(parent, count)
            with self._one_capture:  # a worker copies one VM's memory at a time
                base = self._capture(parent)
        except BaseException:
            if self._capture_over(vm_id):
                self._destroy_quietly(vm_id)
            raise
        ended = self._capture_over(vm_id)
        self.fork_bases.put(vm_id, base, keep=reuse and not ended)
        if ended:  # destroyed while it was captured (its forks may still start)
            self._destroy_quietly(vm_id)
        return base

    def _capture_over(self, vm_id: str) -> bool:
        """The VM is no longer being captured; whether it was destroyed meanwhile."""
        with self._lock:
            self._busy.discard(vm_id)
            return self._capturing.pop(vm_id)

    def _destroy_quietly(self, vm_id: str) -> None:
        """Carry out a destroy that came during a capture (a failure is logged, not raised:
        the capture's own outcome is what its caller must hear)."""
        try:
            self.destroy(vm_id)
        except Exception:
            log.exception("vm=%s destroying it after its capture failed", vm_id)

    def check_fork_disks(self, base: fork_base.ForkBase, count: int) -> None:
        """Room for `count` copies of the base's frozen disk, FORK_DISK_RESERVE_MIB to spare
        (its guest may have written more while it was captured); OSError(ENOSPC) if not."""
        needed = base.disk.stat().st_blocks * 512 * count
        self._check_free(needed, "the forks' disks")

    def _check_disk_room(self, parent: VM, count: int) -> None:
        """Room for its image (its memory, at most), its disk's frozen copy and each fork's,
        with FORK_DISK_RESERVE_MIB to spare: a full disk would pause every VM of the host."""
        disk = parent.paths.data_disk.stat().st_blocks * 512
        self._check_free((parent.spec.memory_mib << 20) + disk * (count + 1), "a capture")

    def _check_free(self, needed: int, what: str) -> None:
        free = shutil.disk_usage(self.settings.instance_vm_dir).free
        if free - needed < FORK_DISK_RESERVE_MIB << 20:
            raise OSError(
                errno.ENOSPC,
                f"no space left on device for {what} ({needed >> 20} MiB; {free >> 20} MiB "
                f"free, {FORK_DISK_RESERVE_MIB} MiB kept free)",
            )

    def _capture(self, parent: VM) -> fork_base.ForkBase:
        """By a migration into shared memory (the parent paused while it is copied); else by a
        save (the parent away for its save and restore)."""
        started = time.monotonic()
        workdir = fork_base.forks_dir(self.settings) / f"{parent.key}-{secrets.token_hex(4)}"
        if self.domains.shared.active():
            base = self._capture_shared(parent, workdir)
        else:
            base = self._capture_saved(parent, workdir)
        log.info("vm=%s host=%s captured for forks (%s) in %.0f ms", parent.vm_id,
                 self.settings.host_name, "memory shared" if base.shares_memory
                 else "saved", (time.monotonic() - started) * 1000)  # fmt: skip
        return base

    def _capture_shared(self, parent: VM, workdir: Path) -> fork_base.ForkBase:
        capture_id = f"{parent.vm_id}.capture"  # owned while it runs: no sweep takes it
        with self._lock:
            self._busy.add(capture_id)
        try:
            return fork_base.capture_shared(
                self.domains, workdir, parent.domain_name,
                dom.domain_name(self.settings, dom.vm_key(capture_id)), parent.paths,
                self._identity_of(parent.paths), parent.spec.memory_mib,
                parent.spec.data_disk_mib,
            )  # fmt: skip
        except VMLost:
            self._forget_asleep(parent, "it could not be resumed after its fork capture")
            raise
        finally:
            with self._lock:
                self._busy.discard(capture_id)

    def _capture_saved(self, parent: VM, workdir: Path) -> fork_base.ForkBase:
        """Saved to its sleep image, the base made from it, restored from it: until it runs
        again the parent is, to this host, a VM asleep (a worker dying meanwhile leaves a
        session its next request wakes)."""
        domains, identity = self.domains, self._identity_of(parent.paths)
        image = sleep_images.image_path(self.settings, parent.key)
        try:
            self._save(parent, image, "the VM is being forked")
        except BaseException as exc:
            if self.get(parent.vm_id) is parent:
                raise  # not saved: it runs on, untouched
            log.error("vm=%s saving it for forks failed: %s", parent.vm_id, exc)
            self._recover(parent, image, identity)
            raise
        try:
            base = fork_base.capture_saved(
                domains, workdir, image, parent.paths, parent.spec.memory_mib
            )
        except BaseException:
            self._recover(parent, image, identity)
            raise
        try:
            agent = self._restore(parent, image, identity)
        except BaseException:
            base.close()
            raise
        fork_base.adopt_image(base, image)
        self._rejoin(parent, agent, {})
        return base

    def _restore(self, parent: VM, image: Path, identity: VMIdentity) -> AgentClient:
        """The parent from its image, as a wake does; the image stays on failure (VMError
        saying its next request wakes it), VMLost when there is none."""
        with contextlib.suppress(VMError):
            self.domains.destroy_domain(parent.domain_name)  # a capture's domain, say
        if not image.is_file():
            raise VMLost(f"VM {parent.vm_id}: its fork capture failed and left no image")
        try:
            return vm_sleep.restore(
                self.domains, parent.vm_id, parent.domain_name, parent.paths, image, identity,
                parent.spec.memory_mib, self.settings.agent_ready_timeout_s,
            )  # fmt: skip
        except BaseException as exc:
            log.error("vm=%s host=%s restoring it after a failed fork failed; it stays saved "
                      "for its next request: %s", parent.vm_id, self.settings.host_name,
                      exc)  # fmt: skip
            raise VMError(
                f"VM {parent.vm_id}: forking it failed and so did starting it again; it is "
                "saved on its host and its next request restores it"
            ) from None

    def _recover(self, parent: VM, image: Path, identity: VMIdentity) -> None:
        """After a capture failed past the save: the parent running again from its image (the
        image then goes), or left saved (`_restore` raises)."""
        agent = self._restore(parent, image, identity)
        image.unlink(missing_ok=True)
        self._rejoin(parent, agent, {})

    @staticmethod
    def _identity_of(paths: dom.VMPaths) -> VMIdentity:
        gid = paths.dir.stat().st_gid  # the directory is its uid's lease; uid == gid
        return VMIdentity(gid, gid)

    def _rejoin(self, old: VM, agent: AgentClient, timings: dict[str, float]) -> None:
        """The VM running again under its own name after a capture (a destroy that came
        meanwhile is carried out by base_for_forks once the capture is over)."""
        vm = VM(self.settings, old.vm_id, old.key, old.domain_name, old.uuid, old.paths,
                old.spec, True, agent, timings)  # fmt: skip
        vm.created_at = old.created_at
        with self._lock:
            self._vms[old.vm_id] = vm

    def start_fork(self, base: fork_base.ForkBase, vm_id: str, spec: VMSpec, parent_id: str) -> VM:
        """A new VM `vm_id` started from a fork base: the parent's memory and files as they
        were captured, its own uid, disks, clock and randomness."""
        with self._lock:
            if vm_id in self._vms or vm_id in self._busy:
                raise VMError(f"VM {vm_id} already exists on this host")
            self._busy.add(vm_id)
        try:
            return self._start_fork(base, vm_id, spec, parent_id)
        finally:
            with self._lock:
                self._busy.discard(vm_id)

    def _start_fork(self, base: fork_base.ForkBase, vm_id: str, spec: VMSpec, parent_id: str) -> VM:
        started = time.monotonic()
        key = dom.vm_key(vm_id)
        name = dom.domain_name(self.settings, key)
        paths = dom.vm_paths(self.settings, key)
        self.domains.teardown(name, paths)
        identity = self.domains.claim_vm(paths)
        uuid = str(uuidlib.uuid4())
        metadata = {"session": vm_id, "image": spec.image, "created_at": f"{time.time():.3f}",
                    "restored": "1", "forked_from": parent_id}  # fmt: skip
        timings: dict[str, float] = {}
        try:
            with self.domains.step(vm_id, "fork_disks", timings):
                fork_base.give_disks(base, paths, identity)
            agent = fork_base.start(
                self.domains, base, vm_id, name, uuid, paths, identity, metadata, timings,
                min(self.settings.agent_ready_timeout_s, FORK_AGENT_TIMEOUT_S),
            )  # fmt: skip
        except BaseException:
            self.domains.teardown(name, paths)
            raise
        timings["total"] = round((time.monotonic() - started) * 1000, 1)
        vm = VM(self.settings, vm_id, key, name, uuid, paths, spec, True, agent, timings)
        with self._lock:
            self._vms[vm_id] = vm
        log.info("vm=%s host=%s forked from %s: ms=%.0f", vm_id, self.settings.host_name,
                 parent_id, timings["total"])  # fmt: skip
        return vm

    def _sweep_fork_leftovers(self) -> None:
        """Fork bases a dead worker left (captures take seconds: only old ones are judged)."""
        self.fork_bases.expire()
        kept = self.fork_bases.dirs()
        forks = fork_base.forks_dir(self.settings)
        for directory in sorted(forks.iterdir()) if forks.is_dir() else ():
            with contextlib.suppress(OSError):
                old = time.time() - directory.stat().st_mtime > FORK_LEFTOVER_S
                if old and directory not in kept:
                    log.warning("vm host=%s removing leftover fork base %s",
                                self.settings.host_name, directory.name)  # fmt: skip
                    shutil.rmtree(directory, ignore_errors=True)
