"""Forks of a running VM (issue 15): new VMs whose memory and files are another VM's at one
instant, while that VM runs on.

Capture, on a host that shares memory (workers/shared_memory.py), `capture_shared`: the parent is
paused and migrated, whole, into a new *capture* domain whose RAM is a new memfd (a copy in
memory, no file); its data disk overlay is copied (a frozen copy: its files as its memory
stands), and the parent resumed: paused for about as long as its memory takes to copy (half a
second for 420 MB here), never restarted or reseeded: its variables, open files and
generators' state are as they were. (Migrating it while it ran was tried: under TCG the pages
its guest wrote during the copy were not all sent again, and its forks' kernels found their
memory corrupt.) The capture saves its device state only (x-ignore-shared) and ends; its memfd
is sealed. That memfd, the device state and the frozen disk are the fork *base*. The capture
never runs the guest: its disk is an empty scratch disk (a disk's contents are no part of its
device state) and its socket and console sit beside the parent's; a worker that dies meanwhile
leaves a capture nobody owns (reconcile destroys it) and, at worst, a parent paused (attach
confines and resumes it).

Capture without shared memory, `capture_saved`: the parent is saved whole to its sleep image,
as a sleep saves it (workers/vm_sleep.py), the base made from that image (its frozen disk, the
image itself), and the parent restored from it: away for a save and a restore, reseeded after.

Starting (`start`). Every fork starts like a template's clone: the sealed memory mapped
privately, so the pages none of them writes stay one copy in the host's memory; the device
state loaded; confined, resumed and reseeded (each fork's clock, kernel entropy and interpreter
generators its own, `/run/shoal/identity` its own VM id). Without shared memory a fork
restores a copy of the base's image (its name and uuid rewritten inside, as
templates.prepare_clone does for clones) and holds its memory whole.

Files. A base lives in `<instance_vm_dir>/forking-<host>/<parent key>-<token>/`, root's and
0700: the frozen disk (and the image) hold the parent's files and memory, and no VM's uid may
enter. Each fork's data disk is its own copy of the frozen one (reflinked where the file system
can, else copied sparsely), owned by the fork's uid and backed by the template disk every clone
reads: no VM ever opens a file another VM may write. A fork costs a copy of what the parent
wrote to its disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from shoal.settings import Settings
from workers import domain as dom
from workers import templates, transfer_disk, vm_identity, vm_sleep
from workers.agent_client import AgentClient
from workers.template_memory import copy_sparse
from workers.vm_domains import DomainOps
from workers.vm_errors import VMError, VMLost
from workers.vm_identity import VMIdentity

log = logging.getLogger("shoal.vm")

FICLONE = 0x40049409  # ioctl(2): share the source's extents (btrfs, XFS); EOPNOTSUPP elsewhere
IMAGE_FILE = "state.save"
DISK_FILE = "data.qcow2"
DEVICE_STATE_FILE = "device.save"
# The capture's QEMU (never resumed) uses these in the parent's own directory (the socket's name
# no longer than agent.sock's, whose path length is checked); its disk is an empty scratch disk
# (a disk's contents are no part of its device state).
SOURCE_SOCKET = "fork.sock"
SOURCE_LOG = "fork.log"
SOURCE_DISK = "fork.qcow2"
RESUME_TRIES = 3
RESUME_RETRY_S = 0.5


def forks_dir(settings: Settings) -> Path:
    """This host worker's fork bases (host workers of one instance may share a machine)."""
    host = hashlib.sha256(settings.host_name.encode()).hexdigest()[:8]
    return settings.instance_vm_dir / f"forking-{host}"


@dataclass(eq=False)  # compared by identity
class ForkBase:
    """A running VM's state at one instant, ready to start forks from."""

    dir: Path
    parent_name: str
    parent_uuid: str
    xml: str  # the saved definition, an ordinary VM's (no memory wrapper)
    memory_mib: int
    memory: int = -1  # the sealed memfd; -1: none (each VM restores the image)
    made_at: float = field(default_factory=time.monotonic)
    used_at: float = field(default_factory=time.monotonic)

    @property
    def image(self) -> Path:
        return self.dir / IMAGE_FILE

    @property
    def disk(self) -> Path:
        return self.dir / DISK_FILE

    @property
    def device_state(self) -> Path:
        return self.dir / DEVICE_STATE_FILE

    @property
    def shares_memory(self) -> bool:
        return self.memory >= 0

    def close(self) -> None:
        """Free the base: its memfd (VMs started from it keep their mappings) and its files.
        Called once (ForkBases closes a base in the one thread that takes it out)."""
        memory, self.memory = self.memory, -1
        if memory >= 0:
            os.close(memory)
        shutil.rmtree(self.dir, ignore_errors=True)


def copy_file(source: Path, target: Path) -> None:
    """`target`, new (never an existing file or a link), with `source`'s bytes: its extents
    shared where the file system can, else a sparse copy."""
    with open(source, "rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)  # fmt: skip
        try:
            try:
                fcntl.ioctl(fd, FICLONE, src.fileno())
            except OSError:
                copy_sparse(src.fileno(), fd, os.fstat(src.fileno()).st_size)
        finally:
            os.close(fd)


def capture_shared(
    domains: DomainOps,
    workdir: Path,
    name: str,
    capture_name: str,
    paths: dom.VMPaths,
    identity: VMIdentity,
    memory_mib: int,
    disk_mib: int,
) -> ForkBase:
    """The fork base, in `workdir` (which must not exist), of the running domain `name` whose
    files are `paths`, on shared memory: `name` is paused, migrated into a new domain
    `capture_name` (confined as a VM is) whose RAM is a new memfd, its disk copied, and
    resumed; the capture saves its device state and ends.
    On failure nothing of the base or the capture is left and `name` runs on (VMLost if it
    cannot be resumed)."""
    _make_workdir(workdir)
    base, migrating = None, False
    try:
        xml = domains.libvirt.call(
            f"read {name}",
            lambda c: c.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE),
        )
        xml = vm_sleep.without_wrapper(xml)
        base = ForkBase(workdir, name, _uuid_of(xml), xml, memory_mib)
        domains.make_disk(paths.dir / SOURCE_DISK, disk_mib, identity)
        capture_xml = dom.retarget_xml(
            xml, name=capture_name, uuid=str(uuidlib.uuid4()),
            data_disk=paths.dir / SOURCE_DISK, transfer_disk=paths.transfer_disk,
            agent_socket=paths.dir / SOURCE_SOCKET, console_log=paths.dir / SOURCE_LOG,
            metadata=dom.read_metadata(xml), identity=identity,
        )  # fmt: skip
        migrating = True
        base.memory = domains.shared.migrate_into(
            domains.libvirt, name, capture_name, capture_xml, identity, memory_mib,
            lambda: _confine_capture(domains, capture_name, memory_mib),
        )  # fmt: skip
        copy_file(paths.data_disk, base.disk)  # paused: its files as its memory stands
        _ensure_running(domains, name)
        domains.shared.save_device_state(
            domains.libvirt, capture_name, base.memory, base.device_state
        )
    except BaseException as exc:
        log.warning("fork capture of %s failed: %s", name, exc)
        if base is not None:
            base.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if migrating:
            with contextlib.suppress(VMError):
                domains.destroy_domain(capture_name)
            _ensure_running(domains, name)  # a migration that completed left it paused
        raise
    finally:
        domains.remove_files(capture_name, None)  # its cgroups and libvirt's log of it
        for leftover in (SOURCE_SOCKET, SOURCE_LOG, SOURCE_DISK):
            (paths.dir / leftover).unlink(missing_ok=True)
    return base


def _confine_capture(domains: DomainOps, name: str, memory_mib: int) -> None:
    """The capture's QEMU under a VM's limits: the memory it fills and the CPU it spends
    receiving count against them like the VM's own."""
    domains.probes.apply_limits(
        name, domains.qemu_pid(name), domains.memory_limit_bytes(memory_mib),
        domains.settings.vm_pids_max,
    )  # fmt: skip


def _ensure_running(domains: DomainOps, name: str) -> None:
    """`name` running (resumed if it is paused); VMLost when it is gone or will not run."""

    def resume(c: libvirt.virConnect) -> None:
        domain = c.lookupByName(name)
        if domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            domain.resume()

    for attempt in range(RESUME_TRIES):
        try:
            domains.libvirt.call(f"resume {name}", resume)
            return
        except VMError as exc:
            log.warning("resuming %s after its fork capture failed (try %d): %s", name,
                        attempt + 1, exc)  # fmt: skip
            failure = exc
            time.sleep(RESUME_RETRY_S)
    raise VMLost(f"{name} could not be resumed after its fork capture: {failure}")


def capture_saved(
    domains: DomainOps, workdir: Path, image: Path, paths: dom.VMPaths, memory_mib: int
) -> ForkBase:
    """The fork base, in `workdir` (which must not exist), of the VM saved whole in `image`
    whose files are `paths`, without shared memory (each fork restores a copy of the image).
    Its `image` is still to be moved in (`adopt_image`). On failure nothing of it is left,
    `image` untouched."""
    _make_workdir(workdir)
    try:
        xml = domains.libvirt.call(f"read {image}", lambda c: c.saveImageGetXMLDesc(str(image), 0))
        xml = vm_sleep.without_wrapper(xml)
        name = ET.fromstring(xml).findtext("name") or ""
        base = ForkBase(workdir, name, _uuid_of(xml), xml, memory_mib)
        copy_file(paths.data_disk, base.disk)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return base


def adopt_image(base: ForkBase, image: Path) -> None:
    """Move the parent's image into the base, once the parent runs again without it."""
    os.replace(image, base.image)


def _make_workdir(workdir: Path) -> None:
    vm_sleep.private_dir(workdir.parent)
    workdir.mkdir(mode=vm_sleep.DIR_MODE)


def _uuid_of(xml: str) -> str:
    uuid = ET.fromstring(xml).findtext("uuid")
    if not uuid:
        raise VMError("the domain's definition has no uuid")
    return uuid


def give_disks(base: ForkBase, paths: dom.VMPaths, identity: VMIdentity) -> None:
    """A new fork's data disk (its own copy of the frozen one) and an empty transfer disk."""
    copy_file(base.disk, paths.data_disk)
    vm_identity.give(paths.data_disk, identity)
    transfer_disk.create(paths.transfer_disk, identity)


def start(
    domains: DomainOps,
    base: ForkBase,
    who: str,
    name: str,
    uuid: str,
    paths: dom.VMPaths,
    identity: VMIdentity,
    metadata: dict[str, str],
    timings: dict[str, float],
    agent_timeout_s: float,
) -> AgentClient:
    """Start fork `name`, whose disks are ready, from the base: running, confined, its agent
    connected and reseeded. On failure the domain is destroyed."""
    xml = dom.retarget_xml(
        base.xml, name=name, uuid=uuid, data_disk=paths.data_disk,
        transfer_disk=paths.transfer_disk, agent_socket=paths.socket,
        console_log=paths.console_log, metadata=metadata, identity=identity,
    )  # fmt: skip
    try:
        if base.shares_memory:
            with domains.step(who, "fork_start", timings):
                domains.shared.start_on(
                    domains.libvirt, name, xml, identity, base.memory, base.device_state
                )
                domains.run_confined(name, paths, identity, base.memory_mib)
        else:
            with domains.step(who, "fork_restore", timings):
                _start_from_image(domains, base, name, uuid, paths, xml, identity)
        with domains.step(who, "agent", timings):
            agent, _hello = domains.await_agent(who, name, paths, agent_timeout_s)
        with domains.step(who, "reseed", timings):
            domains.reseed(who, agent, "forked")
    except BaseException:
        with contextlib.suppress(VMError):
            domains.destroy_domain(name)
        domains.probes.remove_limits(name)
        raise
    return agent


def _start_from_image(
    domains: DomainOps,
    base: ForkBase,
    name: str,
    uuid: str,
    paths: dom.VMPaths,
    xml: str,
    identity: VMIdentity,
) -> None:
    """A copy of the whole image, renamed for the fork, restored."""
    image = paths.restore_image
    copy_file(base.image, image)
    templates.rewrite_save_image(image, {base.parent_name: name, base.parent_uuid: uuid})
    try:
        domains.libvirt.call(
            f"restore {name}",
            lambda c: c.restoreFlags(str(image), xml, libvirt.VIR_DOMAIN_SAVE_PAUSED),
            retry=False,
        )
        domains.run_confined(name, paths, identity, base.memory_mib)
    finally:
        image.unlink(missing_ok=True)


class ForkBases:
    """The fork bases of this host: those kept, one per parent VM at most, for later forks of
    the same parent that ask for it, until the parent runs anything again (`drop`) or the base
    has gone unused for `keep_s`; and those in use by forks being started, which are closed only
    once those forks are up."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self._lock = threading.Lock()
        self._kept: dict[str, ForkBase] = {}  # parent VM id -> its kept base
        self._users: dict[int, int] = {}  # id(base) -> forks being started from it
        self._live: dict[int, ForkBase] = {}  # id(base) -> every base not closed yet

    def take(self, parent_id: str) -> ForkBase | None:
        """The parent's kept base, marked in use (`release` when done), or None."""
        with self._lock:
            base = self._kept.get(parent_id)
            if base is not None:
                base.used_at = time.monotonic()
                self._users[id(base)] += 1
            return base

    def put(self, parent_id: str, base: ForkBase, keep: bool) -> None:
        """A new base, marked in use; with `keep`, kept as the parent's (replacing the one it
        kept), else closed once released."""
        with self._lock:
            self._live[id(base)] = base
            self._users[id(base)] = 1
            old = self._kept.pop(parent_id, None) if keep else None
            if keep:
                self._kept[parent_id] = base
        if old is not None:
            self._close_when_unused(old)

    def release(self, base: ForkBase) -> None:
        with self._lock:
            self._users[id(base)] -= 1
            kept = base in self._kept.values()
        if not kept:
            self._close_when_unused(base)

    def drop(self, parent_id: str, base: ForkBase | None = None) -> None:
        """The parent changed (or ended): its kept base (only if it is `base`, when given) is
        no longer its state."""
        with self._lock:
            found = self._kept.get(parent_id)
            if found is None or (base is not None and found is not base):
                return
            del self._kept[parent_id]
        self._close_when_unused(found)

    def expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [(p, b) for p, b in self._kept.items() if now - b.used_at > self.keep_s]
        for parent_id, base in stale:
            self.drop(parent_id, base)

    def dirs(self) -> set[Path]:
        """The directories of every base not closed yet (kept or in use)."""
        with self._lock:
            return {base.dir for base in self._live.values()}

    def drop_all(self) -> None:
        with self._lock:
            parents = list(self._kept)
        for parent_id in parents:
            self.drop(parent_id)

    def _close_when_unused(self, base: ForkBase) -> None:
        with self._lock:
            if self._users.get(id(base), 0) > 0 or base in self._kept.values():
                return
            self._users.pop(id(base), None)
            if self._live.pop(id(base), None) is None:
                return  # another thread took it out first, and closes it
        base.close()
