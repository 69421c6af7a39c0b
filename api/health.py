"""GET /healthz and GET /metrics, the operator's view.

/healthz answers 200 when every part is up and 503 when one is down. Without a key, or with a
tenant's key, it says only `{"status": "ok" | "degraded"}`: a load balancer needs no more, and
the details (versions, host paths, the guest kernel's command line, session counts) help an
attacker more than a tenant. With an admin key (shoal/admin_keys.py) it gives every part's state,
what is down, Redis's memory pressure (`redis.memory`), each worker's accelerator with a
plain warning when guests run under TCG, and each worker's memory: available, the reserve it
keeps, and which memory-sharing mode its clones use and why the others are not
(`workers.<host>.memory`). /metrics needs an admin key: 401 without a valid key,
403 with a tenant's.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from flask import Blueprint, Response, jsonify

from api.auth import caller_role, require_admin
from api.context import ctx
from shoal import admin_keys, hosts, keys, metrics, storage
from shoal.context import Context

blp = Blueprint("health", __name__)


def health_report() -> tuple[dict, bool]:
    c = ctx()
    report: dict = {"redis": {"up": False}, "workers": {}, "beat": {"up": False}}
    try:
        c.redis.ping()
        report["redis"]["up"] = True
    except redis.RedisError as exc:
        report["redis"]["error"] = str(exc)
        return report, False
    down: list[str] = []
    warnings: list[str] = []
    report["redis"]["memory"] = memory_report(c)
    if report["redis"]["memory"].get("full"):
        down.append("redis (at its maxmemory: writes are refused)")
    for host, beat in hosts.heartbeats(c.redis).items():
        if beat is None:
            report["workers"][host] = {"up": False}
            down.append(f"worker {host}")
            continue
        driver = beat.get("driver", {})
        report["workers"][host] = {
            "up": True,
            "age_s": round(time.time() - beat["at"], 1),
            "sessions": beat.get("sessions", 0),
            "libvirt": driver,
        }
        report["workers"][host]["template"] = beat.get("template", "")
        report["workers"][host]["memory"] = {
            **beat.get("memory", {}),
            "sharing": driver.get("memory_sharing", {}),
        }
        accel = hosts.accelerator(beat)
        report["workers"][host]["accelerator"] = accel
        if accel.get("warning"):
            warnings.append(f"{host}: {accel['warning']}")
        if not driver.get("libvirt", {}).get("ok", False):
            down.append(f"libvirt on {host}")
        if beat.get("template") == "building":
            down.append(f"worker {host} (still building its snapshot template)")
    if not report["workers"]:
        down.append("workers (none registered)")
    beat_at = c.redis.get(keys.beat_heartbeat())
    if beat_at:
        report["beat"] = {"up": True, "age_s": round(time.time() - float(beat_at), 1)}
    else:
        down.append("beat")
    report["down"] = down
    report["warnings"] = warnings
    return report, not down


def memory_report(c: Context) -> dict[str, Any]:
    """Redis's memory against its maxmemory, and what all tenants' data is counted for against
    its share (shoal/storage.py). `full` (the instance degraded) only when Redis itself is at
    maxmemory: then the service's own writes fail. Tenants at their caps are refused by design,
    with the headroom left for the service: not an outage."""
    totals = {
        "tenants_bytes": storage.held_by_all(c.redis),
        "tenants_max_bytes": c.settings.tenants_redis_bytes,
    }
    try:
        info = c.redis.info("memory")
    except redis.RedisError as exc:  # a Redis that does not tell (INFO refused)
        return {**totals, "error": f"INFO memory: {exc}", "full": False}
    used, maxmemory = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    policy = str(info.get("maxmemory_policy", ""))
    notes = []
    if not maxmemory:
        notes.append("Redis has no maxmemory: nothing keeps it from taking the host's memory")
    elif maxmemory != c.settings.redis_maxmemory_bytes:
        notes.append(
            f"Redis's maxmemory is {maxmemory} bytes, SHOAL_REDIS_MAXMEMORY_MIB says "
            f"{c.settings.redis_maxmemory_bytes}: the tenants' share is computed from the latter"
        )
    if maxmemory and policy != "noeviction":
        notes.append(f"maxmemory-policy {policy} may evict Shoal's records; use noeviction")
    return {
        "used_bytes": used,
        "max_bytes": maxmemory,
        "used_pct": round(100 * used / maxmemory, 1) if maxmemory else None,
        "policy": policy,
        **totals,
        "full": bool(maxmemory) and used >= maxmemory,
        "notes": notes,
    }


@blp.get("/metrics")
def prometheus_metrics():
    """Prometheus text format: VMs per pool and host, acquisitions, expiries, lost sessions,
    executions and their latency histogram. Admin key only."""
    require_admin()
    return Response(metrics.render(ctx().redis), mimetype="text/plain; version=0.0.4")


@blp.get("/healthz")
def healthz():
    try:
        admin = caller_role() == admin_keys.ADMIN
    except redis.RedisError:  # no key can be checked: the public view, which says degraded
        admin = False
    report, ok = health_report()
    status = "ok" if ok else "degraded"
    response = jsonify({**report, "status": status} if admin else {"status": status})
    response.status_code = 200 if ok else 503
    return response
