"""Warm executions: `x += 1` in a live session over /v1 and over the dynamic-sessions route,
where the time of one goes (from the execution record's stamps), and throughput across 1, 4
and 16 concurrent sessions.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from urllib.parse import urlencode

from shoal.bench import cpu, stats
from shoal.bench.core import Bench, BenchError, Goal, Result, Scenario, timed_loop

WARM_UP_CALLS = 5  # the first executions after a restore re-translate code under TCG
LOOP_BUDGET_S = 120  # no latency loop runs longer than this, whatever its count
LEGACY_API = "2024-02-02-preview"

# The segments of one warm execution, measured with wall-clock stamps taken along the path
# (the client, the API and the worker run on this host, so their clocks are one clock).
SEGMENTS = (
    ("http_in", "client -> API record made (HTTP, auth, session lookup)"),
    ("queue", "record made -> worker starts it (Redis writes, Celery publish, broker, worker)"),
    ("host_channel", "worker: record save, virtio-serial channel both ways, agent framing"),
    ("guest", "guest agent: the execution itself (duration_ms)"),
    ("http_out", "worker finished -> client has the answer (Redis wake-up, JSON, HTTP)"),
)


def _epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


# Finer segments, when the worker stamps `timings.received_at` (task picked up) and
# `timings.answered_at` (agent answered) in the stored record: `queue` then splits into the
# two first, and `host_channel` into the two last.
FINER = (
    ("celery", "record made -> worker task received (API's Redis writes, publish, broker)"),
    ("worker_wait", "task received -> started (record load, the session's turn)"),
    ("channel", "started -> agent answer, less the guest (channel both ways, framing)"),
    ("finish", "agent answered -> finished stamp (cancel check, apply the answer)"),
)
# And `guest` into its phases, when the agent reports them (phases_ms, docs/agent-protocol.md).
GUEST_PHASES = (
    ("agent_in", "guest: the agent reads and checks the request, hands it over"),
    ("to_kernel", "guest: the interpreter process wakes and reads it"),
    ("kernel", "guest: the interpreter runs the cell and encodes the reply"),
    ("from_kernel", "guest: the agent wakes and reads the reply"),
)


def breakdown(
    rows: list[tuple[float, dict, float, float]], raw: dict[str, dict] | None = None
) -> dict[str, dict]:
    """Per-segment summaries (ms) from (ms, record, sent, received) rows of warm executions;
    `raw` (execution id -> stored record) adds the finer segments when stamped."""
    every = SEGMENTS + FINER + GUEST_PHASES
    parts: dict[str, list[float]] = {name: [] for name, _ in every}
    for _ms, record, sent, received in rows:
        stored = (raw or {}).get(record["id"], {})
        timings = stored.get("timings") or {}
        if timings.get("received_at") and timings.get("answered_at"):
            received_at, answered_at = timings["received_at"], timings["answered_at"]
            parts["celery"].append((received_at - stored["created_at"]) * 1000)
            parts["worker_wait"].append((stored["started_at"] - received_at) * 1000)
            parts["channel"].append(
                (answered_at - stored["started_at"]) * 1000 - float(record["duration_ms"] or 0.0)
            )
            parts["finish"].append((stored["finished_at"] - answered_at) * 1000)
        for name, _ in GUEST_PHASES:
            value = (timings.get("guest") or {}).get(name)
            if isinstance(value, int | float):
                parts[name].append(float(value))
        created = _epoch(record["created_at"])
        started = _epoch(record["started_at"])
        finished = _epoch(record["finished_at"])
        guest = float(record["duration_ms"] or 0.0)
        parts["http_in"].append((created - sent) * 1000)
        parts["queue"].append((started - created) * 1000)
        parts["host_channel"].append((finished - started) * 1000 - guest)
        parts["guest"].append(guest)
        parts["http_out"].append((received - finished) * 1000)
    return {
        name: {**stats.summarize(parts[name]), "what": what} for name, what in every if parts[name]
    }


def stored_records(b: Bench, ids: list[str]) -> dict[str, dict]:
    """The records as the worker stored them (all stamps), when this run can reach Redis."""
    try:
        from shoal import executions, redis_conn

        r = redis_conn.client(b.settings)
        return {i: rec for i in ids if (rec := executions.load(r, i)) is not None}
    except (Exception, SystemExit):  # noqa: BLE001 - the finer split is optional
        return {}


def warm_v1(b: Bench) -> list[Result]:
    count = b.options.calls or b.size(100, 500)
    session_id = b.new_session()
    try:
        b.execute(session_id, "x = 0")
        for _ in range(WARM_UP_CALLS):
            b.execute(session_id, "x += 1")
        rows: list[tuple[float, dict, float, float]] = []

        def one(i: int) -> float:
            row = b.execute(session_id, "x += 1")
            rows.append(row)
            if (i + 1) % 100 == 0:
                b.progress(f"  {i + 1}/{count} calls")
            return row[0]

        samples: list[float] = []

        def loop() -> int:
            samples.extend(timed_loop(count, LOOP_BUDGET_S, one))
            return len(samples)

        cpu_ms = cpu.per_call(b.settings, loop)
        # The guest reuses the compiled code of a cell run again verbatim; a new cell each
        # call shows the cost without that.
        fresh = timed_loop(
            max(count // 2, 1), LOOP_BUDGET_S, lambda i: b.execute(session_id, f"x += 1  # {i}")[0]
        )
        _ms, last, _s, _r = b.execute(session_id, "x")
        expected = str(WARM_UP_CALLS + len(samples) + len(fresh))
        if (last.get("result") or {}).get("text/plain") != expected:
            raise BenchError(f"state lost: x is {last.get('result')}, expected {expected}")
        floor = timed_loop(
            b.size(50, 200),
            30,
            lambda _i: _timed_get(b, f"/v1/sessions/{session_id}"),
        )
    finally:
        b.delete_session(session_id)
    warm = Result(
        "warm_v1",
        "warm execution `x += 1`, POST /v1/.../executions, wait true",
        samples=samples,
        peers=("ipykernel", "celery_noop"),
        goals=(
            Goal("p50 <= 12 ms (must)", "p50", 12.0, issue=5),
            Goal("p50 <= 8 ms (stretch)", "p50", 8.0, issue=5),
            Goal("p50 below the local ipykernel's", "ratio:ipykernel", 1.0, issue=8),
        ),
        extra={
            "breakdown": breakdown(rows, stored_records(b, [r[1]["id"] for r in rows])),
            "cpu_ms_per_call": cpu_ms,
        },
    )
    new_cell = Result(
        "warm_v1_new_cell",
        "warm execution, a new cell each call (`x += 1  # n`: no compiled-cell reuse), /v1",
        samples=fresh,
        peers=("ipykernel", "celery_noop"),
    )
    http_floor = Result(
        "http_floor",
        "GET /v1/sessions/{id} (HTTP + auth + one Redis read: the API's own floor)",
        samples=floor,
    )
    return [warm, new_cell, http_floor]


def _timed_get(b: Bench, path: str) -> float:
    started = time.perf_counter()
    response = b.request("GET", path)
    ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise BenchError(f"GET {path}: {response.status_code}")
    return ms


def warm_dynamic(b: Bench) -> list[Result]:
    count = b.options.calls or b.size(100, 500)
    identifier = "bench-" + secrets.token_hex(6)
    query = {"identifier": identifier, "api-version": LEGACY_API}

    path = "/pools/default/code/execute?" + urlencode(query)

    def run(code: str) -> float:
        started = time.perf_counter()
        status, raw = b.lean().post_json(
            path,
            {"properties": {"codeInputType": "inline", "executionType": "synchronous",
                            "code": code}},
        )  # fmt: skip
        ms = (time.perf_counter() - started) * 1000
        body = json.loads(raw) if status == 200 else {}
        if body.get("properties", {}).get("status") != "Success":
            raise BenchError(f"code/execute: {status} {raw[:300]!r}")
        guest.append(float(body["properties"].get("executionTimeInMilliseconds", 0)))
        return ms

    guest: list[float] = []

    try:
        run("x = 0")  # makes the session
        for _ in range(WARM_UP_CALLS):
            run("x += 1")
        samples = timed_loop(count, LOOP_BUDGET_S, lambda _i: run("x += 1"))
    finally:
        b.request("DELETE", "/pools/default/session", params=query)
    return [
        Result(
            "warm_dynamic",
            "warm execution `x += 1`, POST /pools/default/code/execute (dynamic sessions)",
            samples=samples,
            peers=("kernel_gateway", "ipykernel"),
            extra={"guest_ms": stats.summarize(guest[-len(samples) :])},
        )
    ]


def throughput(b: Bench) -> list[Result]:
    levels = [1, 4] if b.quick else [1, 4, 16]
    duration = b.size(5, 10)
    b.progress(f"  making {max(levels)} sessions")
    with ThreadPoolExecutor(4) as pool:
        session_ids = list(pool.map(lambda _i: b.new_session(b.client()), range(max(levels))))
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda s: [b.execute(s, "x = 0")] + [
                b.execute(s, "x += 1") for _ in range(WARM_UP_CALLS)
            ], session_ids))  # fmt: skip
        results = []
        for level in levels:
            rate, latencies = _drive(b, session_ids[:level], duration)
            b.progress(f"  {level} session(s): {rate:.0f} executions/s")
            goals = ()
            if level == 16:
                goals = (Goal(">= 300 executions/s", "value", 300.0, at_least=True, issue=8),)
            results.append(
                Result(
                    f"throughput_{level}",
                    f"trivial executions/s, {level} concurrent session(s), one client each",
                    unit="exec/s",
                    value=rate,
                    goals=goals,
                    extra={
                        "n": len(latencies),
                        "latency_ms": stats.summarize(latencies),
                        "sessions": level,
                        "duration_s": duration,
                    },
                )  # fmt: skip
            )
        return results
    finally:
        for session_id in session_ids:
            b.delete_session(session_id)


def _drive(b: Bench, session_ids: list[str], duration_s: float) -> tuple[float, list[float]]:
    """One client thread per session, each running `x += 1` back to back for duration_s."""
    latencies: list[float] = []
    failures: list[Exception] = []
    lock = threading.Lock()
    start = threading.Barrier(len(session_ids) + 1)
    stop_at: list[float] = []

    def client(session_id: str) -> None:
        mine = []
        start.wait()
        try:
            while time.monotonic() < stop_at[0]:
                mine.append(b.execute(session_id, "x += 1")[0])
        except Exception as exc:  # noqa: BLE001 - raised below, in the caller's thread
            failures.append(exc)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in session_ids]
    for thread in threads:
        thread.start()
    stop_at.append(time.monotonic() + duration_s)
    began = time.monotonic()
    start.wait()
    for thread in threads:
        thread.join(duration_s + 60)
    elapsed = time.monotonic() - began
    if failures:
        raise BenchError(f"{len(failures)} client(s) failed: {failures[0]}")
    return len(latencies) / elapsed, latencies


SCENARIOS = [
    Scenario("warm_v1", "(1) warm execution over /v1, and where its time goes", warm_v1),
    Scenario("warm_dynamic", "(2) warm execution over the dynamic-sessions route", warm_dynamic),
    Scenario("throughput", "(5) executions/s across 1, 4 (and 16) sessions", throughput),
]
