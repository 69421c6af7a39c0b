"""Pools over time: how fast a host refills a drained ready pool, and how late idle
sessions expire. Both need the benchmark's own pools (target.EXTRA_POOLS); against a Shoal that
lacks them they report nothing.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from shoal.bench.core import Bench, Goal, Result, Scenario
from shoal.bench.target import BRIEF_POOL, REFILL_POOL

WAIT_S = 180  # for a pool to fill, or a session to expire
POLL_S = 0.25


def _ready(b: Bench, pool: str) -> int:
    return int(b.request("GET", f"/v1/pools/{pool}").json()["counts"]["ready"])


def _wait_ready(b: Bench, pool: str, count: int) -> float:
    """Seconds until the pool shows `count` ready VMs (at most WAIT_S)."""
    started = time.monotonic()
    while _ready(b, pool) < count and time.monotonic() - started < WAIT_S:
        time.sleep(POLL_S)
    return time.monotonic() - started


SETTLE_QUIET_S = 3.0  # ready counts unchanged this long: the hosts' initial fill is over
SETTLE_MAX_S = 180.0


def settle(b: Bench) -> float:
    """Wait until every pool holds its ready target and the ready counts stop growing (the
    hosts fill ready VMs up to ready_max when memory allows): restores running in the background
    would slow whatever is measured first. Returns the seconds waited."""
    started = time.monotonic()
    last, quiet_since = None, started
    while time.monotonic() - started < SETTLE_MAX_S:
        pools = b.pools().values()
        counts = tuple(sorted((p["name"], p["counts"]["ready"]) for p in pools))
        short = any(p["counts"]["ready"] < p["ready_target"] for p in pools)
        if counts != last:
            last, quiet_since = counts, time.monotonic()
        elif not short and time.monotonic() - quiet_since >= SETTLE_QUIET_S:
            break
        time.sleep(POLL_S)
    return time.monotonic() - started


def refill(b: Bench) -> list[Result]:
    pool = b.pools().get(REFILL_POOL)
    if not pool:
        b.progress(f"  no pool {REFILL_POOL!r}: no refill figure")
        return []
    target = int(pool["ready_target"])
    _wait_ready(b, REFILL_POOL, target)
    taken = [b.new_session(pool=REFILL_POOL) for _ in range(target)]
    elapsed = _wait_ready(b, REFILL_POOL, target)
    for session_id in taken:
        b.delete_session(session_id)
    per_minute = target / elapsed * 60 if elapsed > 0 else 0.0
    b.progress(f"  {target} ready VMs taken; refilled in {elapsed:.1f} s")
    return [
        Result(
            "refill_rate",
            f"ready VMs restored per minute refilling a drained pool of {target} (one host)",
            unit="VMs/min",
            value=per_minute,
            notes=f"{target} VMs in {elapsed:.1f} s, at most SHOAL_RESTORE_PARALLEL at a time",
        )
    ]


def _epoch(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def expiry(b: Bench) -> list[Result]:
    if BRIEF_POOL not in b.pools():
        b.progress(f"  no pool {BRIEF_POOL!r}: no expiry figure")
        return []
    count = b.size(2, 5)
    deadlines = {}
    for _ in range(count):
        session_id = b.new_session(pool=BRIEF_POOL)
        view = b.request("GET", f"/v1/sessions/{session_id}").json()
        deadlines[session_id] = _epoch(view["expires_at"])
    late: list[float] = []
    give_up = time.monotonic() + WAIT_S
    while deadlines and time.monotonic() < give_up:
        for session_id, deadline in list(deadlines.items()):
            if b.request("GET", f"/v1/sessions/{session_id}").status_code == 404:
                late.append(max(time.time() - deadline, 0.0))
                del deadlines[session_id]
        time.sleep(POLL_S)
    b.progress(f"  {len(late)} of {count} sessions expired; late by {late}")
    return [
        Result(
            "expiry_delay",
            "idle cooldown end to the session gone (GET answers 404; its VM destroy follows)",
            unit="s",
            samples=late,
            goals=(Goal("p99 <= 15 s", "p99", 15.0, issue=6),),
            notes=f"{len(deadlines)} sessions had not expired after {WAIT_S} s"
            if deadlines
            else "",
        )
    ]


SCENARIOS = [
    Scenario("refill", "(6) refill rate of a drained ready pool", refill),
    Scenario("expiry", "(6) expiry accuracy: idle deadline to session gone", expiry),
]
