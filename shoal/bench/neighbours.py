"""Fair share under a noisy neighbour (issue 12): tenant B's warm execution and new-session
figures with the instance quiet, then again while tenant A floods its sessions with sleeping
executions and sends requests at its rate limit (shoal/bench/neighbour_load.py).

B is the benchmark's own tenant; its warm loop runs in one session through both phases, with
the same client as `warm_v1`, and its new sessions come from the `default` pool (left to
refill before each, as in `new_session`). A is made here on the private instance: a key of
tenant `bench-neighbour` and its own caps on unfinished executions, wide enough for the flood,
written straight into the instance's Redis as `shoal keys` would. Its rate limit stays the
instance's default. Against a Shoal given by --url, A is the tenant of --neighbour-key
(docs/performance.md says how to make it); without that key the scenario is skipped.

A's sessions come from the `bench-ondemand` pool, so they take none of the ready VMs B's new
sessions are measured with: what B may feel is A's queue and A's requests, not a drained pool.
"""

from __future__ import annotations

import http.client
import time
from typing import Any

import requests

from shoal.bench.core import Bench, BenchError, BenchSkipped, Goal, Result, Scenario
from shoal.bench.executions import LOOP_BUDGET_S, WARM_UP_CALLS
from shoal.bench.neighbour_load import NEIGHBOUR_TENANT, OVER_RATE, Flood, Neighbour, size_flood
from shoal.bench.sessions import SETTLE_S, wait_refilled
from shoal.bench.target import ONDEMAND_POOL

LOAD_SETTLE_S = 3.0  # A's load runs this long before B is measured under it
SETTLE_MAX_S = 120  # the longest the scenario waits for the pools to fill before it starts
RATIO_LIMIT = 1.5  # issue 12: B's p50 within 1.5x of its quiet figure
B_FAILED = (BenchError, requests.RequestException, OSError, http.client.HTTPException,
            ValueError, KeyError)  # fmt: skip
KEPT_FAILURES = 5  # the first few failure messages go in the report


class Phase:
    """B's figures in one phase: warm round trips, new session to first answer (ms), and
    every B request that failed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.warm: list[float] = []
        self.starts: list[float] = []
        self.failures: list[str] = []

    def failed(self, what: str, exc: BaseException) -> None:
        self.failures.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")


def _redis(b: Bench) -> Any:
    """A client of the instance's Redis, or None when this run cannot reach it."""
    try:
        from shoal import redis_conn

        r = redis_conn.client(b.settings)
        r.ping()
        return r
    except (Exception, SystemExit):  # noqa: BLE001 - an external instance may hide its Redis
        return None


def _tenant_a(b: Bench, r: Any, flood: Flood) -> tuple[str, str | None]:
    """(A's key, A's tenant when known). On the private instance A is made here, with caps on
    unfinished executions that fit the flood; otherwise its key comes from --neighbour-key."""
    from shoal import tenants

    given = getattr(b.options, "neighbour_key", "") or ""
    if given:
        return given, tenants.authenticate(r, given) if r is not None else None
    if not b.private:
        raise BenchSkipped(
            "needs a second tenant's key: pass --neighbour-key KEY (a key of another tenant, "
            f"with --max-pending {flood.total} --max-session-pending {flood.per_session}: "
            "docs/performance.md)"
        )
    if r is None:
        raise BenchError("cannot reach the private instance's Redis to make tenant A")
    _key_id, key = tenants.create_key(r, NEIGHBOUR_TENANT)
    tenants.set_limits(
        r, NEIGHBOUR_TENANT, max_pending=flood.total, max_session_pending=flood.per_session
    )
    tenants.set_max_sessions(r, NEIGHBOUR_TENANT, flood.sessions)
    return key, NEIGHBOUR_TENANT


def _a_rate(b: Bench, r: Any, tenant: str | None) -> tuple[float, int]:
    """A's request rate limit and burst: its own when the instance's Redis says, else the
    instance's defaults as this process reads them."""
    if r is not None and tenant:
        from shoal import tenants

        found = tenants.limits(r, tenant, b.settings)
        return float(found["rate"]), int(found["burst"])
    return float(b.settings.tenant_rate), int(b.settings.tenant_burst)


def _ready_targets(b: Bench) -> dict[str, int]:
    return {name: int(p.get("ready_target", 0)) for name, p in b.pools().items()}


def _settle(b: Bench, targets: dict[str, int]) -> None:
    """Wait until every pool holds its ready VMs (restores in the background would slow the
    quiet figures: a fresh private instance is still filling its pools), up to SETTLE_MAX_S."""
    deadline = time.monotonic() + SETTLE_MAX_S
    for pool, target in targets.items():
        if target > 0:
            wait_refilled(b, pool, target, max(deadline - time.monotonic(), 0.0))
    time.sleep(SETTLE_S)


def _measure_b(
    b: Bench, session_id: str, phase: Phase, calls: int, starts: int, warm: bool
) -> None:
    """B's warm loop in its session, then `starts` new sessions to their first answer."""
    deadline = time.monotonic() + LOOP_BUDGET_S
    for _ in range(calls):
        if time.monotonic() > deadline:
            break
        try:
            phase.warm.append(b.execute(session_id, "x += 1")[0])
        except B_FAILED as exc:
            phase.failed("warm execution", exc)
    for i in range(starts):
        if warm:
            wait_refilled(b, "default", 1)
        started = time.perf_counter()
        new_id = None
        try:
            new_id = b.new_session()
            b.execute(new_id, "1")
            phase.starts.append((time.perf_counter() - started) * 1000)
        except B_FAILED as exc:
            phase.failed("new session", exc)
        finally:
            if new_id is not None:
                try:
                    gone = b.delete_session(new_id)
                    if gone.status_code != 204:
                        raise BenchError(f"DELETE /v1/sessions: {gone.status_code}")
                except B_FAILED as exc:
                    phase.failed("delete session", exc)
        b.progress(f"  {phase.name}: new session {i + 1}/{starts}")
        time.sleep(SETTLE_S)
    b.progress(
        f"  {phase.name}: warm p50 {_p50(phase.warm):.1f} ms over {len(phase.warm)} calls, "
        f"new session p50 {_p50(phase.starts):.0f} ms, {len(phase.failures)} failed"
    )


def _p50(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2] if samples else float("nan")


def noisy_neighbour(b: Bench) -> list[Result]:
    calls = b.options.calls or b.size(100, 500)
    starts = b.size(3, 10)
    threads = b.settings.worker_threads
    flood = size_flood(threads)
    r = _redis(b)
    key, tenant = _tenant_a(b, r, flood)
    rate, burst = _a_rate(b, r, tenant)
    targets = _ready_targets(b)
    a_pool = ONDEMAND_POOL if ONDEMAND_POOL in targets else "default"
    pool_warm = targets.get("default", 0) > 0  # else B's new sessions are on-demand restores
    quiet, loaded = Phase("quiet"), Phase("under load")
    _settle(b, targets)
    b_session = b.new_session()
    try:
        b.execute(b_session, "x = 0")
        for _ in range(WARM_UP_CALLS):
            b.execute(b_session, "x += 1")
        _measure_b(b, b_session, quiet, calls, starts, pool_warm)
        a = Neighbour(b, key, flood, rate, _pending_of(r, tenant))
        try:
            b.progress(f"  tenant A: {flood.sessions} sessions in {a_pool}, "
                       f"{flood.total} sleeping executions (worker threads {threads})")  # fmt: skip
            a.open_sessions(a_pool)
            a.fill()
            a.start_load()
            b.progress(
                f"  tenant A: sending {rate * OVER_RATE:g} requests/s (its limit {rate:g}/s)"
            )
            time.sleep(LOAD_SETTLE_S)
            began = time.monotonic()
            _measure_b(b, b_session, loaded, calls, starts, pool_warm)
            ended = time.monotonic()
            a.stop_load()
        finally:
            a.close()
    finally:
        b.delete_session(b_session)
    return results(quiet, loaded, a, flood, threads, (rate, burst), a.unfinished(began, ended))


def _pending_of(r: Any, tenant: str | None):
    """() -> A's unfinished executions, read from the instance's Redis; None without it."""
    if r is None or not tenant:
        return None
    from shoal import keys

    return lambda: r.zcard(keys.tenant_executions(tenant))


def results(
    quiet: Phase,
    loaded: Phase,
    a: Neighbour,
    flood: Flood,
    threads: int,
    limit: tuple[float, int],
    unfinished: list[int],
) -> list[Result]:
    rate, burst = limit
    sent = sum(a.load_tally.values())
    refused = {k: v for k, v in sorted(a.load_tally.items()) if k != "accepted"}
    accepted = a.fill_tally["accepted"]
    load_note = (
        f"while tenant A kept {min(unfinished) if unfinished else accepted} executions "
        f"unfinished (worker threads {threads}) and sent {sent / max(a.load_s, 1e-9):.0f} "
        f"requests/s (its limit {rate:g}/s)"
    )
    quiet_warm = "noisy_quiet_warm"
    quiet_start = "noisy_quiet_new_session"
    return [
        Result(quiet_warm, "tenant B alone: warm `x += 1`, /v1, wait true", samples=quiet.warm),
        Result(
            "noisy_loaded_warm",
            "tenant B beside noisy tenant A: warm `x += 1`, same session and client",
            samples=loaded.warm,
            peers=(quiet_warm,),
            goals=(
                Goal(
                    "B warm p50 within 1.5x of quiet", f"ratio:{quiet_warm}", RATIO_LIMIT, issue=12
                ),
            ),  # fmt: skip
            notes=load_note,
        ),
        Result(
            quiet_start,
            "tenant B alone: new session to first answer (pool warm)",
            samples=quiet.starts,
        ),
        Result(
            "noisy_loaded_new_session",
            "tenant B beside noisy tenant A: new session to first answer (pool warm)",
            samples=loaded.starts,
            peers=(quiet_start,),
            goals=(
                Goal(
                    "B new-session p50 within 1.5x of quiet",
                    f"ratio:{quiet_start}",
                    RATIO_LIMIT,
                    issue=12,
                ),
            ),  # fmt: skip
            notes=load_note,
        ),
        Result(
            "noisy_b_failed",
            "tenant B requests that failed (both phases)",
            unit="requests",
            value=float(len(quiet.failures) + len(loaded.failures)),
            goals=(Goal("no B request failed", "value", 0.0, issue=12),),
            extra={
                "quiet": len(quiet.failures),
                "loaded": len(loaded.failures),
                "first": (quiet.failures + loaded.failures)[:KEPT_FAILURES],
            },
        ),
        Result(
            "noisy_a_unfinished",
            "tenant A's unfinished executions while B was measured (fewest sampled)",
            unit="executions",
            value=float(min(unfinished) if unfinished else accepted),
            goals=(
                Goal(
                    f">= worker threads + 8 ({flood.need})",
                    "value",
                    float(flood.need),
                    at_least=True,
                    issue=12,
                ),
            ),  # fmt: skip
            notes="" if unfinished else "Redis not reachable: the flood's accepted count",
            extra={
                "worker_threads": threads,
                "flood": {"sessions": flood.sessions, "per_session": flood.per_session},
                "accepted_in_flood": accepted,
                "sampled": {
                    "n": len(unfinished),
                    "min": min(unfinished, default=None),
                    "max": max(unfinished, default=None),
                },  # fmt: skip
                "fill": dict(a.fill_tally),
            },
        ),
        Result(
            "noisy_a_rate",
            "tenant A's requests per second while B was measured (at its rate limit)",
            unit="req/s",
            value=sent / max(a.load_s, 1e-9),
            goals=(
                Goal(f">= its rate limit ({rate:g}/s)", "value", rate, at_least=True, issue=12),
            ),  # fmt: skip
            extra={
                "n": sent,
                "seconds": round(a.load_s, 1),
                "limit": rate,
                "burst": burst,
                # what got past the rate limit, per second: about the limit when A is at it
                "admitted_per_s": round(
                    (sent - a.load_tally["RateLimited"]) / max(a.load_s, 1e-9), 1
                ),
            },
        ),
        Result(
            "noisy_a_429",
            "tenant A's requests answered 429 (RateLimited, TooManyPendingExecutions): expected",
            unit="responses",
            value=float(sum(v for k, v in refused.items() if k in _TOO_MANY)),
            extra={"n": sent, "by_code": refused, "accepted": a.load_tally["accepted"]},
        ),
    ]


_TOO_MANY = ("RateLimited", "TooManyPendingExecutions", "TooManyWaits", "TenantSessionLimit")

SCENARIOS = [
    Scenario(
        "noisy_neighbour",
        "(12) tenant B's warm and new-session p50 beside a tenant flooding its sessions",
        noisy_neighbour,
    ),
]
