"""The host registry: which hosts have registered, and each one's last heartbeat.

Every worker refreshes a heartbeat key with a TTL (workers/host.py); a host whose key has
expired is silent. Placement, /healthz, /metrics and the liveness check read it here.
"""

from __future__ import annotations

import json

import redis

from shoal import keys
from shoal.records import Heartbeat


def heartbeats(r: redis.Redis) -> dict[str, Heartbeat | None]:
    """Every registered host and its last heartbeat (None when it has gone silent)."""
    hosts = sorted(r.smembers(keys.hosts()))
    if not hosts:
        return {}
    raw = r.mget([keys.host_heartbeat(h) for h in hosts])
    return {h: (json.loads(v) if v else None) for h, v in zip(hosts, raw, strict=True)}


def live_hosts(r: redis.Redis) -> dict[str, Heartbeat]:
    return {h: beat for h, beat in heartbeats(r).items() if beat is not None}
