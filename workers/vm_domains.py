"""The mechanics of one domain: bring it up to a connected guest agent, take it down again.

The VM lifecycle (workers/vm.py) decides what to do (restore a template clone or cold boot,
adopt, destroy, reconcile) and the template builder (workers/template_builder.py) boots the
guests it saves; both start and stop domains the same way, so that is kept here, apart from
either: the guest image this process pins, the data disk overlay, the domain definition, a cold
boot (`boot`), the restore of a template clone (`restore`), waiting for the agent's hello, and a
destroy that retries while QEMU is busy. Every domain starts paused under its own uid
(workers/vm_identity.py), gets its memory and pids limits written into its cgroups, and only
then runs: a guest never runs a moment without its limits. Each step is timed into the
caller's `timings` and logged as `vm=<id> host=<host> step=<step> ms=<ms>` (the bench reads
those lines back from the worker log, shoal/bench/sessions.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt

from shoal import data_disk, images
from shoal.settings import Settings
from workers import domain as dom
from workers import libvirt_conn, shared_memory, templates, transfer_disk, vm_identity
from workers.agent_client import (
    AgentClient,
    AgentDisconnected,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
)
from workers.vm_errors import VMError, VMStartFailed
from workers.vm_identity import VMIdentity
from workers.vm_probes import HostProbes

if TYPE_CHECKING:
    from workers.running_vm import VMSpec

log = logging.getLogger("shoal.vm")

CONNECT_ATTEMPT_S = 5.0
DESTROY_TRIES = 3


def lookup(c: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    """The domain called `name`, or None when there is none."""
    try:
        return c.lookupByName(name)
    except libvirt.libvirtError as exc:
        if libvirt_conn.is_no_domain(exc):
            return None
        raise


def _tail(path: Path, max_bytes: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


CONFINEMENT = ("user_cgroup", "no_user_namespaces", "ptrace_restricted", "proc_hidden")


def unconfined_measures(hello: dict[str, Any]) -> list[str]:
    """The guest-hardening measures the agent's hello does not report in force (all of them
    when it reports none): a guest without them never runs user code."""
    report = hello.get("confinement")
    if not isinstance(report, dict):
        return list(CONFINEMENT)
    return [name for name in CONFINEMENT if report.get(name) is not True]


class DomainOps:
    """Starts and stops this instance's domains on this host."""

    def __init__(
        self, settings: Settings, probes: HostProbes, store: templates.TemplateStore
    ) -> None:
        self.settings = settings
        self.probes = probes
        self.templates = store
        self._lock = threading.Lock()
        self._images: dict[str, images.ImageArtifacts] = {}  # image name -> pinned build
        self.shared = shared_memory.SharedMemory(settings)

    @property
    def libvirt(self) -> libvirt_conn.LibvirtConnection:
        return libvirt_conn.connection()

    def artifacts(self, image: str) -> images.ImageArtifacts:
        """The build of `image` this process first found: a worker keeps its image (and so its
        templates) until it restarts, even when a newer build of the recipe lands."""
        with self._lock:
            pinned = self._images.get(image)
        if pinned is not None and pinned.rootfs.exists():
            return pinned
        artifacts = images.locate(self.settings, image)
        if artifacts is None:
            raise VMStartFailed(
                f"guest image {image!r} is not built: run `shoal image build {image}`"
            )
        for path in (artifacts.kernel, artifacts.initrd, artifacts.rootfs):
            vm_identity.make_shared_read_only(path)  # libvirt once chowned them to its user
        with self._lock:
            self._images[image] = artifacts
        return artifacts

    def cmdline(self) -> str:
        return images.kernel_cmdline(self.settings)

    @contextlib.contextmanager
    def step(self, who: str, step: str, timings: dict[str, float]) -> Iterator[None]:
        """Time one step of making VM `who` into timings[step], and log it."""
        started = time.monotonic()
        try:
            yield
        except BaseException as exc:
            ms = (time.monotonic() - started) * 1000
            log.warning(
                "vm=%s host=%s step=%s failed after ms=%.0f: %s",
                who,
                self.settings.host_name,
                step,
                ms,
                exc,
            )
            raise
        ms = (time.monotonic() - started) * 1000
        timings[step] = round(ms, 1)
        log.info("vm=%s host=%s step=%s ms=%.0f", who, self.settings.host_name, step, ms)

    # --- taking down -------------------------------------------------------------------------
    def is_active(self, name: str) -> bool:
        def active(c: libvirt.virConnect) -> bool:
            domain = lookup(c, name)
            return domain is not None and bool(domain.isActive())

        return self.libvirt.call(f"look up {name}", active)

    def destroy_domain(self, name: str) -> bool:
        """Destroy (and undefine, if persistent) a domain; True if there was one."""

        def destroy(c: libvirt.virConnect) -> bool:
            domain = lookup(c, name)
            if domain is None:
                return False
            try:
                domain.destroy()
            except libvirt.libvirtError as exc:
                if not (libvirt_conn.is_no_domain(exc) or libvirt_conn.is_not_running(exc)):
                    raise
            with contextlib.suppress(libvirt.libvirtError):
                if domain.isPersistent():
                    domain.undefine()
            return True

        for attempt in range(1, DESTROY_TRIES + 1):
            try:
                return self.libvirt.call(f"destroy {name}", destroy)
            except VMError:
                if attempt == DESTROY_TRIES:
                    raise
                time.sleep(0.5 * attempt)  # "Failed to terminate process": QEMU busy in I/O
        return False

    def remove_files(self, name: str, directory: Path | None) -> None:
        """The VM's directory, libvirt's log of the domain (it outlives the domain) and the
        cgroups made for its limits."""
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        self.probes.remove_limits(name)
        for path in dom.qemu_log_files(name):
            with contextlib.suppress(OSError):
                path.unlink()

    def teardown(self, name: str, paths: dom.VMPaths) -> None:
        """Destroy the domain and remove its files; nothing happens for what is not there."""
        self.destroy_domain(name)
        self.remove_files(name, paths.dir)

    # --- bringing up -------------------------------------------------------------------------
    def claim(self, directory: Path) -> VMIdentity:
        """Make the VM's directory, owned by a uid of its own (workers/vm_identity.py)."""
        vm_identity.ensure_libvirt_dirs()
        dom.make_dirs(directory.parent, Path(self.settings.vm_dir))
        try:
            return vm_identity.claim_dir(self.settings, directory)
        except vm_identity.NoFreeUid as exc:
            raise VMStartFailed(str(exc)) from None

    def claim_vm(self, paths: dom.VMPaths) -> VMIdentity:
        """claim() a session VM's directory and mark it as this host's (VMPaths.host_marker)."""
        identity = self.claim(paths.dir)
        fd = os.open(
            paths.host_marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600
        )
        with os.fdopen(fd, "w") as marker:
            marker.write(self.settings.host_name)
        return identity

    def qemu_pid(self, name: str) -> int:
        try:
            return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
        except (OSError, ValueError) as exc:
            raise VMStartFailed(f"domain {name} has no QEMU pid: {exc}") from None

    def memory_limit_bytes(self, memory_mib: int) -> int:
        """Guest memory, TCG's translation cache and QEMU's own (settings)."""
        tb_cache = self.settings.tb_cache_mib if self.probes.accel().kind == "tcg" else 0
        return (memory_mib + tb_cache + self.settings.vm_memory_overhead_mib) << 20

    def run_confined(
        self, name: str, paths: dom.VMPaths, identity: VMIdentity, memory_mib: int
    ) -> None:
        """The domain, started paused: limit it, hand it its socket and log, then resume it."""
        self.probes.apply_limits(
            name,
            self.qemu_pid(name),
            self.memory_limit_bytes(memory_mib),
            self.settings.vm_pids_max,
        )
        for path in (paths.socket, paths.console_log):
            with contextlib.suppress(FileNotFoundError):
                vm_identity.give(path, identity)
        self.libvirt.call(f"resume {name}", lambda c: c.lookupByName(name).resume(), retry=False)

    def _start_sharing(
        self,
        who: str,
        name: str,
        paths: dom.VMPaths,
        xml: str,
        identity: VMIdentity,
        template: templates.Template,
        timings: dict[str, float],
    ) -> bool:
        """Start the clone on its template's shared memory (workers/shared_memory.py), running
        and confined; False (nothing left running) when the template or host cannot."""
        if not self.shared.usable_for(template):
            return False
        try:
            with self.step(who, "restore_shared", timings):
                self.shared.start_clone(self.libvirt, name, xml, identity, template)
                self.run_confined(name, paths, identity, int(template.meta["shape"]["memory_mib"]))
            return True
        except (VMError, OSError, ValueError) as exc:
            if isinstance(exc, libvirt_conn.LibvirtUnavailable):
                raise
            log.warning("VM %s: shared-memory start failed, reading the snapshot: %s", who, exc)
            self.shared.failed(template)
            self.destroy_domain(name)
            return False

    def _start_reading(
        self,
        who: str,
        name: str,
        uuid: str,
        paths: dom.VMPaths,
        xml: str,
        identity: VMIdentity,
        template: templates.Template,
        timings: dict[str, float],
    ) -> None:
        """The ordinary restore: a private copy of the save image, read whole by libvirt."""
        with self.step(who, "copy", timings):
            self.templates.prepare_clone(template, paths.restore_image, name, uuid)
        with self.step(who, "restore", timings):
            self.libvirt.call(
                f"restore {name}",
                lambda c: c.restoreFlags(
                    str(paths.restore_image), xml, libvirt.VIR_DOMAIN_SAVE_PAUSED
                ),
                retry=False,
            )
            self.run_confined(name, paths, identity, int(template.meta["shape"]["memory_mib"]))

    def make_overlay(
        self, overlay: Path, backing: Path, backing_format: str, identity: VMIdentity
    ) -> None:
        self._qcow2(overlay, ["-b", str(backing), "-F", backing_format], identity)

    def make_disk(self, path: Path, size_mib: int, identity: VMIdentity) -> None:
        """An empty qcow2 disk of `size_mib`, the VM's own."""
        self._qcow2(path, [], identity, f"{size_mib}M")

    @staticmethod
    def _qcow2(path: Path, options: list[str], identity: VMIdentity, size: str = "") -> None:
        command = ["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path)]
        result = subprocess.run([*command, *([size] if size else [])], capture_output=True,
                                text=True)  # fmt: skip
        if result.returncode != 0:
            raise VMStartFailed(f"qemu-img create {path} failed: {result.stderr.strip()}")
        vm_identity.give(path, identity)

    def await_agent(
        self, who: str, name: str, paths: dom.VMPaths, timeout: float
    ) -> tuple[AgentClient, dict[str, Any]]:
        """Connect to the guest agent and get its hello, or VMStartFailed (domain destroyed
        by the caller). Gives up early if the domain dies."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                agent = AgentClient.connect(
                    str(paths.socket), timeout=min(CONNECT_ATTEMPT_S, remaining)
                )
            except (AgentTimeout, AgentDisconnected) as exc:
                last = str(exc)
                if not self.is_active(name):
                    break
                time.sleep(0.1)
                continue
            try:
                hello = agent.hello(packages=False, timeout=max(remaining, 0.1))
            except (AgentTimeout, AgentDisconnected, AgentProtocolError, AgentError) as exc:
                agent.close()
                last = str(exc)
                if isinstance(exc, AgentTimeout | AgentProtocolError | AgentError):
                    break
                if not self.is_active(name):
                    break
                time.sleep(0.1)
                continue
            unconfined = unconfined_measures(hello)
            if unconfined:
                agent.close()
                raise VMStartFailed(
                    f"VM {who}: the guest does not confine user code ({', '.join(unconfined)} "
                    "not in force): refused. The console log says why; docs/security.md, "
                    "'The hardened guest'"
                )
            return agent, hello
        alive = "the domain is running" if self.is_active(name) else "the domain died"
        tail = _tail(paths.console_log, 1500).strip()
        raise VMStartFailed(
            f"VM {who}: the guest agent did not answer within {timeout:.0f} s ({alive}; "
            f"last error: {last or 'none'}). Console log tail:\n{tail or '(empty)'}"
        )

    def domain_spec(
        self,
        name: str,
        uuid: str,
        paths: dom.VMPaths,
        spec: VMSpec,
        artifacts: images.ImageArtifacts,
        metadata: dict[str, str],
        identity: VMIdentity,
    ) -> dom.DomainSpec:
        return dom.DomainSpec(
            name=name,
            uuid=uuid,
            accel=self.probes.accel().kind,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            kernel=artifacts.kernel,
            initrd=artifacts.initrd,
            cmdline=self.cmdline(),
            rootfs=artifacts.rootfs,
            data_disk=paths.data_disk,
            transfer_disk=paths.transfer_disk,
            agent_socket=paths.socket,
            console_log=paths.console_log,
            tb_cache_mib=self.settings.tb_cache_mib,
            cpu_quota=self.probes.cpu_quota(spec.cpu_quota, spec.vcpus),
            disk_bytes_per_s=self.settings.vm_disk_bytes_per_s,
            disk_iops=self.settings.vm_disk_iops,
            identity=identity,
            network=spec.network,
            metadata=metadata,
        )

    def boot(
        self,
        who: str,
        name: str,
        uuid: str,
        paths: dom.VMPaths,
        spec: VMSpec,
        artifacts: images.ImageArtifacts,
        metadata: dict[str, str],
        timings: dict[str, float],
        identity: VMIdentity,
    ) -> AgentClient:
        """Cold boot a domain from the image as `identity`; its agent, connected. On failure
        the caller tears the domain down."""
        with self.step(who, "overlay", timings):
            base = data_disk.data_disk_base(self.settings, spec.data_disk_mib)
            vm_identity.make_shared_read_only(base)  # the backing file of every VM's disk
            self.make_overlay(paths.data_disk, base, "raw", identity)
            transfer_disk.create(paths.transfer_disk, identity)
        domain_spec = self.domain_spec(name, uuid, paths, spec, artifacts, metadata, identity)
        xml = dom.domain_xml(domain_spec)
        with self.step(who, "start", timings):
            self.libvirt.call(
                f"start {name}",
                lambda c: c.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED),
                retry=False,
            )
            self.run_confined(name, paths, identity, spec.memory_mib)
        self.probes.verify_quota(name, domain_spec.cpu_quota)
        with self.step(who, "agent", timings):
            agent, _hello = self.await_agent(who, name, paths, self.settings.agent_ready_timeout_s)
        return agent

    def restore(
        self,
        who: str,
        name: str,
        uuid: str,
        paths: dom.VMPaths,
        template: templates.Template,
        metadata: dict[str, str],
        timings: dict[str, float],
        identity: VMIdentity,
    ) -> AgentClient:
        """Restore a clone of `template` as domain `name`, running as `identity`; its agent,
        connected and reseeded (clock and entropy). On failure the caller tears the domain
        down."""
        with self.step(who, "overlay", timings):
            self.make_overlay(paths.data_disk, template.data_disk, "qcow2", identity)
            transfer_disk.create(paths.transfer_disk, identity)
        xml = dom.retarget_xml(
            template.xml,
            name=name,
            uuid=uuid,
            data_disk=paths.data_disk,
            transfer_disk=paths.transfer_disk,
            agent_socket=paths.socket,
            console_log=paths.console_log,
            metadata=metadata,
            identity=identity,
        )
        if not self._start_sharing(who, name, paths, xml, identity, template, timings):
            self._start_reading(who, name, uuid, paths, xml, identity, template, timings)
        with contextlib.suppress(FileNotFoundError):
            paths.restore_image.unlink()
        with self.step(who, "agent", timings):
            agent, _hello = self.await_agent(who, name, paths, self.settings.agent_ready_timeout_s)
        with self.step(who, "reseed", timings):
            self.reseed(who, agent, "restored")
        return agent

    @staticmethod
    def reseed(who: str, agent: AgentClient, how: str) -> None:
        """Set the guest's clock and mix fresh entropy in, as after every restore of a saved
        state (`how` names it in the error); VMStartFailed, the agent closed, when it fails."""
        try:
            agent.reseed(time.time_ns(), os.urandom(64), identity=who)
        except (AgentTimeout, AgentDisconnected, AgentProtocolError, AgentError) as exc:
            agent.close()
            raise VMStartFailed(f"VM {who}: reseeding the {how} guest failed: {exc}") from None
