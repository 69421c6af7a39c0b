"""Where a new session goes: a live host with a ready VM of its pool, else the live host with
the most room, room being the fewer of the VMs it may still run (SHOAL_HOST_MAX_VMS) and the
VMs of the pool's size its memory holds above its reserve (shoal/host_memory.py)."""

from __future__ import annotations

import redis

from shoal import host_memory, hosts
from shoal.errors import NoHostAvailable
from shoal.pools import Pool
from shoal.records import Heartbeat


def room(beat: Heartbeat, memory_mib: int) -> tuple[int, int]:
    """(room, room by memory alone) for one more VM of `memory_mib` on the host."""
    by_count = beat.get("max_vms", 1 << 30) - beat.get("vms", 0)
    memory = host_memory.from_heartbeat(beat)
    by_memory = memory.room_for(memory_mib) if memory else 1 << 30
    return min(by_count, by_memory), by_memory


def choose_host(r: redis.Redis, pool: Pool) -> str:
    live = {
        host: beat
        for host, beat in hosts.live_hosts(r).items()
        if beat.get("driver", {}).get("libvirt", {}).get("ok", False)
    }
    if not live:
        raise NoHostAvailable(
            "no worker host is up: start one with `shoal up` (see /healthz for what is down)"
        )
    name = pool.name
    with_ready = [h for h, b in live.items() if b.get("pools", {}).get(name, {}).get("ready", 0)]
    if with_ready:
        return max(with_ready, key=lambda h: (live[h]["pools"][name]["ready"], h))
    rooms = {h: room(b, pool.memory_mib) for h, b in live.items()}
    roomy = [h for h, (total, _memory) in rooms.items() if total > 0]
    if roomy:
        return max(roomy, key=lambda h: (rooms[h][0], h))
    if all(by_memory <= 0 for _total, by_memory in rooms.values()):
        raise NoHostAvailable(
            f"every host is short of memory for a {pool.memory_mib} MiB VM: each keeps "
            "SHOAL_HOST_MEMORY_RESERVE_MIB free; retry when sessions end"
        )
    raise NoHostAvailable("every host is at its VM limit (SHOAL_HOST_MAX_VMS)")
