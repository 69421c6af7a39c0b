"""Where a new session goes: a live host with a ready VM of its pool, else the least-loaded
live host with room (SHOAL_HOST_MAX_VMS)."""

from __future__ import annotations

import redis

from shoal import hosts
from shoal.errors import NoHostAvailable


def choose_host(r: redis.Redis, pool: str) -> str:
    live = {
        host: beat
        for host, beat in hosts.live_hosts(r).items()
        if beat.get("driver", {}).get("libvirt", {}).get("ok", False)
    }
    if not live:
        raise NoHostAvailable(
            "no worker host is up: start one with `shoal up` (see /healthz for what is down)"
        )
    with_ready = [h for h, b in live.items() if b.get("pools", {}).get(pool, {}).get("ready", 0)]
    if with_ready:
        return max(with_ready, key=lambda h: (live[h]["pools"][pool]["ready"], h))
    roomy = [h for h, b in live.items() if b.get("vms", 0) < b.get("max_vms", 1 << 30)]
    if not roomy:
        raise NoHostAvailable("every host is at its VM limit (SHOAL_HOST_MAX_VMS)")
    return min(roomy, key=lambda h: (live[h].get("vms", 0), h))
