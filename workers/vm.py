"""VM lifecycle on one host: create (restore a template clone, or cold boot), attach, destroy.

`VMManager` is made once per worker process (it does no I/O until used). `create()` returns a
`VM` whose agent is connected and, after a restore, reseeded: the guest's clock and its kernel
random pool are cloned with the memory, so each clone gets the host's time and 64 fresh bytes
of entropy before any user code runs. Every step is logged with the VM id and its duration
(`vm=... step=... ms=...`), and kept in `VM.timings`.

This module holds the lifecycle policy only; the driver's other jobs are split by what they do:
host capability probes in workers/vm_probes.py, starting and stopping one domain in
workers/vm_domains.py, template building in workers/template_builder.py, and the comparison of
domains with the registry in workers/reconcile.py.

Executions (`VM.execute`): the agent enforces the timeout itself (SIGINT at timeout_s, then
it kills and restarts the interpreter). The host waits timeout_s + the agent's grace +
settings.interrupt_grace_s; if no answer has come by then, or the guest broke the protocol,
or the channel closed, the VM is marked lost (its channel closed, every later call refused)
and VMLost raised. A worker thread is therefore never blocked longer than that by a guest.
The VM does not destroy itself: whoever owns it and catches VMLost destroys it, once
(`VMManager.destroy`; in a worker, workers/host.py marks the session lost and destroys its VM).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from shoal.settings import Settings
from workers import accel as accel_mod
from workers import domain as dom
from workers import fork_base, libvirt_conn, sleep_images, templates, transfer_disk, vm_sleep
from workers.agent_client import (
    AgentClient,
    AgentDisconnected,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
)
from workers.reconcile import ReconcileReport, our_domains
from workers.reconcile import reconcile as reconcile_domains
from workers.running_vm import VM, VMSpec
from workers.template_builder import TemplateBuilder
from workers.vm_domains import CONNECT_ATTEMPT_S, DomainOps, lookup
from workers.vm_errors import VMError, VMLost, out_of_space
from workers.vm_forks import FORK_BASE_KEEP_S, ForkingVMs
from workers.vm_identity import kvm_device_problem
from workers.vm_probes import HostProbes, seccomp_sandbox_setting

log = logging.getLogger("shoal.vm")

ATTACH_HELLO_S = 10.0
# A domain paused for one of these reasons was left so by a worker that died mid-way (a fork's
# capture: workers/fork_base.py); attach resumes it. Any other pause (a full disk, a save or a
# restore under way) is left alone.
LEFT_PAUSED = (
    libvirt.VIR_DOMAIN_PAUSED_UNKNOWN,
    libvirt.VIR_DOMAIN_PAUSED_USER,
    libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
)


class VMManager(ForkingVMs):
    """Every VM of this instance on this host, as this worker process sees them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.templates = templates.TemplateStore(settings)
        self.probes = HostProbes(settings)
        self.domains = DomainOps(settings, self.probes, self.templates)
        self.builder = TemplateBuilder(settings, self.probes, self.domains, self.templates)
        self._lock = threading.Lock()
        self._vms: dict[str, VM] = {}
        self._busy: set[str] = set()
        self._capturing: dict[str, bool] = {}
        self._one_capture = threading.Lock()
        self.fork_bases = fork_base.ForkBases(FORK_BASE_KEEP_S)

    @property
    def libvirt(self) -> libvirt_conn.LibvirtConnection:
        return libvirt_conn.connection()

    def accel(self) -> accel_mod.AccelChoice:
        return self.probes.accel()

    # --- creating ----------------------------------------------------------------------------
    def create(self, vm_id: str, spec: VMSpec) -> VM:
        """A running VM with a connected agent: a clone of the (image, shape) template when one
        is ready (reseeded), else a cold boot."""
        with self._lock:
            if vm_id in self._vms or vm_id in self._busy:
                raise VMError(f"VM {vm_id} already exists on this host")
            self._busy.add(vm_id)
        try:
            return self._create(vm_id, spec)
        finally:
            with self._lock:
                self._busy.discard(vm_id)

    def _create(self, vm_id: str, spec: VMSpec) -> VM:
        started = time.monotonic()
        domains = self.domains
        key = dom.vm_key(vm_id)
        name = dom.domain_name(self.settings, key)
        paths = dom.vm_paths(self.settings, key)
        artifacts = domains.artifacts(spec.image)
        template = None
        try:
            template_key, _group, _describe = self.builder.template_id(spec, artifacts)
            template = self.templates.find(spec.image, template_key)
        except VMError as exc:
            log.warning("vm=%s template lookup failed: %s", vm_id, exc)
        # A leftover of an earlier attempt for the same VM (a retried task): start afresh.
        domains.teardown(name, paths)
        identity = domains.claim_vm(paths)
        timings: dict[str, float] = {}
        uuid = str(uuidlib.uuid4())
        metadata = {
            "session": vm_id,  # the attribute's name is on disk in running domains: kept
            "image": spec.image,
            "created_at": f"{time.time():.3f}",
        }
        agent = None
        restored = False
        try:
            if template is not None:
                try:
                    agent = domains.restore(
                        vm_id,
                        name,
                        uuid,
                        paths,
                        template,
                        {**metadata, "restored": "1", "template": template.key},
                        timings,
                        identity,
                    )
                    restored = True
                except (VMError, OSError) as exc:
                    if isinstance(exc, libvirt_conn.LibvirtUnavailable) or out_of_space(exc):
                        raise  # not the template's fault: keep it
                    log.error(
                        "vm=%s restore from template %s failed, cold booting: %s",
                        vm_id,
                        template.key,
                        exc,
                    )
                    self.templates.forget(template.key, str(exc))
                    domains.teardown(name, paths)
                    identity = domains.claim_vm(paths)
                    timings.clear()
            if agent is None:
                agent = domains.boot(
                    vm_id,
                    name,
                    uuid,
                    paths,
                    spec,
                    artifacts,
                    {**metadata, "restored": "0"},
                    timings,
                    identity,
                )
            if not restored:
                agent.reseed(identity=vm_id)  # a booted guest has fresh entropy already
        except BaseException:
            domains.teardown(name, paths)
            raise
        timings["total"] = round((time.monotonic() - started) * 1000, 1)
        vm = VM(self.settings, vm_id, key, name, uuid, paths, spec, restored, agent, timings)
        with self._lock:
            self._vms[vm_id] = vm
        log.info(
            "vm=%s host=%s vm ready: domain=%s restored=%s ms=%.0f",
            vm_id,
            self.settings.host_name,
            name,
            restored,
            timings["total"],
        )
        return vm

    def ensure_template(self, spec: VMSpec) -> None:
        """Build the (image, shape) template if it is missing or stale (workers/
        template_builder.py). Slow; other processes wait on its lock."""
        self.builder.ensure(spec)

    # --- finding -----------------------------------------------------------------------------
    def get(self, vm_id: str) -> VM | None:
        with self._lock:
            return self._vms.get(vm_id)

    def list_vms(self) -> list[VM]:
        with self._lock:
            return list(self._vms.values())

    def attach(self, vm_id: str, spec: VMSpec) -> VM | None:
        """After a worker restart: adopt the VM's still-running domain. None if there is no
        such domain; VMLost if its agent does not answer (the caller destroys the VM). A domain
        its worker left paused (a fork's capture cut short, a start before its resume) is
        confined and resumed first, its clock and entropy reseeded."""
        existing = self.get(vm_id)
        if existing is not None:
            return existing
        key = dom.vm_key(vm_id)
        name = dom.domain_name(self.settings, key)
        paths = dom.vm_paths(self.settings, key)

        def running(c: libvirt.virConnect) -> tuple[str, str, bool] | None:
            domain = lookup(c, name)
            if domain is None or not domain.isActive():
                return None
            state, reason = domain.state()
            left_paused = state == libvirt.VIR_DOMAIN_PAUSED and reason in LEFT_PAUSED

            return domain.UUIDString(), domain.XMLDesc(0), left_paused

        found = self.libvirt.call(f"look up {name}", running)
        if found is None:
            return None
        uuid, xml, left_paused = found
        metadata = dom.read_metadata(xml)
        if left_paused:
            log.warning("vm=%s its domain was left paused: confining and resuming it", vm_id)
            self.domains.run_confined(name, paths, self._identity_of(paths), spec.memory_mib)
        agent: AgentClient | None = None
        try:
            agent = AgentClient.connect(str(paths.socket), timeout=CONNECT_ATTEMPT_S)
            agent.hello(packages=False, timeout=ATTACH_HELLO_S)
            if left_paused:
                agent.reseed(time.time_ns(), identity=vm_id)
        except (AgentTimeout, AgentDisconnected, AgentProtocolError, AgentError) as exc:
            if agent is not None:
                agent.close()
            raise VMLost(
                f"VM {vm_id}: its domain was running but the agent did not answer ({exc})"
            ) from None
        transfer_disk.empty(paths.transfer_disk)  # the last worker may have died mid-upload
        restored = metadata.get("restored") == "1"
        vm = VM(self.settings, vm_id, key, name, uuid, paths, spec, restored, agent)
        with self._lock:
            vm = self._vms.setdefault(vm_id, vm)
        log.info("vm=%s host=%s attached to %s", vm_id, self.settings.host_name, name)
        return vm

    # --- sleeping ----------------------------------------------------------------------------
    def sleep(self, vm_id: str) -> vm_sleep.SleepImage:
        """Save a running VM of this process to its sleep image and stop it; its directory
        (disks, uid lease) stays for `wake` (workers/vm_sleep.py)."""
        with self._lock:
            vm = self._vms.get(vm_id)
            if vm is None or vm_id in self._busy:
                raise VMError(f"VM {vm_id} is not running on this host")
            self._busy.add(vm_id)
        self.fork_bases.drop(vm_id)
        try:
            image = self._save(
                vm, sleep_images.image_path(self.settings, vm.key), "the VM is asleep"
            )
        finally:
            with self._lock:
                self._busy.discard(vm_id)
        log.info("vm=%s host=%s asleep: %d bytes in %.0f ms", vm_id, self.settings.host_name,
                 image.bytes, image.seconds * 1000)  # fmt: skip
        return image

    def _save(self, vm: VM, image: Path, why: str) -> vm_sleep.SleepImage:
        """Save the running VM to `image` (workers/vm_sleep.py) and forget its VM object, its
        domain gone. A save that failed with the domain still running leaves both as they
        were; one that failed past the domain's stop forgets it too (its image may be whole:
        a wake finds it)."""
        try:
            saved = vm_sleep.save(self.domains, vm.domain_name, image)
        except BaseException:
            if not self._still_running(vm.domain_name):
                self._forget_asleep(vm, why)
            raise
        self._forget_asleep(vm, why)
        return saved

    def _still_running(self, name: str) -> bool:
        """After a failed save: whether the domain runs on. Unsure (libvirtd down): taken as
        saved, which heals either way: a request finds the domain running and adopts it, or
        wakes it from its image."""
        try:
            return self.domains.is_active(name)
        except VMError:
            return False

    def _forget_asleep(self, vm: VM, why: str = "the VM is asleep") -> None:
        """A VM whose domain was saved and stopped: this VM object is done with."""
        with self._lock:
            self._vms.pop(vm.vm_id, None)
        vm.lost_reason = why
        vm.agent.close()
        vm.paths.socket.unlink(missing_ok=True)  # libvirt binds it afresh at the next start

    def drop_sleep_image(self, vm_id: str) -> None:
        """Once the woken session is recorded awake: its image is of no more use."""
        sleep_images.image_path(self.settings, dom.vm_key(vm_id)).unlink(missing_ok=True)

    def sleeping_bytes(self) -> int:
        """What the sleep images on this host hold."""
        return sleep_images.total_bytes(self.settings)

    def is_asleep(self, vm_id: str) -> bool:
        """Whether the VM has a sleep image on this host."""
        return sleep_images.image_path(self.settings, dom.vm_key(vm_id)).is_file()

    def wake(self, vm_id: str, spec: VMSpec) -> VM:
        """Restore a sleeping VM as it was (clock and entropy reseeded); its image stays until
        drop_sleep_image. VMError when there is no image or the restore fails."""
        key = dom.vm_key(vm_id)
        name = dom.domain_name(self.settings, key)
        paths = dom.vm_paths(self.settings, key)
        image = sleep_images.image_path(self.settings, key)
        with self._lock:
            if vm_id in self._vms or vm_id in self._busy:
                raise VMError(f"VM {vm_id} is already running on this host")
            self._busy.add(vm_id)
        try:
            if not image.is_file() or not paths.dir.is_dir():
                raise VMError(f"VM {vm_id} has no sleep image on this host")
            started = time.monotonic()
            agent = vm_sleep.restore(
                self.domains, vm_id, name, paths, image, self._identity_of(paths),
                spec.memory_mib, self.settings.agent_ready_timeout_s,
            )  # fmt: skip
            uuid = self.libvirt.call(f"look up {name}", lambda c: c.lookupByName(name).UUIDString())
            timings = {"wake": round((time.monotonic() - started) * 1000, 1)}
            vm = VM(self.settings, vm_id, key, name, uuid, paths, spec, True, agent, timings)
            with self._lock:
                self._vms[vm_id] = vm
        finally:
            with self._lock:
                self._busy.discard(vm_id)
        log.info("vm=%s host=%s awake in %.0f ms", vm_id, self.settings.host_name,
                 timings["wake"])  # fmt: skip
        return vm

    # --- destroying --------------------------------------------------------------------------
    def destroy(self, vm_id: str) -> None:
        """Destroy the VM's domain and remove its files; idempotent."""
        started = time.monotonic()
        key = dom.vm_key(vm_id)
        name = dom.domain_name(self.settings, key)
        with self._lock:
            vm = self._vms.pop(vm_id, None)
            if vm_id in self._capturing:
                self._capturing[vm_id] = True  # its capture ends by destroying it again
        if vm is not None:
            vm.lost_reason = vm.lost_reason or "the VM was destroyed"
            vm.agent.close()
        self.fork_bases.drop(vm_id)
        sleep_images.image_path(self.settings, key).unlink(missing_ok=True)
        self.domains.teardown(name, dom.vm_paths(self.settings, key))
        log.info(
            "vm=%s host=%s step=destroy ms=%.0f",
            vm_id,
            self.settings.host_name,
            (time.monotonic() - started) * 1000,
        )

    def reconcile(self, known_vm_ids: set[str]) -> ReconcileReport:
        """Destroy this host's domains whose VM ids are not known; report known VMs whose
        domain is gone. VMs being created or destroyed right now are left alone."""
        with self._lock:
            busy = set(self._busy)
        report = reconcile_domains(
            self.settings,
            self.libvirt,
            known_vm_ids,
            busy,
            self.domains.destroy_domain,
            self.templates.being_built,
            self.templates.remove_partial,
        )
        for name in report.destroyed:
            self.domains.remove_files(name, None)
        with self._lock:
            for vm_id in report.missing:
                vm = self._vms.pop(vm_id, None)
                if vm is not None:
                    vm.lost_reason = "its domain vanished"
                    vm.agent.close()
        return report

    def sweep(self, owned_vm_ids: Callable[[], set[str]]) -> list[str]:
        """While the host runs: destroy this instance's VM domains, and remove VM directories,
        that nobody owns; the names of the domains destroyed. A VM is owned when this process
        holds or is creating it, or `owned_vm_ids()` (the registry, the ready pools) names it.
        Domains are listed first and owners asked after, so a VM created meanwhile is never
        taken for a stray. This catches what a fault left behind (a domain a restarted libvirtd
        reattached after its VM was destroyed, a restore cut off mid-call)."""
        domains = our_domains(self.settings, self.libvirt)
        vms = dom.vms_dir(self.settings)
        dirs = {d.name for d in vms.iterdir()} if vms.is_dir() else set()
        with self._lock:
            mine = set(self._vms) | set(self._busy)
        owned = {dom.vm_key(vm_id) for vm_id in mine | owned_vm_ids()}
        destroyed = []
        for name in sorted(domains):
            key = dom.key_of(self.settings, name)
            if key is None or dom.is_template_key(key) or key in owned:
                continue
            log.warning("vm host=%s destroying unowned domain %s", self.settings.host_name, name)
            self.domains.teardown(name, dom.vm_paths(self.settings, key))
            destroyed.append(name)
        listed = {dom.key_of(self.settings, name) for name in domains}
        self.probes.remove_stale_limits(
            dom.name_prefix(self.settings), lambda: set(our_domains(self.settings, self.libvirt))
        )
        for key in sorted(dirs - owned - listed):
            if self._another_hosts(dom.VMPaths(vms / key)):
                continue
            shutil.rmtree(vms / key, ignore_errors=True)
        asleep = sleep_images.sleep_dir(self.settings)
        for image in sorted(asleep.glob("*.save")) if asleep.is_dir() else ():
            if image.stem not in owned and not (vms / image.stem).is_dir():
                log.warning("vm host=%s removing orphan sleep image %s", self.settings.host_name,
                            image.name)  # fmt: skip
                image.unlink(missing_ok=True)
        self._sweep_fork_leftovers()
        return destroyed

    def _another_hosts(self, paths: dom.VMPaths) -> bool:
        """Whether the VM directory is marked as another host worker's (one sharing this
        instance's vms/ on this machine); that host sweeps it. Unmarked: this host's to judge."""
        try:
            return paths.host_marker.read_text() != self.settings.host_name
        except OSError:
            return False

    def destroy_all(self) -> list[str]:
        """Destroy every domain of this instance on this host (VMs and template builds)
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
            self.domains.destroy_domain(name)
            destroyed.append(name)
            if dom.is_template_key(key):
                self.templates.remove_partial(key)
                self.domains.remove_files(name, None)
            else:
                self.domains.remove_files(name, dom.vm_paths(self.settings, key).dir)
        vms = dom.vms_dir(self.settings)
        if vms.is_dir():
            for directory in vms.iterdir():
                shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(sleep_images.sleep_dir(self.settings), ignore_errors=True)
        self.fork_bases.drop_all()
        shutil.rmtree(fork_base.forks_dir(self.settings), ignore_errors=True)
        return destroyed

    def paused_on_full_disk(self, vm_id: str) -> bool:
        """True when the VM's domain is paused because a write to its disk found the host's
        disk full (QEMU's default for ENOSPC: pause, lose nothing, wait for space)."""
        name = dom.domain_name(self.settings, dom.vm_key(vm_id))

        def check(c: libvirt.virConnect) -> bool:
            domain = lookup(c, name)
            if domain is None or domain.state()[:2] != [
                libvirt.VIR_DOMAIN_PAUSED,
                libvirt.VIR_DOMAIN_PAUSED_IOERROR,
            ]:
                return False
            return libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE in domain.diskErrors().values()

        try:
            return self.libvirt.call(f"state of {name}", check)
        except VMError:
            return False

    # --- reporting ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For /healthz and the heartbeat: accelerator, CPU quotas, libvirt, templates."""
        ok, detail = self.libvirt.ping()
        probes = self.probes
        result: dict[str, Any] = {
            "libvirt": {
                "ok": ok,
                "detail": detail,
                "uri": self.libvirt.uri,
                "reconnects": self.libvirt.reconnects,
            },
            "cpu_quota": {**probes.cpu_controller().as_dict(), "verified": probes.quota_verified},
            "vm_limits": probes.limits_status(),
            "vm_uids": {
                "first": self.settings.vm_uid_base,
                "count": self.settings.vm_uid_count,
                "relabel": "no (Shoal owns each VM's files; workers/vm_identity.py)",
            },
            "qemu_seccomp_sandbox": seccomp_sandbox_setting(),
            "templates": self.templates.status(),
            "memory_sharing": self.domains.shared.status(),
            "vms": len(self._vms),
        }
        try:
            result["accel"] = probes.accel().as_dict()
        except VMError as exc:
            result["accel"] = {"kind": "unknown", "reason": exc.message}
        if result["accel"]["kind"] == "kvm":
            result["vm_uids"]["kvm_device"] = kvm_device_problem() or "open to every VM uid"
        return result
