"""Can libvirt cap a VM's CPU here? Probe the cgroup cpu controller.

libvirt applies `<cputune>` quotas through the cgroup `cpu` controller: cgroup v1 needs the
controller mounted (cpu.cfs_quota_us exists), cgroup v2 needs `cpu` in cgroup.controllers.
Without systemd libvirt manages the cgroups itself, which works when the controller is
there. This is the static probe; workers/vm_probes.py confirms it on the first domain that
carries a quota (the domain's scheduler parameters then include `global_quota`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass


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
