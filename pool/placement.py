"""Where a new session goes: the live host running the fewest sessions."""

from __future__ import annotations

import redis

from shoal import liveness
from shoal.errors import NoHostAvailable


def choose_host(r: redis.Redis) -> str:
    live = liveness.live_hosts(r)
    ready = {
        h: beat
        for h, beat in live.items()
        if beat.get("driver", {}).get("libvirt", {}).get("ok", False)
    }
    if not ready:
        raise NoHostAvailable(
            "no worker host is up: start one with `shoal up` (see /healthz for what is down)"
        )
    return min(ready, key=lambda h: (ready[h].get("sessions", 0), h))
