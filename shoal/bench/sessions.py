"""New sessions: POST /v1/sessions to the first execution answered, `import pandas` as a new
session's first statement, and the worker's own timings of each restore (from its log).
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

from shoal.bench import stats
from shoal.bench.core import Bench, BenchError, Goal, Result, Scenario
from shoal.bench.target import ONDEMAND_POOL

SETTLE_S = 1.0  # after a delete, let the worker destroy the VM before the next session
REFILL_TIMEOUT_S = 60

_STEP = re.compile(r"\bvm=(\S+) host=\S+ step=(\w+) ms=(\d+)")
_READY = re.compile(r"\bvm=(\S+) host=\S+ vm ready: domain=\S+ restored=(\w+) ms=(\d+)")
_CREATED = re.compile(r"session=(\S+) host=\S+ vm=\S+ created in (\d+) ms \((.+)\)")


def _ready_count(b: Bench, pool: str) -> int:
    response = b.request("GET", f"/v1/pools/{pool}", timeout=30)
    if response.status_code != 200:
        return 0
    return int(response.json().get("counts", {}).get("ready", 0))


def wait_refilled(b: Bench, pool: str, target: int, timeout_s: float = REFILL_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while _ready_count(b, pool) < target and time.monotonic() < deadline:
        time.sleep(0.5)


def _first_executions(b: Bench, pool: str, count: int, warm: bool) -> tuple[list, list]:
    first, create = [], []
    for i in range(count):
        if warm:
            wait_refilled(b, pool, 1)
        started = time.perf_counter()
        session_id = b.new_session(pool=pool)
        made = time.perf_counter()
        b.execute(session_id, "1")
        done = time.perf_counter()
        create.append((made - started) * 1000)
        first.append((done - started) * 1000)
        b.progress(
            f"  {pool} {i + 1}/{count}: session made in {create[-1]:.0f} ms, "
            f"first execution answered after {first[-1]:.0f} ms"
        )
        b.delete_session(session_id)
        time.sleep(SETTLE_S)
    return first, create


def new_session(b: Bench) -> list[Result]:
    """Pool warm (the `default` pool's ready VMs), then pool empty (on-demand restore)."""
    count = b.size(3, 10)
    targets = {name: p.get("ready_target", 0) for name, p in b.pools().items()}
    results = []
    if targets.get("default", 0) > 0:
        first, create = _first_executions(b, "default", count, warm=True)
        results += [
            Result(
                "new_session",
                "pool warm: new session to first execution answered (POST /v1/sessions, `1`)",
                samples=first,
                peers=("ipykernel_start",),
                goals=(Goal("pool warm: p50 <= 25 ms", "p50", 25.0, issue=6),),
            ),
            Result("new_session_create", "pool warm: POST /v1/sessions alone (a ready VM taken)",
                   samples=create, goals=(Goal("p50 <= 25 ms", "p50", 25.0, issue=6),)),
        ]  # fmt: skip
    else:
        b.progress("  the default pool keeps no ready VMs: no pool-warm figure")
    if ONDEMAND_POOL in targets and targets[ONDEMAND_POOL] == 0:
        first, create = _first_executions(b, ONDEMAND_POOL, count, warm=False)
        results += [
            Result(
                "new_session_ondemand",
                "pool empty: new session to first execution answered (on-demand restore)",
                samples=first,
                peers=("ipykernel_start",),
                goals=(
                    Goal("pool empty: p50 <= 1.5 s", "p50", 1500.0, issue=6),
                    Goal("restore to first execution: p50 <= 1.0 s", "p50", 1000.0, issue=4),
                ),
            ),
            Result("new_session_ondemand_create",
                   "pool empty: POST /v1/sessions alone (restore, agent hello, reseed)",
                   samples=create),
        ]  # fmt: skip
    else:
        b.progress(f"  no pool {ONDEMAND_POOL!r} with ready_target 0: no pool-empty figure")
    if not results:
        raise BenchError("no pool to measure")
    return results


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


def _stamp(line: str) -> float:
    """The local time of a Celery log line `[2026-11-26 07:40:08,400: ...`; 0 if none."""
    try:
        return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return 0.0


def worker_timings(log_path: Path, since: float) -> tuple[dict[str, dict[str, float]], dict]:
    """From a worker log, lines at or after `since`: ({vm id: {step: ms, "total": ms,
    "restored": 0/1}}, {session id: (ms, how)}) - VM creations and session acquisitions."""
    vms: dict[str, dict[str, float]] = {}
    acquired: dict[str, tuple[float, str]] = {}
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return vms, acquired
    for line in lines:
        if ("vm=" not in line and "session=" not in line) or _stamp(line) < since:
            continue
        if m := _STEP.search(line):
            vms.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
        elif m := _READY.search(line):
            entry = vms.setdefault(m.group(1), {})
            entry["total"] = float(m.group(3))
            entry["restored"] = 1.0 if m.group(2) == "True" else 0.0
        elif m := _CREATED.search(line):
            acquired[m.group(1)] = (float(m.group(2)), m.group(3))
    return vms, acquired


def restore(b: Bench) -> list[Result]:
    """The worker's own timings of every VM it restored during this run (its log)."""
    log_path = Path(b.settings.logs_dir) / "worker.log"
    vms, acquired = worker_timings(log_path, b.started_at - 1)
    restored = [t for t in vms.values() if t.get("restored") == 1.0 and "total" in t]
    if not restored:
        raise BenchError(
            f"no restore timings in {log_path} (pass --home for a Shoal you started yourself)"
        )
    # `restore_shared`: a clone started on its template's shared memory (docs/performance.md).
    to_ready = [
        t.get("restore", 0) + t.get("restore_shared", 0) + t.get("agent", 0) + t.get("reseed", 0)
        for t in restored
    ]
    steps = {
        step: [t[step] for t in restored if step in t]
        for step in ("overlay", "copy", "restore", "restore_shared", "agent", "reseed", "total")
    }
    shared = len(steps["restore_shared"])
    cold = [t for t in vms.values() if t.get("restored") == 0.0]
    from_pool = sum(1 for _ms, how in acquired.values() if "ready pool" in how)
    notes = f"{from_pool} of {len(acquired)} sessions took a ready VM; "
    notes += f"{shared} of {len(restored)} restores on shared template memory"
    if cold:
        notes += f"; {len(cold)} VMs were cold booted"
    return [
        Result(
            "restore_to_ready",
            "snapshot restore to agent ready (worker: restore + agent hello + reseed)",
            samples=to_ready,
            notes=notes,
            extra={"steps": {k: stats.summarize(v) for k, v in steps.items() if v}},
        ),
        Result(
            "restore_create_total",
            "worker's whole making of a restored VM (overlay, copy, restore, agent, reseed)",
            samples=steps["total"],
        ),
    ]


SCENARIOS = [
    Scenario(
        "new_session", "(3) new session to first execution: pool warm, pool empty", new_session
    ),
    Scenario("import_pandas", "(9) `import pandas` first in a new session", import_pandas),
    Scenario("restore", "(4) snapshot restore to agent ready (worker log)", restore),
]
