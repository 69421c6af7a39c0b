"""A batch of trivial items (`POST /v1/batches`, each item in a fresh session, as batches run
them) against the same items one by one from the client (create a session, execute, delete):
wall time, items/s, and the speed-up."""

from __future__ import annotations

import time

from shoal.bench.core import Bench, BenchError, Goal, Result, Scenario

POLL_S = 0.25
BATCH_TIMEOUT_S = 900


def _one_by_one(b: Bench, count: int) -> float:
    started = time.perf_counter()
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    for i in range(count):
        if time.monotonic() > deadline:
            raise BenchError(f"one by one: only {i} of {count} items in {BATCH_TIMEOUT_S} s")
        session_id = b.new_session()
        try:
            b.execute(session_id, "1")
        finally:
            b.delete_session(session_id)
    return time.perf_counter() - started


def run_batch(b: Bench, body: dict, timeout_s: float = BATCH_TIMEOUT_S) -> tuple[float, dict]:
    """POST the batch and poll it until it is over: (seconds, its last view)."""
    started = time.perf_counter()
    response = b.request("POST", "/v1/batches", json=body)
    if response.status_code != 202:
        raise BenchError(f"POST /v1/batches: {response.status_code} {response.text[:300]}")
    batch_id = response.json()["id"]
    deadline = time.monotonic() + timeout_s
    while True:
        view = b.request("GET", f"/v1/batches/{batch_id}", params={"limit": 1}).json()
        if view.get("status") != "running":
            return time.perf_counter() - started, view
        if time.monotonic() > deadline:
            b.request("POST", f"/v1/batches/{batch_id}/cancel")
            raise BenchError(f"batch {batch_id} still running after {timeout_s:.0f} s")
        time.sleep(POLL_S)


def _batch(b: Bench, count: int) -> tuple[float, dict]:
    return run_batch(b, {"items": [{"code": "1"}] * count})


def batch(b: Bench) -> list[Result]:
    count = b.size(20, 200)
    b.progress(f"  {count} items one by one")
    serial_s = _one_by_one(b, count)
    b.progress(f"  {count / serial_s:.1f} items/s; now as one batch")
    batch_s, view = _batch(b, count)
    counts = view.get("counts", {})
    if view.get("status") != "completed" or counts.get("succeeded", 0) != count:
        raise BenchError(f"batch ended {view.get('status')} with {counts}")
    return [
        Result(f"batch_{count}", f"batch of {count} trivial items, each in a fresh session",
               unit="items/s", value=count / batch_s,
               extra={"n": count, "wall_s": round(batch_s, 2),
                      "max_parallel": view.get("max_parallel")}),
        Result(f"one_by_one_{count}", f"the same {count} items one by one from the client",
               unit="items/s", value=count / serial_s,
               extra={"n": count, "wall_s": round(serial_s, 2)}),
        Result("batch_speedup", "batch items/s over one-by-one items/s", unit="x",
               value=serial_s / batch_s,
               goals=(Goal("batch >= 2x faster than one by one", "value", 2.0, at_least=True,
                           issue=8),)),
    ]  # fmt: skip


SCENARIOS = [Scenario("batch", "(6) batch of trivial items vs one by one", batch)]
