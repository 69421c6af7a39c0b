"""Can libvirt cap a VM's CPU here? Probe the cgroup cpu controller.

libvirt applies `<cputune>` quotas through the cgroup `cpu` controller: cgroup v1 needs the
controller mounted (cpu.cfs_quota_us exists), cgroup v2 needs `cpu` in cgroup.controllers.
Without systemd libvirt manages the cgroups itself, which works when the controller is
there. This is the static probe; workers/vm_probes.py confirms it on the first domain that
carries a quota (the domain's scheduler parameters then include `global_quota`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

log = logging.getLogger("shoal.vm")


@dataclass(frozen=True)
class CpuControllerProbe:
    available: bool
    version: str  # "v1", "v2" or ""
    detail: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _mounts(mounts_path: str) -> list[tuple[str, str, list[str]]]:
    """(mount point, fs type, options) of each cgroup mount."""
    found = []
    try:
        with open(mounts_path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                    found.append((parts[1], parts[2], parts[3].split(",")))
    except OSError:
        pass
    return found


def probe_cpu_controller(mounts_path: str = "/proc/self/mounts") -> CpuControllerProbe:
    mounts = _mounts(mounts_path)
    for point, fstype, options in mounts:
        if fstype == "cgroup" and "cpu" in options:
            if os.path.exists(os.path.join(point, "cpu.cfs_quota_us")):
                return CpuControllerProbe(True, "v1", f"cgroup v1 cpu controller at {point}")
            return CpuControllerProbe(
                False, "v1", f"cgroup v1 cpu controller at {point} lacks CFS bandwidth control"
            )
    for point, fstype, _options in mounts:
        if fstype == "cgroup2":
            try:
                with open(os.path.join(point, "cgroup.controllers")) as f:
                    controllers = f.read().split()
            except OSError:
                continue
            if "cpu" in controllers:
                return CpuControllerProbe(True, "v2", f"cgroup v2 cpu controller at {point}")
    if not mounts:
        return CpuControllerProbe(False, "", "no cgroup filesystem is mounted")
    return CpuControllerProbe(
        False, "", "no cgroup cpu controller is mounted: CPU quotas cannot be applied"
    )


# --- memory and pids limits per VM --------------------------------------------------------------
#
# libvirt's <memtune><hard_limit> also raises QEMU's RLIMIT_MEMLOCK to the limit, which needs
# CAP_SYS_RESOURCE; where libvirtd lacks it (our machines: "cannot limit locked memory ...
# Operation not permitted") the domain does not start at all. libvirt has no XML for pids.
# So both limits are written into the cgroup files of the running (still paused) QEMU, by the
# worker, which needs nothing but the controllers:
# - cgroup v1: libvirt (without systemd) puts QEMU into machine/qemu-N-<name>.libvirt-qemu of
#   the memory controller, but leaves it in the root group of pids. A limit goes into the group
#   the process is in; a process still in the root group is first moved into a group of ours,
#   <mount>/shoal/<domain name>, which `remove_vm_groups` deletes once QEMU is gone.
# - cgroup v2: the limit goes into the domain's group (the parent of libvirt's `emulator`
#   group), when the controller is enabled there.
# A controller that is missing is reported (status, log), never an error.

LIMIT_CONTROLLERS = ("memory", "pids")
LIMIT_FILES = {
    ("memory", "v1"): "memory.limit_in_bytes",
    ("memory", "v2"): "memory.max",
    ("pids", "v1"): "pids.max",
    ("pids", "v2"): "pids.max",
}
OWN_GROUP = "shoal"


@dataclass(frozen=True)
class ControllerProbe:
    controller: str
    available: bool
    version: str  # "v1", "v2" or ""
    mount: str
    detail: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def probe_controller(controller: str, mounts_path: str = "/proc/self/mounts") -> ControllerProbe:
    """Where `controller` is mounted (a v1 hierarchy of its own, or enabled in cgroup v2)."""
    mounts = _mounts(mounts_path)
    for point, fstype, options in mounts:
        if fstype == "cgroup" and controller in options:
            return ControllerProbe(
                controller, True, "v1", point, f"cgroup v1 {controller} controller at {point}"
            )
    for point, fstype, _options in mounts:
        if fstype != "cgroup2":
            continue
        try:
            with open(os.path.join(point, "cgroup.controllers")) as f:
                enabled = f.read().split()
        except OSError:
            continue
        if controller in enabled:
            return ControllerProbe(
                controller, True, "v2", point, f"cgroup v2 {controller} controller at {point}"
            )
    return ControllerProbe(
        controller,
        False,
        "",
        "",
        f"no cgroup {controller} controller is mounted: VMs run without a {controller} limit",
    )


def _process_group(pid: int, probe: ControllerProbe, proc: str) -> str | None:
    """The group (path inside its hierarchy) process `pid` is in for `probe`'s controller."""
    try:
        with open(os.path.join(proc, str(pid), "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        if probe.version == "v1" and probe.controller in controllers.split(","):
            return path
        if probe.version == "v2" and controllers == "":
            return path
    return None


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def apply_vm_limit(
    pid: int, group_name: str, probe: ControllerProbe, value: int, proc: str = "/proc"
) -> str:
    """Limit process `pid` (a QEMU, with its threads) to `value` in `probe`'s controller.

    Returns the limit file written; raises OSError (or ValueError) when it cannot be done."""
    if not probe.available:
        raise ValueError(probe.detail)
    limit_file = LIMIT_FILES[(probe.controller, probe.version)]
    group = _process_group(pid, probe, proc)
    if group is None:
        raise ValueError(f"process {pid} is in no {probe.controller} group")
    directory = os.path.join(probe.mount, group.lstrip("/"))
    if os.path.basename(directory) == "emulator":
        directory = os.path.dirname(directory)  # the domain's group: QEMU and its vCPUs
    if group == "/":
        if probe.version != "v1":
            raise ValueError(f"QEMU is in the root group of cgroup v2 ({probe.mount})")
        directory = os.path.join(probe.mount, OWN_GROUP, group_name)
        os.makedirs(directory, exist_ok=True)
        _write(os.path.join(directory, limit_file), str(value))
        _write(os.path.join(directory, "cgroup.procs"), str(pid))
    else:
        _write(os.path.join(directory, limit_file), str(value))
    return os.path.join(directory, limit_file)


# A group still holds QEMU for a moment after its domain is destroyed or saved (rmdir: EBUSY).
GROUP_EXIT_WAIT_S = 5.0


def remove_vm_groups(group_name: str, probes: list[ControllerProbe]) -> None:
    """The groups `apply_vm_limit` made for a VM whose QEMU is gone or going (missing ones:
    nothing); waits up to GROUP_EXIT_WAIT_S for an exiting QEMU to leave its group."""
    for probe in probes:
        if probe.available and probe.version == "v1":
            _rmdir_when_empty(os.path.join(probe.mount, OWN_GROUP, group_name))


def remove_stale_groups(
    prefix: str, live: Callable[[], set[str]], probes: list[ControllerProbe]
) -> None:
    """Remove the empty groups named `prefix`* of VMs not in `live()`: a group whose QEMU took
    longer than GROUP_EXIT_WAIT_S to leave it (a loaded host) is caught by the next sweep.
    Groups are listed before `live()` is asked, so a VM starting meanwhile is never taken for
    a stray (its domain exists before its group does)."""
    found = []
    for probe in probes:
        if probe.available and probe.version == "v1":
            top = os.path.join(probe.mount, OWN_GROUP)
            with contextlib.suppress(OSError):
                found += [(top, n) for n in os.listdir(top) if n.startswith(prefix)]
    if not found:
        return
    keep = live()
    for top, name in found:
        if name in keep:
            continue
        try:
            os.rmdir(os.path.join(top, name))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EBUSY):
                log.warning("cannot remove the cgroup %s/%s: %s", top, name, exc)


def _rmdir_when_empty(directory: str) -> None:
    deadline = time.monotonic() + GROUP_EXIT_WAIT_S
    while True:
        try:
            os.rmdir(directory)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                if exc.errno not in (errno.ENOENT, errno.EBUSY):
                    log.warning("cannot remove the cgroup %s: %s", directory, exc)
                return
        time.sleep(0.1)
