"""The host registry: which hosts have registered, and each one's last heartbeat.

Every worker refreshes a heartbeat key with a TTL (workers/host.py); a host whose key has
expired is silent. Placement, /healthz, /metrics and the liveness check read it here.
"""

from __future__ import annotations

import json
from typing import Any

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


TCG_WARNING = (
    "guests run under TCG, QEMU's software CPU: not a hardware isolation boundary (QEMU does not "
    "treat TCG as a security boundary). Run untrusted code on a host with VT-x/AMD-V and KVM; "
    "SHOAL_REQUIRE_KVM=1 refuses to start without it"
)


def accelerator(beat: Heartbeat) -> dict[str, Any]:
    """The accelerator a host's guests run under, from its heartbeat (workers/vm.py's status):
    {kind: kvm | tcg | unknown, reason, warning (when not kvm)}."""
    accel = dict(beat.get("driver", {}).get("accel") or {})
    kind = accel.get("kind", "unknown")
    found: dict[str, Any] = {"kind": kind, "reason": accel.get("reason", "not reported")}
    if kind != "kvm":
        found["warning"] = (
            TCG_WARNING if kind == "tcg" else ("the accelerator is unknown; " + TCG_WARNING)
        )
    return found
