"""Counters and histograms kept in Redis (so every process of every host adds to the same
figures), and their Prometheus text exposition for GET /metrics."""

from __future__ import annotations

import json
from functools import lru_cache

import redis

from shoal import hosts
from shoal.keys import PREFIX

COUNTERS = f"{PREFIX}:metrics:counters"
# Per-bucket counts (not cumulative: an observation is one HINCRBY, not one per bucket above it);
# render() adds them up into Prometheus' cumulative buckets.
HISTOGRAMS = f"{PREFIX}:metrics:histogram-buckets"
# Execution latency buckets (seconds): from a warm x += 1 to the 220 s limit.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 220)
INF = "+Inf"

HELP = {
    "shoal_session_acquisitions_total": "Sessions created, by pool and source (ready or cold).",
    "shoal_session_expiries_total": "Sessions ended by idle expiry or max lifetime.",
    "shoal_sessions_lost_total": "Sessions lost because their VM or host died.",
    "shoal_session_sleeps_total": "Sessions put to sleep (their VM saved to disk), by pool.",
    "shoal_session_wakes_total": "Sleeping sessions woken, by pool.",
    "shoal_executions_total": "Executions finished, by pool and status.",
    "shoal_executions_overdue_total": "Executions ended lost long past any deadline (task lost).",
}


@lru_cache(maxsize=1024)
def _field(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    return json.dumps([name, sorted(labels)])


def incr(r: redis.Redis | redis.client.Pipeline, name: str, **labels: str) -> None:
    r.hincrby(COUNTERS, _field(name, tuple(labels.items())), 1)


def observe(r: redis.Redis | redis.client.Pipeline, name: str, seconds: float, **labels: str):
    """Add one observation to a histogram: its bucket's count and the sum."""
    bound = next((str(b) for b in BUCKETS if seconds <= b), INF)
    r.hincrby(HISTOGRAMS, _field(name, (*labels.items(), ("le", bound))), 1)
    r.hincrbyfloat(HISTOGRAMS, _field(name + "_sum", tuple(labels.items())), seconds)


def _line(name: str, labels: list | dict, value: float) -> str:
    pairs = labels.items() if isinstance(labels, dict) else labels
    text = ",".join(f'{k}="{v}"' for k, v in pairs)
    return f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}"


def render(r: redis.Redis) -> str:
    lines = [
        "# HELP shoal_vms VMs per pool and host, by state (ready, busy).",
        "# TYPE shoal_vms gauge",
    ]
    for host, beat in sorted(hosts.live_hosts(r).items()):
        for pool, counts in sorted(beat.get("pools", {}).items()):
            for state in ("ready", "busy"):
                labels = {"host": host, "pool": pool, "state": state}
                lines.append(_line("shoal_vms", labels, counts.get(state, 0)))
    lines.append("# HELP shoal_host_up 1 while the host's heartbeat is fresh.")
    lines.append("# TYPE shoal_host_up gauge")
    for host, beat in sorted(hosts.heartbeats(r).items()):
        lines.append(_line("shoal_host_up", {"host": host}, 0 if beat is None else 1))
    counters = sorted((json.loads(k), float(v)) for k, v in r.hgetall(COUNTERS).items())
    seen = set()
    for (name, labels), value in counters:
        if name not in seen:
            seen.add(name)
            lines += [f"# HELP {name} {HELP.get(name, name)}", f"# TYPE {name} counter"]
        lines.append(_line(name, labels, value))
    lines += _histogram_lines(r.hgetall(HISTOGRAMS))
    return "\n".join(lines) + "\n"


def _histogram_lines(fields: dict[str, str]) -> list[str]:
    """Cumulative `_bucket`, `_count` and `_sum` lines from the per-bucket counts."""
    counts: dict[tuple[str, str], dict[str, float]] = {}  # (name, other labels) -> le -> n
    sums: dict[tuple[str, str], float] = {}
    for raw, value in fields.items():
        name, labels = json.loads(raw)
        rest = json.dumps([pair for pair in labels if pair[0] != "le"])
        if name.endswith("_sum"):
            sums[(name[: -len("_sum")], rest)] = float(value)
        else:
            le = dict(labels).get("le", INF)
            counts.setdefault((name, rest), {})[le] = float(value)
    if not counts:
        return []
    lines = [
        "# HELP shoal_execution_seconds Execution wall time on the host, by pool.",
        "# TYPE shoal_execution_seconds histogram",
    ]
    for (name, rest), by_bound in sorted(counts.items()):
        labels = json.loads(rest)
        total = 0.0
        for bound in [*map(str, BUCKETS), INF]:
            total += by_bound.get(bound, 0.0)
            lines.append(_line(name + "_bucket", sorted([*labels, ["le", bound]]), total))
        lines.append(_line(name + "_count", labels, total))
        lines.append(_line(name + "_sum", labels, sums.get((name, rest), 0.0)))
    return lines
