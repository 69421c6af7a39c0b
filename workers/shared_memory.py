"""Clones that map their template's memory copy-on-write instead of reading it all
(docs/performance.md, "Clones sharing their template's memory").

A template made shareable carries, beside its ordinary save image, the guest's memory
(`memory.ram`, root's 0600) and a save of its device state only (`device.save`, written with
QEMU's `x-ignore-shared` migration capability while the RAM was a shared file backend). A clone
then starts paused through the emulator wrapper (workers/qemu_wrapper.py), which maps a sealed
copy of that memory privately (workers/template_memory.py), takes the device state through
`migrate-incoming`, and is resumed like any restored clone. Whatever fails here falls back to
the ordinary restore: sharing is a speed-up, never a requirement.

libvirt knows nothing of `x-ignore-shared`, so it is set through its QMP passthrough
(`virDomainQemuMonitorCommand[WithFiles]`); libvirt marks such domains as tainted
("custom-monitor") in its log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt
import libvirt_qemu

from shoal.settings import Settings
from workers import domain as dom
from workers import qemu_wrapper, templates, transfer_disk
from workers.template_memory import (
    Grant,
    MemoryBroker,
    copy_sparse,
    seal_read_only,
    sealed_copy,
    writable_memfd,
)
from workers.vm_errors import VMStartFailed

if TYPE_CHECKING:
    from workers.libvirt_conn import LibvirtConnection
    from workers.vm_identity import VMIdentity

log = logging.getLogger("shoal.vm")

MEMORY_FILE = "memory.ram"
DEVICE_STATE_FILE = "device.save"
WRAPPER = Path("/usr/local/libexec/shoal/qemu-wrapper")
INCOMING_FD_NAME = "shoal-incoming"
OUTGOING_FD_NAME = "shoal-outgoing"
# A migration into a fork's capture: as fast as the host can copy; given up after
# MIGRATION_TIMEOUT_S (a copy in memory: a second or two for a whole guest here).
MIGRATE_FAST = {"max-bandwidth": 64 << 30}
MIGRATION_TIMEOUT_S = 60.0
MIGRATION_POLL_S = 0.01
INCOMING_TIMEOUT_S = 30.0
SEAL_WAIT_S = 10.0
IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
# A clone saved whole (put to sleep, workers/vm_sleep.py): every page goes into the image.
SAVE_ALL_MEMORY = {"capabilities": [{"capability": "x-ignore-shared", "state": False}]}
KSM_RUN = Path("/sys/kernel/mm/ksm/run")
FULL_COPY = (
    "every clone of a template that cannot be shared reads its whole snapshot (a private copy "
    "of the save image, restored by libvirt)"
)


def install_wrapper(target: Path = WRAPPER) -> None:
    """Copy the wrapper to a root-owned path every VM uid may execute (not the checkout)."""
    text = "#!/usr/bin/python3 -I\n" + Path(qemu_wrapper.__file__).read_text()
    if target.is_file() and target.read_text() == text and target.stat().st_uid == 0:
        return
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(partial, 0o755)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def with_wrapper(xml: str, socket_path: Path, incoming: bool) -> str:
    """The domain definition with the wrapper as its emulator and what it needs to know."""
    domain = ET.fromstring(xml)
    emulator = domain.find("devices/emulator")
    if emulator is None:
        raise ValueError("the domain XML names no emulator")
    env = {
        "SHOAL_QEMU": emulator.text or qemu_wrapper.QEMU,
        "SHOAL_MEMORY_SOCKET": str(socket_path),
    }
    if incoming:
        env["SHOAL_MEMORY_INCOMING"] = "1"
    emulator.text = str(WRAPPER)
    for old in domain.findall(f"{{{dom.QEMU_NS}}}commandline"):
        domain.remove(old)
    commandline = ET.SubElement(domain, f"{{{dom.QEMU_NS}}}commandline")
    for name, value in env.items():
        ET.SubElement(commandline, f"{{{dom.QEMU_NS}}}env", name=name, value=value)
    return ET.tostring(domain, encoding="unicode")


def stream_offset(save_image: Path) -> int:
    """Where QEMU's migration stream starts in a libvirt save image (after header and XML)."""
    with open(save_image, "rb") as f:
        header = templates.SAVE_HEADER.unpack(f.read(templates.SAVE_HEADER.size))
    if header[0] != templates.SAVE_MAGIC:
        raise VMStartFailed(f"{save_image} is not a libvirt save image")
    return templates.SAVE_HEADER.size + header[2]


def _identity(template: templates.Template) -> tuple[int, int]:
    found = (template.dir / MEMORY_FILE).stat()
    return found.st_ino, found.st_mtime_ns


def is_shareable(template: templates.Template) -> bool:
    return (template.dir / MEMORY_FILE).is_file() and (template.dir / DEVICE_STATE_FILE).is_file()


class SharedMemory:
    """This host's side of memory sharing: the broker, the sealed memory of each template, and
    the two libvirt sequences (making a template shareable, starting a clone from it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one sealed copy at a time; guards _fds
        self._broker: MemoryBroker | None = None
        self._started = False
        self._reason = "not started yet"
        # template dir -> (identity of its memory.ram, sealed memfd)
        self._fds: dict[Path, tuple[tuple[int, int], int]] = {}
        self._failed: set[tuple[Path, tuple[int, int]]] = set()

    def active(self) -> bool:
        """Started on first use, so only the worker that starts VMs serves the socket."""
        with self._lock:
            if not self._started:
                self._started = True
                self._start()
            broker = self._broker
        if broker is not None and not broker.serving():
            self._reason = "the memory broker's thread ended"
            return False
        return broker is not None

    def _start(self) -> None:
        if self.settings.memory_sharing == "off":
            self._reason = "SHOAL_MEMORY_SHARING=off"
            return
        host = hashlib.sha256(self.settings.host_name.encode()).hexdigest()[:8]
        path = self.settings.instance_vm_dir / f"memory-{host}.sock"
        try:
            install_wrapper()
            dom.make_dirs(path.parent, Path(self.settings.vm_dir))
            broker = MemoryBroker(path, self.settings.run_dir / f"memory-{host}.lock")
            broker.start()
        except OSError as exc:
            self._reason = f"the memory broker could not start: {exc}"
            log.warning("memory sharing off: %s", self._reason)
            return
        self._broker, self._reason = broker, ""

    def status(self) -> dict[str, Any]:
        """The active mode and why the others are not (for /healthz's admin view). Never
        starts the broker (a process that only reports must not take the socket)."""
        with self._lock:
            started = self._started
        report: dict[str, Any] = {"ksm": ksm_status(), "full_copy": FULL_COPY}
        if not started and self.settings.memory_sharing == "auto":
            return {"mode": "auto", "detail": "decided when this worker starts its first VM",
                    **report}  # fmt: skip
        if not self.active():
            return {"mode": "off", "reason": self._reason, **report}
        fallbacks = sorted({directory.name for directory, _identity in self._failed})
        return {
            "mode": "template-memory",
            "detail": "clones map a sealed copy of their template's memory copy-on-write",
            "templates_held": len(self._fds),
            "templates_falling_back": fallbacks,
            **report,
        }

    def usable_for(self, template: templates.Template) -> bool:
        if not is_shareable(template) or not self.active():
            return False
        return (template.dir, _identity(template)) not in self._failed

    def failed(self, template: templates.Template) -> None:
        """A clone could not start on this template's memory: its next clones read the
        snapshot (a rebuilt template, whose memory file differs, is tried again)."""
        with contextlib.suppress(OSError):
            self._failed.add((template.dir, _identity(template)))

    def _template_fd(self, template: templates.Template) -> int:
        """A duplicate (the caller's to close) of the sealed memfd of the template's current
        memory.ram: reloaded when the file is replaced; memfds of templates gone are closed."""
        identity = _identity(template)
        with self._load_lock:
            cached = self._fds.get(template.dir)
            if cached is None or cached[0] != identity:
                fd = sealed_copy(template.dir / MEMORY_FILE, f"shoal-{template.key}")
                stale = [d for d in self._fds if d == template.dir or not d.is_dir()]
                for directory in stale:
                    os.close(self._fds.pop(directory)[1])  # the broker holds its own dups
                cached = self._fds[template.dir] = (identity, fd)
            return os.dup(cached[1])

    # --- a clone -------------------------------------------------------------------------------
    def start_clone(
        self,
        conn: LibvirtConnection,
        name: str,
        xml: str,
        identity: VMIdentity,
        template: templates.Template,
    ) -> None:
        """Start `name` paused with the template's memory mapped privately and its device
        state loaded; the caller confines and resumes it."""
        memory = self._template_fd(template)
        try:
            self.start_on(conn, name, xml, identity, memory, template.dir / DEVICE_STATE_FILE)
        finally:
            os.close(memory)

    def start_on(
        self,
        conn: LibvirtConnection,
        name: str,
        xml: str,
        identity: VMIdentity,
        memory: int,
        device_state: Path,
    ) -> None:
        """Start `name` paused on the sealed memfd `memory`, mapped privately, with the device
        state saved beside it (a template's, or a fork's: workers/fork_base.py)."""
        self._start_incoming(conn, name, xml, identity, Grant(memory, shared=False))
        fd = os.open(device_state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.lseek(fd, stream_offset(device_state), os.SEEK_SET)
            qmp(conn, name, "getfd", {"fdname": INCOMING_FD_NAME}, fd)
        finally:
            os.close(fd)
        qmp(conn, name, "migrate-set-capabilities", IGNORE_SHARED)
        qmp(conn, name, "migrate-incoming", {"uri": f"fd:{INCOMING_FD_NAME}"})
        wait_for_migration(conn, name)

    def migrate_into(
        self,
        conn: LibvirtConnection,
        source: str,
        name: str,
        xml: str,
        identity: VMIdentity,
        memory_mib: int,
        confine: Callable[[], None],
    ) -> int:
        """Migrate the running domain `source` into a new domain `name` (defined by `xml`,
        started paused, `confine`d, its RAM on a new memfd mapped shared): a writable memfd
        holding `source`'s memory at the end of the migration, the caller's to close. `source`
        is left paused (resume it), `name` paused with its whole state (`save_device_state`).
        On failure the memfd is closed; the caller destroys `name` and resumes `source`."""
        memory = writable_memfd(f"shoal-fork-{name}", memory_mib << 20)
        try:
            self._start_incoming(conn, name, xml, identity, Grant(memory, shared=True))
            confine()
            _migrate(conn, source, name)
        except BaseException:
            os.close(memory)
            raise
        return memory

    def _start_incoming(
        self, conn: LibvirtConnection, name: str, xml: str, identity: VMIdentity, grant: Grant
    ) -> None:
        """Start `name` paused, waiting for an incoming migration, its RAM on `grant`'s fd."""
        broker = self._broker
        assert broker is not None
        broker.expect(identity.uid, grant)
        try:
            defined = with_wrapper(xml, broker.socket_path, incoming=True)
            conn.call(
                f"start {name}",
                lambda c: c.createXML(defined, libvirt.VIR_DOMAIN_START_PAUSED),
                retry=False,
            )
        finally:
            broker.forget(identity.uid)

    def save_device_state(
        self, conn: LibvirtConnection, name: str, memory: int, device_state: Path
    ) -> None:
        """Save the paused domain `name`'s device state only (its RAM is `memory`, shared) and
        seal `memory` once its QEMU is gone. On failure the domain is destroyed."""
        try:
            qmp(conn, name, "migrate-set-capabilities", IGNORE_SHARED)
            conn.call(
                f"save {name}'s device state",
                lambda c: c.lookupByName(name).saveFlags(str(device_state), None, 0),
                retry=False,
            )
            _seal_when_unmapped(memory)
        except BaseException:
            device_state.unlink(missing_ok=True)
            with contextlib.suppress(Exception):
                conn.call(f"destroy {name}", lambda c: c.lookupByName(name).destroy(), retry=False)
            raise

    def _restore_into(
        self,
        conn: LibvirtConnection,
        name: str,
        image: Path,
        xml: str,
        identity: VMIdentity,
        memory: int,
        device_state: Path,
    ) -> None:
        """Restore `image` paused with its RAM on `memory` (shared), then save only its device
        state (x-ignore-shared) to `device_state`; its QEMU is gone afterwards."""
        broker = self._broker
        assert broker is not None
        defined = with_wrapper(xml, broker.socket_path, incoming=False)
        broker.expect(identity.uid, Grant(memory, shared=True))
        try:
            conn.call(
                f"restore {name} into shared memory",
                lambda c: c.restoreFlags(str(image), defined, libvirt.VIR_DOMAIN_SAVE_PAUSED),
                retry=False,
            )
        finally:
            broker.forget(identity.uid)
        qmp(conn, name, "migrate-set-capabilities", IGNORE_SHARED)
        conn.call(
            f"save {name}'s device state",
            lambda c: c.lookupByName(name).saveFlags(str(device_state), None, 0),
            retry=False,
        )

    # --- a template ----------------------------------------------------------------------------
    def make_shareable(
        self,
        conn: LibvirtConnection,
        building: Path,
        name: str,
        uuid: str,
        identity: VMIdentity,
        memory_mib: int,
        make_overlay: Any,
    ) -> None:
        """Write memory.ram and device.save into the template being built: its save image is
        restored, paused, into a shared memfd, whose device state is then saved with
        x-ignore-shared; the memfd is sealed and written out."""
        memory = writable_memfd(f"shoal-building-{name}", memory_mib << 20)
        scratch = dom.VMPaths(building / "sharing")
        try:
            scratch.dir.mkdir(mode=0o710)
            os.chown(scratch.dir, 0, identity.gid)
            overlay = scratch.dir / "data.qcow2"
            make_overlay(overlay, building / templates.DISK_FILE, "qcow2", identity)
            transfer_disk.create(scratch.transfer_disk, identity)
            image = scratch.dir / "restore.save"
            shutil.copyfile(building / templates.STATE_FILE, image)
            xml = dom.retarget_xml(
                (building / templates.XML_FILE).read_text(),
                name=name,
                uuid=uuid,
                data_disk=overlay,
                transfer_disk=scratch.transfer_disk,
                agent_socket=scratch.socket,
                console_log=scratch.console_log,
                metadata={"template": name, "sharing": "1"},
                identity=identity,
            )
            self._restore_into(
                conn, name, image, xml, identity, memory, building / DEVICE_STATE_FILE
            )
            _seal_when_unmapped(memory)
            _write_out(memory, building / MEMORY_FILE)
        except BaseException:
            for leftover in (building / DEVICE_STATE_FILE, building / MEMORY_FILE):
                leftover.unlink(missing_ok=True)
            raise
        finally:
            os.close(memory)
            shutil.rmtree(scratch.dir, ignore_errors=True)


def ksm_status() -> str:
    """KSM is never turned on by Shoal: pages merged across tenants leak through write timing."""
    try:
        running = KSM_RUN.read_text().strip() == "1"
    except OSError:
        return "off (this kernel has no KSM)"
    if running:
        return (
            "on, set by the operator: QEMU's guest RAM is not marked mergeable by Shoal, but "
            "pages merged across tenants are a timing side channel (docs/security.md)"
        )
    return "off (an operator's opt-in: pages merged across tenants are a side channel)"


def qmp(
    conn: LibvirtConnection, name: str, command: str, arguments: dict | None = None, fd: int = -1
) -> dict[str, Any]:
    """One QMP command through libvirt's passthrough; its `return`, or VMStartFailed."""
    body = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})

    def send(c: libvirt.virConnect) -> str:
        domain = c.lookupByName(name)
        if fd >= 0:
            return libvirt_qemu.qemuMonitorCommandWithFiles(domain, body, [fd], 0)[0]
        return libvirt_qemu.qemuMonitorCommand(domain, body, 0)

    answer = json.loads(conn.call(f"{command} on {name}", send, retry=False))
    if "error" in answer:
        raise VMStartFailed(f"QMP {command} on {name}: {answer['error'].get('desc', answer)}")
    return answer.get("return", {})


def _migrate(conn: LibvirtConnection, source: str, target: str) -> None:
    """Migrate `source`, paused, into `target` (started with -incoming defer) over a socket
    pair, whole (no RAM left out), as fast as the host goes; both are paused once it
    completes, and after a failed or overlong migration (cancelled) `source` is too."""
    out, into = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        qmp(conn, target, "getfd", {"fdname": INCOMING_FD_NAME}, into.fileno())
        qmp(conn, source, "getfd", {"fdname": OUTGOING_FD_NAME}, out.fileno())
    finally:
        out.close()
        into.close()
    qmp(conn, target, "migrate-incoming", {"uri": f"fd:{INCOMING_FD_NAME}"})
    qmp(conn, source, "migrate-set-capabilities", SAVE_ALL_MEMORY)
    qmp(conn, source, "migrate-set-parameters", MIGRATE_FAST)
    # Paused first: measured here (QEMU 7.2, TCG), pages a running guest wrote during the copy
    # were not all sent again, and its forks' kernels found their memory corrupt.
    conn.call(f"pause {source}", lambda c: c.lookupByName(source).suspend())
    qmp(conn, source, "migrate", {"uri": f"fd:{OUTGOING_FD_NAME}"})
    deadline = time.monotonic() + MIGRATION_TIMEOUT_S
    while True:
        status = qmp(conn, source, "query-migrate").get("status")
        if status == "completed":
            break
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            with contextlib.suppress(VMStartFailed):
                qmp(conn, source, "migrate_cancel")
            raise VMStartFailed(f"migrating {source} into {target} ended {status}")
        time.sleep(MIGRATION_POLL_S)
    wait_for_migration(conn, target)


def wait_for_migration(conn: LibvirtConnection, name: str) -> None:
    deadline = time.monotonic() + INCOMING_TIMEOUT_S
    while True:
        status = qmp(conn, name, "query-migrate").get("status")
        if status == "completed":
            return
        if status == "failed" or time.monotonic() > deadline:
            raise VMStartFailed(f"{name}: its incoming migration ended {status}")
        time.sleep(0.005)


def _seal_when_unmapped(memory: int) -> None:
    """Seal once the template's QEMU (its shared writable mapping) is gone."""
    deadline = time.monotonic() + SEAL_WAIT_S
    while True:
        try:
            seal_read_only(memory)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _write_out(memory: int, path: Path) -> None:
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        copy_sparse(memory, out, os.fstat(memory).st_size)
    finally:
        os.close(out)
