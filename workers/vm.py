"""VM lifecycle on one host: create (restore a template clone, or cold boot), attach, destroy.

`VMManager` is made once per worker process (it does no I/O until used). `create()` returns a
`VM` whose agent is connected and, after a restore, reseeded: the guest's clock and its kernel
random pool are cloned with the memory, so each clone gets the host's time and 64 fresh bytes
of entropy before any user code runs. Every step is logged with the session id and its
duration (`session=... step=... ms=...`), and kept in `VM.timings`.

Executions (`VM.execute`): the agent enforces the timeout itself (SIGINT at timeout_s, then
it kills and restarts the interpreter). The host waits timeout_s + the agent's grace +
settings.interrupt_grace_s; if no answer has come by then, or the guest broke the protocol,
or the channel closed, the VM is destroyed and VMLost raised. A worker thread is therefore
never blocked longer than that by a guest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import libvirt

from shoal import data_disk, images, protocol
from shoal.settings import Settings
from workers import accel as accel_mod
from workers import domain as dom
from workers import libvirt_conn, templates
from workers.agent_client import (
    AgentClient,
    AgentDisconnected,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
)
from workers.cgroups import CpuControllerProbe, probe_cpu_controller
from workers.reconcile import ReconcileReport, our_domains
from workers.reconcile import reconcile as reconcile_domains
from workers.vm_errors import (
    AgentRefused,
    TemplateError,
    VMError,
    VMLost,
    VMStartFailed,
)

log = logging.getLogger("shoal.vm")

CONNECT_ATTEMPT_S = 5.0
ATTACH_HELLO_S = 10.0
# After the template's client disconnects, let the guest agent see it before the snapshot.
TEMPLATE_SETTLE_S = 1.0
DESTROY_TRIES = 3
CONSOLE_TAIL_BYTES = 2048
QEMU_CONF = Path("/etc/libvirt/qemu.conf")


@dataclass(frozen=True)
class VMSpec:
    """What a pool asks of its VMs."""

    image: str = "python"
    vcpus: int = 1
    memory_mib: int = 512
    data_disk_mib: int = 1024
    network: bool = False
    cpu_quota: float = 0.0  # cores for the whole QEMU process (cgroup cpu); 0: no cap

    def shape(self) -> dict[str, Any]:
        shape = asdict(self)
        del shape["image"]
        return shape


class VM:
    """One running session VM owned by this process."""

    def __init__(
        self,
        manager: VMManager,
        session_id: str,
        key: str,
        domain_name: str,
        uuid: str,
        paths: dom.VMPaths,
        spec: VMSpec,
        restored: bool,
        agent: AgentClient,
        timings: dict[str, float] | None = None,
    ) -> None:
        self._manager = manager
        self.session_id = session_id
        self.key = key
        self.domain_name = domain_name
        self.uuid = uuid
        self.paths = paths
        self.spec = spec
        self.restored = restored
        self.agent = agent
        self.timings = timings or {}
        self.created_at = time.time()
        self.lost_reason: str | None = None

    @property
    def socket_path(self) -> Path:
        return self.paths.socket

    def execute(
        self,
        code: str,
        language: str = "python",
        timeout_s: float = 60,
        max_output: int = protocol.DEFAULT_MAX_OUTPUT,
    ) -> dict[str, Any]:
        """Run code in the guest; the agent's answer (status ok/error/timed_out/interrupted).

        Raises VMLost (VM destroyed) when the guest does not answer in time, breaks the
        protocol or closes the channel; AgentRefused when the agent refuses the request.
        """
        if self.lost_reason is not None:
            raise VMLost(f"session {self.session_id}: {self.lost_reason}")
        grace = self.agent.interrupt_grace_s + self._manager.settings.interrupt_grace_s
        try:
            return self.agent.execute(code, language, timeout_s, max_output, grace_s=grace)
        except AgentError as exc:
            raise AgentRefused(exc.code, exc.message) from None
        except AgentTimeout:
            reason = (
                f"the execution did not end within its {timeout_s} s timeout plus {grace:.0f} s "
                "(the agent interrupts at the timeout, then restarts the interpreter)"
            )
        except AgentProtocolError as exc:
            reason = f"the guest broke the agent protocol ({exc})"
        except AgentDisconnected as exc:
            reason = self.lost_reason or f"the agent channel closed ({exc})"
        self._manager._lose(self, reason)
        raise VMLost(f"session {self.session_id}: {reason}; its VM was destroyed")

    def console_tail(self, max_bytes: int = CONSOLE_TAIL_BYTES) -> str:
        return _tail(self.paths.console_log, max_bytes)

    def qemu_pid(self) -> int | None:
        return _qemu_pid(self.domain_name)


def _lookup(c: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
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


def _qemu_pid(name: str) -> int | None:
    try:
        return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _seccomp_sandbox_setting(path: Path = QEMU_CONF) -> bool:
    """qemu.conf's seccomp_sandbox (1, on, by default)."""
    try:
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("seccomp_sandbox") and "=" in line:
                return line.split("=", 1)[1].strip() != "0"
    except OSError:
        pass
    return True


class VMManager:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.templates = templates.TemplateStore(settings)
        self._lock = threading.Lock()
        self._vms: dict[str, VM] = {}
        self._busy: set[str] = set()
        self._images: dict[str, images.ImageArtifacts] = {}  # image name -> pinned build
        self._accel: accel_mod.AccelChoice | None = None
        self._cpu_probe: CpuControllerProbe | None = None
        self._quota_verified: bool | None = None
        self._versions: tuple[int, int] | None = None

    # --- plumbing ----------------------------------------------------------------------------
    @property
    def libvirt(self) -> libvirt_conn.LibvirtConnection:
        return libvirt_conn.connection()

    def accel(self) -> accel_mod.AccelChoice:
        if self._accel is None:
            offers_kvm = None
            if self.settings.accel == "auto" and accel_mod.cpu_has_hw_virt():
                caps = self.libvirt.call("capabilities", lambda c: c.getCapabilities())
                offers_kvm = accel_mod.libvirt_offers_kvm(caps)
            self._accel = accel_mod.detect(self.settings.accel, offers_kvm)
            log.info("accelerator: %s (%s)", self._accel.kind, self._accel.reason)
        return self._accel

    def cpu_controller(self) -> CpuControllerProbe:
        if self._cpu_probe is None:
            self._cpu_probe = probe_cpu_controller()
        return self._cpu_probe

    def _hypervisor_versions(self) -> tuple[int, int]:
        if self._versions is None:
            self._versions = self.libvirt.call(
                "versions", lambda c: (c.getVersion(), c.getLibVersion())
            )
        return self._versions

    def _artifacts(self, spec: VMSpec) -> images.ImageArtifacts:
        """The image this process first found for the recipe: a worker keeps its image (and so
        its templates) until it restarts, even when a newer build of the recipe lands."""
        with self._lock:
            pinned = self._images.get(spec.image)
        if pinned is not None and pinned.rootfs.exists():
            return pinned
        artifacts = images.locate(self.settings, spec.image)
        if artifacts is not None:
            with self._lock:
                self._images[spec.image] = artifacts
        if artifacts is None:
            raise VMStartFailed(
                f"guest image {spec.image!r} is not built: run `shoal image build {spec.image}`"
            )
        return artifacts

    def _cmdline(self) -> str:
        return images.kernel_cmdline(self.settings)

    def _cpu_quota(self, spec: VMSpec) -> float:
        if spec.cpu_quota <= 0:
            return 0.0
        if not self.cpu_controller().available:
            log.warning(
                "cpu_quota %.2f not applied: %s", spec.cpu_quota, self.cpu_controller().detail
            )
            return 0.0
        return spec.cpu_quota

    @contextlib.contextmanager
    def _step(self, who: str, step: str, timings: dict[str, float]) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        except BaseException as exc:
            ms = (time.monotonic() - started) * 1000
            log.warning(
                "session=%s host=%s step=%s failed after ms=%.0f: %s",
                who,
                self.settings.host_name,
                step,
                ms,
                exc,
            )
            raise
        ms = (time.monotonic() - started) * 1000
        timings[step] = round(ms, 1)
        log.info("session=%s host=%s step=%s ms=%.0f", who, self.settings.host_name, step, ms)

    def _domain_active(self, name: str) -> bool:
        def active(c: libvirt.virConnect) -> bool:
            domain = _lookup(c, name)
            return domain is not None and bool(domain.isActive())

        return self.libvirt.call(f"look up {name}", active)

    def _destroy_domain(self, name: str) -> bool:
        """Destroy (and undefine, if persistent) a domain; True if there was one."""

        def destroy(c: libvirt.virConnect) -> bool:
            domain = _lookup(c, name)
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

    def _remove_files(self, name: str, directory: Path | None) -> None:
        """The VM's directory, and libvirt's log of the domain (it outlives the domain)."""
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        for path in dom.qemu_log_files(name):
            with contextlib.suppress(OSError):
                path.unlink()

    def _teardown(self, name: str, paths: dom.VMPaths) -> None:
        self._destroy_domain(name)
        self._remove_files(name, paths.dir)

    def _make_overlay(self, overlay: Path, backing: Path, backing_format: str) -> None:
        result = subprocess.run(
            [
                "qemu-img", "create", "-q", "-f", "qcow2",
                "-b", str(backing), "-F", backing_format, str(overlay),
            ],
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise VMStartFailed(f"qemu-img create {overlay} failed: {result.stderr.strip()}")

    def _await_agent(
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
                if not self._domain_active(name):
                    break
                time.sleep(0.1)
                continue
            try:
                hello = agent.hello(packages=False, timeout=max(remaining, 0.1))
                return agent, hello
            except (AgentTimeout, AgentDisconnected, AgentProtocolError, AgentError) as exc:
                agent.close()
                last = str(exc)
                if isinstance(exc, AgentTimeout | AgentProtocolError | AgentError):
                    break
                if not self._domain_active(name):
                    break
                time.sleep(0.1)
        alive = "the domain is running" if self._domain_active(name) else "the domain died"
        tail = _tail(paths.console_log, 1500).strip()
        raise VMStartFailed(
            f"session {who}: the guest agent did not answer within {timeout:.0f} s ({alive}; "
            f"last error: {last or 'none'}). Console log tail:\n{tail or '(empty)'}"
        )

    # --- template key ------------------------------------------------------------------------
    def _template_id(
        self, spec: VMSpec, artifacts: images.ImageArtifacts
    ) -> tuple[str, str, dict[str, Any]]:
        choice = self.accel()
        qemu_version, libvirt_version = self._hypervisor_versions()
        shape = spec.shape()
        shape["cpu_quota"] = self._cpu_quota(spec)
        describe = {
            "recipe_hash": artifacts.recipe_hash,
            "shape": shape,
            "accel": choice.kind,
            "tb_cache_mib": self.settings.tb_cache_mib if choice.kind == "tcg" else 0,
            "cmdline": self._cmdline(),
            "qemu_version": qemu_version,
            "libvirt_version": libvirt_version,
        }
        key = templates.template_key({"image": spec.image, **describe})
        group = templates.shape_group(spec.image, shape)
        return key, group, describe

    # --- booting -----------------------------------------------------------------------------
    def _domain_spec(
        self,
        name: str,
        uuid: str,
        paths: dom.VMPaths,
        spec: VMSpec,
        artifacts: images.ImageArtifacts,
        metadata: dict[str, str],
    ) -> dom.DomainSpec:
        return dom.DomainSpec(
            name=name,
            uuid=uuid,
            accel=self.accel().kind,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            kernel=artifacts.kernel,
            initrd=artifacts.initrd,
            cmdline=self._cmdline(),
            rootfs=artifacts.rootfs,
            data_disk=paths.data_disk,
            agent_socket=paths.socket,
            console_log=paths.console_log,
            tb_cache_mib=self.settings.tb_cache_mib,
            cpu_quota=self._cpu_quota(spec),
            network=spec.network,
            metadata=metadata,
        )

    def _boot(
        self,
        who: str,
        name: str,
        uuid: str,
        paths: dom.VMPaths,
        spec: VMSpec,
        artifacts: images.ImageArtifacts,
        metadata: dict[str, str],
        timings: dict[str, float],
    ) -> AgentClient:
        with self._step(who, "overlay", timings):
            base = data_disk.data_disk_base(self.settings, spec.data_disk_mib)
            self._make_overlay(paths.data_disk, base, "raw")
        xml = dom.domain_xml(self._domain_spec(name, uuid, paths, spec, artifacts, metadata))
        with self._step(who, "start", timings):
            self.libvirt.call(f"start {name}", lambda c: c.createXML(xml, 0), retry=False)
        self._check_quota(name, spec)
        with self._step(who, "agent", timings):
            agent, _hello = self._await_agent(who, name, paths, self.settings.agent_ready_timeout_s)
        return agent

    def _check_quota(self, name: str, spec: VMSpec) -> None:
        """Confirm once that libvirt applied a CPU quota (status() reports it)."""
        if self._quota_verified is not None or self._cpu_quota(spec) <= 0:
            return

        def params(c: libvirt.virConnect) -> dict[str, Any]:
            return c.lookupByName(name).schedulerParameters()

        try:
            quota = self.libvirt.call("scheduler parameters", params).get("global_quota", -1)
            self._quota_verified = quota > 0
        except VMError as exc:
            log.warning("could not read %s's CPU quota: %s", name, exc)
            self._quota_verified = False

    def _restore(
        self,
        who: str,
        name: str,
        uuid: str,
        paths: dom.VMPaths,
        template: templates.Template,
        metadata: dict[str, str],
        timings: dict[str, float],
    ) -> AgentClient:
        with self._step(who, "overlay", timings):
            self._make_overlay(paths.data_disk, template.data_disk, "qcow2")
        with self._step(who, "copy", timings):
            self.templates.prepare_clone(template, paths.restore_image, name, uuid)
        xml = dom.retarget_xml(
            template.xml,
            name=name,
            uuid=uuid,
            data_disk=paths.data_disk,
            agent_socket=paths.socket,
            console_log=paths.console_log,
            metadata=metadata,
        )
        with self._step(who, "restore", timings):
            self.libvirt.call(
                f"restore {name}",
                lambda c: c.restoreFlags(
                    str(paths.restore_image), xml, libvirt.VIR_DOMAIN_SAVE_RUNNING
                ),
                retry=False,
            )
        with contextlib.suppress(FileNotFoundError):
            paths.restore_image.unlink()
        with self._step(who, "agent", timings):
            agent, _hello = self._await_agent(who, name, paths, self.settings.agent_ready_timeout_s)
        with self._step(who, "reseed", timings):
            try:
                agent.reseed(time.time_ns(), os.urandom(64), identity=who)
            except (AgentTimeout, AgentDisconnected, AgentProtocolError, AgentError) as exc:
                agent.close()
                raise VMStartFailed(
                    f"session {who}: reseeding the restored guest failed: {exc}"
                ) from None
        return agent

    # --- public API --------------------------------------------------------------------------
    def create(self, session_id: str, spec: VMSpec) -> VM:
        """A running VM for the session with a connected agent: a clone of the (image, shape)
        template when one is ready (reseeded), else a cold boot."""
        with self._lock:
            if session_id in self._vms or session_id in self._busy:
                raise VMError(f"session {session_id} already has a VM on this host")
            self._busy.add(session_id)
        try:
            return self._create(session_id, spec)
        finally:
            with self._lock:
                self._busy.discard(session_id)

    def _create(self, session_id: str, spec: VMSpec) -> VM:
        started = time.monotonic()
        key = dom.session_key(session_id)
        name = dom.domain_name(self.settings, key)
        paths = dom.vm_paths(self.settings, key)
        artifacts = self._artifacts(spec)
        template = None
        try:
            template_key, _group, _describe = self._template_id(spec, artifacts)
            template = self.templates.find(spec.image, template_key)
        except VMError as exc:
            log.warning("session=%s template lookup failed: %s", session_id, exc)
        # A leftover of an earlier attempt for the same session (a retried task): start afresh.
        self._teardown(name, paths)
        dom.make_dirs(paths.dir, Path(self.settings.vm_dir))
        timings: dict[str, float] = {}
        uuid = str(uuidlib.uuid4())
        metadata = {
            "session": session_id,
            "image": spec.image,
            "created_at": f"{time.time():.3f}",
        }
        agent = None
        restored = False
        try:
            if template is not None:
                try:
                    agent = self._restore(
                        session_id,
                        name,
                        uuid,
                        paths,
                        template,
                        {**metadata, "restored": "1", "template": template.key},
                        timings,
                    )
                    restored = True
                except (VMError, OSError) as exc:
                    if isinstance(exc, libvirt_conn.LibvirtUnavailable):
                        raise
                    log.error(
                        "session=%s restore from template %s failed, cold booting: %s",
                        session_id,
                        template.key,
                        exc,
                    )
                    self.templates.forget(template.key, str(exc))
                    self._teardown(name, paths)
                    dom.make_dirs(paths.dir, Path(self.settings.vm_dir))
                    timings.clear()
            if agent is None:
                agent = self._boot(
                    session_id,
                    name,
                    uuid,
                    paths,
                    spec,
                    artifacts,
                    {**metadata, "restored": "0"},
                    timings,
                )
            if not restored:
                agent.reseed(identity=session_id)  # a booted guest has fresh entropy already
        except BaseException:
            self._teardown(name, paths)
            raise
        timings["total"] = round((time.monotonic() - started) * 1000, 1)
        vm = VM(self, session_id, key, name, uuid, paths, spec, restored, agent, timings)
        with self._lock:
            self._vms[session_id] = vm
        log.info(
            "session=%s host=%s vm ready: domain=%s restored=%s ms=%.0f",
            session_id,
            self.settings.host_name,
            name,
            restored,
            timings["total"],
        )
        return vm

    def get(self, session_id: str) -> VM | None:
        with self._lock:
            return self._vms.get(session_id)

    def attach(self, session_id: str, spec: VMSpec) -> VM | None:
        """After a worker restart: adopt the session's still-running domain. None if there is
        no such domain; VMLost (and the domain destroyed) if its agent does not answer."""
        existing = self.get(session_id)
        if existing is not None:
            return existing
        key = dom.session_key(session_id)
        name = dom.domain_name(self.settings, key)
        paths = dom.vm_paths(self.settings, key)

        def lookup(c: libvirt.virConnect) -> tuple[str, str] | None:
            domain = _lookup(c, name)
            if domain is None or not domain.isActive():
                return None
            return domain.UUIDString(), domain.XMLDesc(0)

        found = self.libvirt.call(f"look up {name}", lookup)
        if found is None:
            return None
        uuid, xml = found
        metadata = dom.read_metadata(xml)
        agent: AgentClient | None = None
        try:
            agent = AgentClient.connect(str(paths.socket), timeout=CONNECT_ATTEMPT_S)
            agent.hello(packages=False, timeout=ATTACH_HELLO_S)
        except (AgentTimeout, AgentDisconnected, AgentProtocolError, AgentError) as exc:
            if agent is not None:
                agent.close()
            self._teardown(name, paths)
            raise VMLost(
                f"session {session_id}: its domain was running but the agent did not answer "
                f"({exc}); the VM was destroyed"
            ) from None
        vm = VM(
            self,
            session_id,
            key,
            name,
            uuid,
            paths,
            spec,
            metadata.get("restored") == "1",
            agent,
        )
        with self._lock:
            vm = self._vms.setdefault(session_id, vm)
        log.info("session=%s host=%s attached to %s", session_id, self.settings.host_name, name)
        return vm

    def destroy(self, session_id: str) -> None:
        """Destroy the session's domain and remove its files; idempotent."""
        started = time.monotonic()
        key = dom.session_key(session_id)
        name = dom.domain_name(self.settings, key)
        with self._lock:
            vm = self._vms.pop(session_id, None)
        if vm is not None:
            vm.lost_reason = vm.lost_reason or "the VM was destroyed"
            vm.agent.close()
        self._teardown(name, dom.vm_paths(self.settings, key))
        log.info(
            "session=%s host=%s step=destroy ms=%.0f",
            session_id,
            self.settings.host_name,
            (time.monotonic() - started) * 1000,
        )

    def _lose(self, vm: VM, reason: str) -> None:
        vm.lost_reason = vm.lost_reason or reason
        log.error("session=%s host=%s VM lost: %s", vm.session_id, self.settings.host_name, reason)
        self.destroy(vm.session_id)

    def ensure_template(self, spec: VMSpec) -> None:
        """Build the (image, shape) template if it is missing or stale. Slow (a boot plus the
        imports: about a minute under TCG); other processes wait on its lock."""
        try:
            artifacts = self._artifacts(spec)
            key, group, describe = self._template_id(spec, artifacts)
        except VMError as exc:
            raise TemplateError(f"no template for {spec.image}: {exc}") from exc
        try:
            self.templates.ensure(
                spec.image,
                key,
                group,
                describe,
                lambda building: self._build_template_vm(spec, artifacts, key, building),
            )
        except TemplateError:
            raise
        except VMError as exc:
            self.templates.note_failure(key, spec.image, str(exc))
            raise TemplateError(f"template {key} of {spec.image}: {exc}") from exc

    def _build_template_vm(
        self, spec: VMSpec, artifacts: images.ImageArtifacts, key: str, building: Path
    ) -> tuple[str, str]:
        name = dom.domain_name(self.settings, key)
        uuid = str(uuidlib.uuid4())
        paths = dom.VMPaths(building)
        who = f"template-{key}"
        timings: dict[str, float] = {}
        self._destroy_domain(name)  # left by a builder that crashed
        metadata = {"template": key, "image": spec.image, "created_at": f"{time.time():.3f}"}
        try:
            agent = self._boot(who, name, uuid, paths, spec, artifacts, metadata, timings)
            try:
                with self._step(who, "warm", timings):
                    answer = agent.execute(templates.WARM_CODE, timeout_s=templates.WARM_TIMEOUT_S)
                if answer.get("status") != protocol.STATUS_OK:
                    error = answer.get("error") or {}
                    raise TemplateError(
                        f"warming the template failed: {answer.get('status')}: "
                        f"{error.get('name', '')} {error.get('value', '')} "
                        f"{answer.get('stderr', '')[-1000:]}"
                    )
                with self._step(who, "prepare", timings):
                    agent.prepare_snapshot()
            finally:
                agent.close()
            time.sleep(TEMPLATE_SETTLE_S)
            state = building / templates.STATE_FILE
            with self._step(who, "save", timings):
                self.libvirt.call(
                    f"save {name}",
                    lambda c: c.lookupByName(name).saveFlags(
                        str(state), None, libvirt.VIR_DOMAIN_SAVE_RUNNING
                    ),
                    retry=False,
                )
            xml = self.libvirt.call(
                "read the saved XML", lambda c: c.saveImageGetXMLDesc(str(state), 0)
            )
            (building / templates.XML_FILE).write_text(xml)
        except BaseException:
            self._destroy_domain(name)
            raise
        finally:
            self._remove_files(name, None)
        return name, uuid

    def reconcile(self, known_session_ids: set[str]) -> ReconcileReport:
        """Destroy this host's domains the registry does not know; report known sessions whose
        domain is gone. Sessions being created or destroyed right now are left alone."""
        with self._lock:
            busy = set(self._busy)
        report = reconcile_domains(
            self.settings,
            self.libvirt,
            known_session_ids,
            busy,
            self._destroy_domain,
            self.templates.being_built,
            self.templates.remove_partial,
        )
        for name in report.destroyed:
            self._remove_files(name, None)
        with self._lock:
            for session_id in report.missing:
                vm = self._vms.pop(session_id, None)
                if vm is not None:
                    vm.lost_reason = "its domain vanished"
                    vm.agent.close()
        return report

    def destroy_all(self) -> list[str]:
        """Destroy every domain of this instance on this host (sessions and template builds)
        and remove their files; templates already saved stay. For `shoal down` and tests.
        Returns the names of the domains destroyed."""
        with self._lock:
            owned = list(self._vms.values())
            self._vms.clear()
        for vm in owned:
            vm.lost_reason = vm.lost_reason or "the VM was destroyed"
            vm.agent.close()
        destroyed = []
        for name in sorted(our_domains(self.settings, self.libvirt)):
            key = dom.key_of(self.settings, name)
            assert key is not None
            self._destroy_domain(name)
            destroyed.append(name)
            if dom.is_template_key(key):
                self.templates.remove_partial(key)
                self._remove_files(name, None)
            else:
                self._remove_files(name, dom.vm_paths(self.settings, key).dir)
        vms = dom.vms_dir(self.settings)
        if vms.is_dir():
            for directory in vms.iterdir():
                shutil.rmtree(directory, ignore_errors=True)
        return destroyed

    def status(self) -> dict[str, Any]:
        """For /healthz and the heartbeat: accelerator, CPU quotas, libvirt, templates."""
        ok, detail = self.libvirt.ping()
        result: dict[str, Any] = {
            "libvirt": {
                "ok": ok,
                "detail": detail,
                "uri": self.libvirt.uri,
                "reconnects": self.libvirt.reconnects,
            },
            "cpu_quota": {**self.cpu_controller().as_dict(), "verified": self._quota_verified},
            "qemu_seccomp_sandbox": _seccomp_sandbox_setting(),
            "templates": self.templates.status(),
            "vms": len(self._vms),
        }
        try:
            result["accel"] = self.accel().as_dict()
        except VMError as exc:
            result["accel"] = {"kind": "unknown", "reason": exc.message}
        return result

    def list_vms(self) -> list[VM]:
        with self._lock:
            return list(self._vms.values())
