"""How many ready VMs a host starts or lets go per pool.

A pool asks for `ready_target` ready VMs per host and allows up to `ready_max` where memory
allows. Every VM started obeys shoal/host_memory.py's rule (counted at its whole size above the
host's reserve), so a host with room keeps up to `ready_max` and a host short of memory starts
none. Below the reserve, ready VMs above the target are let go: they are the cheapest memory a
host can give back, and they come back when memory does.
"""

from __future__ import annotations

from collections.abc import Iterable

from shoal.host_memory import HostMemory
from shoal.pools import Pool


def ready_changes(
    pools: Iterable[Pool], held: dict[str, int], memory: HostMemory
) -> dict[str, int]:
    """{pool: VMs to start (positive) or to let go (negative)}, given what each pool `held`
    (ready or starting). Pools take the spare memory in name order."""
    spare = memory.spare_mib()
    changes = {}
    for pool in sorted(pools, key=lambda p: p.name):
        holding = held.get(pool.name, 0)
        if holding > pool.ready_ceiling:  # the pool's ready_max was lowered
            changes[pool.name] = pool.ready_ceiling - holding
            continue
        if spare < 0:
            changes[pool.name] = -max(holding - pool.ready_target, 0)
            continue
        start = min(pool.ready_ceiling - holding, spare // max(pool.memory_mib, 1))
        changes[pool.name] = max(start, 0)
        spare -= changes[pool.name] * pool.memory_mib
    return changes
