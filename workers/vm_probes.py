"""What this host's QEMU and libvirt can do, probed once per process and cached.

These facts describe the host, not any one VM, so they live apart from the VM lifecycle in
workers/vm.py: the accelerator (KVM or TCG), the QEMU and libvirt versions (part of a snapshot
template's key), the cgroup CPU controller (can a CPU quota be applied at all), whether libvirt
really applied one (confirmed on the first capped domain), the memory and pids controllers
that carry each VM's limits (workers/cgroups.py; a missing one is reported, not fatal), and
qemu.conf's seccomp_sandbox.
Each probe runs the first time it is asked and is cached for the life of the process: a probe
that changes its answer needs a worker restart, as a new QEMU or libvirt does anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from shoal.hosts import TCG_WARNING
from shoal.settings import Settings
from workers import accel as accel_mod
from workers import libvirt_conn
from workers.cgroups import (
    LIMIT_CONTROLLERS,
    ControllerProbe,
    CpuControllerProbe,
    apply_vm_limit,
    probe_controller,
    probe_cpu_controller,
    remove_stale_groups,
    remove_vm_groups,
)
from workers.vm_errors import VMError
from workers.vm_identity import kvm_device_problem

log = logging.getLogger("shoal.vm")

QEMU_CONF = Path("/etc/libvirt/qemu.conf")


def seccomp_sandbox_setting(path: Path = QEMU_CONF) -> bool:
    """qemu.conf's seccomp_sandbox (1, on, by default)."""
    try:
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("seccomp_sandbox") and "=" in line:
                return line.split("=", 1)[1].strip() != "0"
    except OSError:
        pass
    return True


class HostProbes:
    """The host's capabilities as the VM driver needs them; each probed lazily, then cached."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._accel: accel_mod.AccelChoice | None = None
        self._cpu_probe: CpuControllerProbe | None = None
        self._versions: tuple[int, int] | None = None
        # Whether libvirt applied a CPU quota to the first capped domain; None until one ran.
        self.quota_verified: bool | None = None
        self._limit_probes: dict[str, ControllerProbe] | None = None
        # What the last VM got, per controller: the limit file written, or why not.
        self.limits_applied: dict[str, str] = {}

    @property
    def libvirt(self) -> libvirt_conn.LibvirtConnection:
        return libvirt_conn.connection()

    def accel(self) -> accel_mod.AccelChoice:
        """KVM or TCG, with the reason (settings.accel, the CPU flags, libvirt's offer)."""
        if self._accel is None:
            offers_kvm = None
            if self.settings.accel == "auto" and accel_mod.cpu_has_hw_virt():
                caps = self.libvirt.call("capabilities", lambda c: c.getCapabilities())
                offers_kvm = accel_mod.libvirt_offers_kvm(caps)
            self._accel = accel_mod.detect(self.settings.accel, offers_kvm)
            log.info("accelerator: %s (%s)", self._accel.kind, self._accel.reason)
            if self._accel.kind != "kvm":
                log.warning("%s", TCG_WARNING)
            problem = kvm_device_problem() if self._accel.kind == "kvm" else None
            if problem:
                log.error("%s", problem)
        return self._accel

    def cpu_controller(self) -> CpuControllerProbe:
        """Whether the cgroup cpu controller is there for libvirt's <cputune> quotas."""
        if self._cpu_probe is None:
            self._cpu_probe = probe_cpu_controller()
        return self._cpu_probe

    def hypervisor_versions(self) -> tuple[int, int]:
        """(QEMU version, libvirt version) as libvirt reports them."""
        if self._versions is None:
            self._versions = self.libvirt.call(
                "versions", lambda c: (c.getVersion(), c.getLibVersion())
            )
        return self._versions

    def cpu_quota(self, requested: float, vcpus: int) -> float:
        """The CPU quota (cores) a domain gets: the one asked for, else settings.vm_cpu_cap,
        else its vCPU count; 0 where none can apply."""
        if requested <= 0:
            requested = self.settings.vm_cpu_cap or float(vcpus)
        if requested <= 0:
            return 0.0
        if not self.cpu_controller().available:
            log.warning("cpu_quota %.2f not applied: %s", requested, self.cpu_controller().detail)
            return 0.0
        return requested

    def verify_quota(self, name: str, quota: float) -> None:
        """Confirm once, on the running domain `name`, that libvirt applied its CPU quota."""
        if self.quota_verified is not None or quota <= 0:
            return

        def params(c: libvirt.virConnect) -> dict[str, Any]:
            return c.lookupByName(name).schedulerParameters()

        try:
            quota = self.libvirt.call("scheduler parameters", params).get("global_quota", -1)
            self.quota_verified = quota > 0
        except VMError as exc:
            log.warning("could not read %s's CPU quota: %s", name, exc)
            self.quota_verified = False

    def limit_controllers(self) -> dict[str, ControllerProbe]:
        """The memory and pids controllers, as probed once."""
        if self._limit_probes is None:
            self._limit_probes = {name: probe_controller(name) for name in LIMIT_CONTROLLERS}
            for probe in self._limit_probes.values():
                (log.info if probe.available else log.warning)("%s", probe.detail)
        return self._limit_probes

    def apply_limits(self, name: str, pid: int, memory_bytes: int, pids_max: int) -> None:
        """Write the memory and pids limits of domain `name` (QEMU `pid`) into its cgroups.
        A limit that cannot be applied is logged and shown in status(), never raised."""
        applied: dict[str, str] = {}
        for controller, value in (("memory", memory_bytes), ("pids", pids_max)):
            probe = self.limit_controllers()[controller]
            try:
                applied[controller] = apply_vm_limit(pid, name, probe, value)
            except (OSError, ValueError) as exc:
                applied[controller] = f"not applied: {exc}"
                if probe.available:
                    log.warning("%s limit of %s not applied: %s", controller, name, exc)
        self.limits_applied = applied

    def remove_limits(self, name: str) -> None:
        remove_vm_groups(name, list(self.limit_controllers().values()))

    def remove_stale_limits(self, prefix: str, live: Callable[[], set[str]]) -> None:
        remove_stale_groups(prefix, live, list(self.limit_controllers().values()))

    def limits_status(self) -> dict[str, Any]:
        return {
            "controllers": {k: v.as_dict() for k, v in self.limit_controllers().items()},
            "last_vm": dict(self.limits_applied),
        }
