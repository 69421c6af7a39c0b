"""GET /healthz: the state of every part, 200 when all are up, 503 naming what is down."""

from __future__ import annotations

import time

import redis
from flask import Blueprint, Response, jsonify

from api.context import ctx
from shoal import hosts, keys, metrics

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
    return report, not down


@blp.get("/metrics")
def prometheus_metrics():
    """Prometheus text format: VMs per pool and host, acquisitions, expiries, lost sessions,
    executions and their latency histogram."""
    return Response(metrics.render(ctx().redis), mimetype="text/plain; version=0.0.4")


@blp.get("/healthz")
def healthz():
    report, ok = health_report()
    report["status"] = "ok" if ok else "degraded"
    response = jsonify(report)
    response.status_code = 200 if ok else 503
    return response
