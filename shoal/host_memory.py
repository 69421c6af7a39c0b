"""A host's memory as placement and the ready pools see it.

The rule is one: a host starts a new VM only while its available memory (the kernel's
MemAvailable) stays above its reserve (SHOAL_HOST_MEMORY_RESERVE_MIB) by the VM's whole memory
size. An idle clone costs far less than its size (it shares its template's memory), but a session
may fill its guest's RAM, and the reserve is what keeps the host itself (libvirtd, Redis, the
page cache of the templates) out of the OOM killer's way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class HostMemory:
    available_mib: int
    total_mib: int
    reserve_mib: int

    def spare_mib(self) -> int:
        """Memory above the reserve (negative below it)."""
        return self.available_mib - self.reserve_mib

    def room_for(self, memory_mib: int) -> int:
        """New VMs of `memory_mib` each the host may start now."""
        return max(self.spare_mib(), 0) // max(memory_mib, 1)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def read(reserve_mib: int, meminfo: Path = MEMINFO) -> HostMemory:
    """This machine's memory; MemAvailable is the kernel's estimate of what can be taken without
    swapping (free memory plus reclaimable caches)."""
    found: dict[str, int] = {}
    for line in meminfo.read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemAvailable", "MemTotal"):
            found[name] = int(rest.split()[0]) // 1024
    return HostMemory(found["MemAvailable"], found["MemTotal"], reserve_mib)


def from_heartbeat(beat: dict[str, Any]) -> HostMemory | None:
    """The memory a host reported, or None from a worker that does not report it."""
    memory = beat.get("memory")
    if not isinstance(memory, dict):
        return None
    try:
        return HostMemory(
            int(memory["available_mib"]), int(memory["total_mib"]), int(memory["reserve_mib"])
        )
    except (KeyError, TypeError, ValueError):
        return None
