"""New sessions: POST /v1/sessions to the first execution answered, `import pandas` as a new
session's first statement, and the worker's own timings of each restore (from its log).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from shoal.bench import stats
from shoal.bench.core import Bench, BenchError, Goal, Result, Scenario

SETTLE_S = 1.0  # after a delete, let the worker destroy the VM before the next restore

_STEP = re.compile(r"session=(\S+) host=\S+ step=(\w+) ms=(\d+)")
_READY = re.compile(r"session=(\S+) host=\S+ vm ready: domain=\S+ restored=(\w+) ms=(\d+)")


def new_session(b: Bench) -> list[Result]:
    count = b.size(3, 10)
    first, create = [], []
    for i in range(count):
        started = time.perf_counter()
        session_id = b.new_session()
        made = time.perf_counter()
        b.execute(session_id, "1")
        done = time.perf_counter()
        create.append((made - started) * 1000)
        first.append((done - started) * 1000)
        b.progress(f"  {i + 1}/{count}: first execution answered after {first[-1]:.0f} ms")
        b.delete_session(session_id)
        time.sleep(SETTLE_S)
    note = "no ready pool yet: every session is an on-demand restore of the snapshot template"
    return [
        Result(
            "new_session",
            "new session to first execution answered (POST /v1/sessions, then `1`)",
            samples=first,
            peers=("ipykernel_start",),
            goals=(
                Goal("pool empty: p50 <= 1.5 s", "p50", 1500.0, issue=6),
                Goal("restore to first execution: p50 <= 1.0 s", "p50", 1000.0, issue=4),
            ),
            notes=note,
        ),
        Result(
            "new_session_create",
            "POST /v1/sessions alone (VM restored, agent reseeded)",
            samples=create,
            notes=note,
        ),  # fmt: skip
    ]


def import_pandas(b: Bench) -> list[Result]:
    count = b.size(2, 5)
    round_trip, guest = [], []
    for _ in range(count):
        session_id = b.new_session()
        try:
            ms, record, _s, _r = b.execute(session_id, "import pandas")
        finally:
            b.delete_session(session_id)
        round_trip.append(ms)
        guest.append(float(record["duration_ms"] or 0))
        time.sleep(SETTLE_S)
    return [
        Result(
            "import_pandas",
            "`import pandas` as a new session's first statement (round trip)",
            samples=round_trip,
            notes="the template imported pandas before its snapshot; a cold import in the "
            "guest takes ~13 s under TCG (host.md)",
            extra={"guest_ms": guest},
        )
    ]


def worker_timings(log_path: Path, session_ids: set[str]) -> dict[str, dict[str, float]]:
    """{session id: {step: ms, ..., "total": ms, "restored": 0/1}} from a worker log."""
    found: dict[str, dict[str, float]] = {}
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        if m := _STEP.search(line):
            if m.group(1) in session_ids:
                found.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
        elif (m := _READY.search(line)) and m.group(1) in session_ids:
            entry = found.setdefault(m.group(1), {})
            entry["total"] = float(m.group(3))
            entry["restored"] = 1.0 if m.group(2) == "True" else 0.0
    return found


def restore(b: Bench) -> list[Result]:
    """The worker's timings of the sessions this run made (its log, `step=... ms=...`)."""
    log_path = Path(b.settings.logs_dir) / "worker.log"
    timings = worker_timings(log_path, set(b.created_sessions))
    restored = [t for t in timings.values() if t.get("restored") == 1.0 and "total" in t]
    if not restored:
        raise BenchError(
            f"no restore timings in {log_path} (run new_session first; pass --home for a "
            "Shoal you started yourself)"
        )
    to_ready = [t.get("restore", 0) + t.get("agent", 0) + t.get("reseed", 0) for t in restored]
    steps = {
        step: [t[step] for t in restored if step in t]
        for step in ("overlay", "copy", "restore", "agent", "reseed", "total")
    }
    cold = [t for t in timings.values() if t.get("restored") == 0.0]
    return [
        Result(
            "restore_to_ready",
            "snapshot restore to agent ready (worker: restore + agent hello + reseed)",
            samples=to_ready,
            notes=f"{len(cold)} of {len(timings)} sessions were cold boots" if cold else "",
            extra={"steps": {k: stats.summarize(v) for k, v in steps.items() if v}},
        ),
        Result(
            "restore_create_total",
            "worker's whole create of a restored VM (overlay, copy, restore, agent, reseed)",
            samples=steps["total"],
        ),
    ]


SCENARIOS = [
    Scenario("new_session", "(3) new session to first execution answered", new_session),
    Scenario("import_pandas", "(9) `import pandas` first in a new session", import_pandas),
    Scenario("restore", "(4) snapshot restore to agent ready (worker log)", restore),
]
