"""Forks of a running VM (issue 15): new VMs whose memory and files are another VM's at one
instant, while that VM runs on.

Capture. The parent is saved whole, exactly as a sleep saves it (workers/vm_sleep.py), to its
sleep image: until the capture is over the parent is, to this host, a VM asleep, so a worker that
dies mid-capture leaves a session its next request wakes, not a lost one. `capture` then makes
the fork *base* from that image: a frozen copy of the parent's data disk overlay and, when this
host shares memory (workers/shared_memory.py), the image restored once, paused, into a memfd
that is sealed afterwards, its device state saved apart (x-ignore-shared). The capture's QEMU
never runs the guest; it writes to a scratch overlay on top of the parent's disk and binds its
socket beside the parent's, and it is marked (`CAPTURE_MARK`) so a restarted worker destroys
it rather than take it for the parent. The parent then starts again from the base
(workers/vm_forks.py), and its image moves into the base (forks without shared memory restore
copies of it).

Starting (`start`). Every fork starts like a template's clone: the sealed memory mapped
privately, so the pages none of them writes stay one copy in the host's memory; the device
state loaded; confined, resumed and reseeded (each fork's clock, kernel entropy and interpreter
generators its own, `/run/shoal/identity` its own VM id). Without memory sharing, or when a
start on it fails, a fork restores a copy of the whole image instead (its name and uuid
rewritten inside, as templates.prepare_clone does for clones) and holds its memory whole.

Files. A base lives in `<instance_vm_dir>/forking-<host>/<parent key>-<token>/`, root's and
0700: the image and the frozen disk hold the parent's memory and files, and no VM's uid may
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
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from shoal.settings import Settings
from workers import domain as dom
from workers import templates, transfer_disk, vm_identity, vm_sleep
from workers.agent_client import AgentClient
from workers.libvirt_conn import LibvirtUnavailable
from workers.template_memory import copy_sparse
from workers.vm_domains import DomainOps
from workers.vm_errors import VMError, VMStartFailed
from workers.vm_identity import VMIdentity

log = logging.getLogger("shoal.vm")

FICLONE = 0x40049409  # ioctl(2): share the source's extents (btrfs, XFS); EOPNOTSUPP elsewhere
IMAGE_FILE = "state.save"
DISK_FILE = "data.qcow2"
DEVICE_STATE_FILE = "device.save"
# The capture's QEMU (never resumed) uses these in the parent's own directory (the socket's name
# no longer than agent.sock's, whose path length is checked).
SOURCE_SOCKET = "fork.sock"
SOURCE_LOG = "fork.log"
SOURCE_DISK = "fork.qcow2"
# In the capture domain's metadata: a restarted worker destroys such a domain (never attaches).
CAPTURE_MARK = "fork_capture"


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
        """Free the base: its memfd (VMs started from it keep their mappings) and its files."""
        if self.memory >= 0:
            os.close(self.memory)
            self.memory = -1
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


def capture(
    domains: DomainOps,
    workdir: Path,
    image: Path,
    paths: dom.VMPaths,
    identity: VMIdentity,
    memory_mib: int,
) -> ForkBase:
    """The fork base, in `workdir` (which must not exist), of the VM saved whole in `image`
    whose files are `paths`. Its `image` is still to be moved in (`adopt_image`). On failure
    nothing of it is left, `image` included untouched."""
    vm_sleep.private_dir(workdir.parent)
    workdir.mkdir(mode=vm_sleep.DIR_MODE)
    try:
        xml = domains.libvirt.call(f"read {image}", lambda c: c.saveImageGetXMLDesc(str(image), 0))
        xml = vm_sleep.without_wrapper(xml)
        found = ET.fromstring(xml)
        name, uuid = found.findtext("name") or "", found.findtext("uuid") or ""
        if not name or not uuid:
            raise VMError(f"the saved definition in {image} has no name or uuid")
        base = ForkBase(workdir, name, uuid, xml, memory_mib)
        copy_file(paths.data_disk, base.disk)
        if domains.shared.active():
            base.memory = _capture_memory(domains, base, image, paths, identity)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return base


def adopt_image(base: ForkBase, image: Path) -> None:
    """Move the parent's image into the base, once the parent runs again without it."""
    os.replace(image, base.image)


def _capture_memory(
    domains: DomainOps, base: ForkBase, image: Path, paths: dom.VMPaths, identity: VMIdentity
) -> int:
    """The base's sealed memory, or -1 when it cannot be made (each fork restores the image).
    The capture domain runs under the parent's name; it is gone afterwards, also on failure."""
    scratch = paths.dir / SOURCE_DISK
    xml = dom.retarget_xml(
        base.xml,
        name=base.parent_name,
        uuid=base.parent_uuid,
        data_disk=scratch,
        transfer_disk=paths.transfer_disk,
        agent_socket=paths.dir / SOURCE_SOCKET,
        console_log=paths.dir / SOURCE_LOG,
        metadata={**dom.read_metadata(base.xml), CAPTURE_MARK: "1"},
        identity=identity,
    )
    try:
        domains.make_overlay(scratch, paths.data_disk, "qcow2", identity)
        return domains.shared.capture(
            domains.libvirt, base.parent_name, image, xml, identity, base.memory_mib,
            base.device_state,
        )  # fmt: skip
    except (VMError, OSError) as exc:
        if isinstance(exc, LibvirtUnavailable):
            raise
        log.warning("fork of %s: its memory could not be shared, each fork reads its image: %s",
                    base.parent_name, exc)  # fmt: skip
        return -1
    finally:
        with contextlib.suppress(VMError):
            domains.destroy_domain(base.parent_name)
        for leftover in (SOURCE_SOCKET, SOURCE_LOG, SOURCE_DISK):
            (paths.dir / leftover).unlink(missing_ok=True)


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
    image_fallback: bool = True,
) -> AgentClient:
    """Start `name` (the parent again, or a fork whose disks are ready) from the base: running,
    confined, its agent connected and reseeded. Without `image_fallback` only a start on the
    base's memory is tried (VMStartFailed otherwise). On failure the domain is destroyed."""
    xml = dom.retarget_xml(
        base.xml, name=name, uuid=uuid, data_disk=paths.data_disk,
        transfer_disk=paths.transfer_disk, agent_socket=paths.socket,
        console_log=paths.console_log, metadata=metadata, identity=identity,
    )  # fmt: skip
    try:
        if not (base.shares_memory and _start_shared(domains, base, who, name, paths, xml,
                                                     identity, timings)):  # fmt: skip
            if not image_fallback:
                raise VMStartFailed(f"VM {who}: no start on its fork base's memory")
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


def _start_shared(
    domains: DomainOps,
    base: ForkBase,
    who: str,
    name: str,
    paths: dom.VMPaths,
    xml: str,
    identity: VMIdentity,
    timings: dict[str, float],
) -> bool:
    try:
        with domains.step(who, "fork_start", timings):
            domains.shared.start_on(
                domains.libvirt, name, xml, identity, base.memory, base.device_state
            )
            domains.run_confined(name, paths, identity, base.memory_mib)
        return True
    except (VMError, OSError) as exc:
        if isinstance(exc, LibvirtUnavailable):
            raise
        log.warning("vm=%s a start on its fork base's memory failed, reading the image: %s",
                    who, exc)  # fmt: skip
        domains.destroy_domain(name)
        return False


def _start_from_image(
    domains: DomainOps,
    base: ForkBase,
    name: str,
    uuid: str,
    paths: dom.VMPaths,
    xml: str,
    identity: VMIdentity,
) -> None:
    """The whole image restored: the parent's own, or a copy renamed for a fork."""
    image = base.image
    if name != base.parent_name:
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
        if image != base.image:
            with contextlib.suppress(FileNotFoundError):
                image.unlink()


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
            self._live.pop(id(base), None)
        base.close()
