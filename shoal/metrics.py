"""Counters and histograms kept in Redis (so every process of every host adds to the same
figures), and their Prometheus text exposition for GET /metrics."""

from __future__ import annotations

import json

import redis

from shoal import liveness
from shoal.keys import PREFIX

COUNTERS = f"{PREFIX}:metrics:counters"
HISTOGRAMS = f"{PREFIX}:metrics:histograms"
# Execution latency buckets (seconds): from a warm x += 1 to the 220 s limit.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 220)

HELP = {
    "shoal_session_acquisitions_total": "Sessions created, by pool and source (ready or cold).",
    "shoal_session_expiries_total": "Sessions ended by idle expiry or max lifetime.",
    "shoal_sessions_lost_total": "Sessions lost because their VM or host died.",
    "shoal_executions_total": "Executions finished, by pool and status.",
}


def _field(name: str, labels: dict[str, str]) -> str:
    return json.dumps([name, sorted(labels.items())])


def incr(r: redis.Redis | redis.client.Pipeline, name: str, **labels: str) -> None:
    r.hincrby(COUNTERS, _field(name, labels), 1)


def observe(r: redis.Redis | redis.client.Pipeline, name: str, seconds: float, **labels: str):
    """Add one observation to a cumulative histogram."""
    for bound in BUCKETS:
        if seconds <= bound:
            r.hincrby(HISTOGRAMS, _field(name, {**labels, "le": str(bound)}), 1)
    r.hincrby(HISTOGRAMS, _field(name, {**labels, "le": "+Inf"}), 1)
    r.hincrbyfloat(HISTOGRAMS, _field(name + "_sum", labels), seconds)


def _line(name: str, labels: list | dict, value: float) -> str:
    pairs = labels.items() if isinstance(labels, dict) else labels
    text = ",".join(f'{k}="{v}"' for k, v in pairs)
    return f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}"


def render(r: redis.Redis) -> str:
    lines = [
        "# HELP shoal_vms VMs per pool and host, by state (ready, busy).",
        "# TYPE shoal_vms gauge",
    ]
    for host, beat in sorted(liveness.live_hosts(r).items()):
        for pool, counts in sorted(beat.get("pools", {}).items()):
            for state in ("ready", "busy"):
                labels = {"host": host, "pool": pool, "state": state}
                lines.append(_line("shoal_vms", labels, counts.get(state, 0)))
    lines.append("# HELP shoal_host_up 1 while the host's heartbeat is fresh.")
    lines.append("# TYPE shoal_host_up gauge")
    for host, beat in sorted(liveness.heartbeats(r).items()):
        lines.append(_line("shoal_host_up", {"host": host}, 0 if beat is None else 1))
    counters = sorted((json.loads(k), float(v)) for k, v in r.hgetall(COUNTERS).items())
    seen = set()
    for (name, labels), value in counters:
        if name not in seen:
            seen.add(name)
            lines += [f"# HELP {name} {HELP.get(name, name)}", f"# TYPE {name} counter"]
        lines.append(_line(name, labels, value))
    histograms = sorted((json.loads(k), float(v)) for k, v in r.hgetall(HISTOGRAMS).items())
    if histograms:
        lines += [
            "# HELP shoal_execution_seconds Execution wall time on the host, by pool.",
            "# TYPE shoal_execution_seconds histogram",
        ]
    counts: dict[str, float] = {}
    for (name, labels), value in histograms:
        if name.endswith("_sum"):
            lines.append(_line(name, labels, value))
            continue
        lines.append(_line(name + "_bucket", labels, value))
        if dict(labels).get("le") == "+Inf":
            rest = [(k, v) for k, v in labels if k != "le"]
            counts[json.dumps(rest)] = value
    for rest, value in counts.items():
        lines.append(_line("shoal_execution_seconds_count", json.loads(rest), value))
    return "\n".join(lines) + "\n"
