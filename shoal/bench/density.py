"""Density (opt-in, `--density N`): idle sessions added in steps up to N; at each step the
resident memory of every QEMU process (/proc), their total CPU over an idle window, the
warm-execution p50 of the first session and the /healthz latency (is the host still answering?).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from shoal.bench import stats
from shoal.bench.core import Bench, BenchError, Goal, Result, Scenario, timed_loop
from shoal.bench.target import DENSITY_POOL

SETTLE_S = 5.0  # after the last restore of a step, before the idle window
PROBE_CALLS = 50
# Idle sessions this machine should hold (docs/performance.md), judged when asked for as many.
HELD_GOALS = ((48, 4), (120, 14))
TICKS = os.sysconf("SC_CLK_TCK")


def qemu_pids(domain_prefix: str) -> dict[int, str]:
    """{pid: domain name} of running QEMU processes whose domain name starts with the prefix."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or b"qemu-system" not in argv[0]:
            continue
        for arg in argv:
            if arg.startswith(b"guest=" + domain_prefix.encode()):
                found[int(entry.name)] = arg.split(b",")[0][len(b"guest=") :].decode()
    return found


def _field_mb(path: str, name: str) -> float | None:
    """A `Name:   N kB` line of a /proc file, in MB."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mb(pid: int) -> float | None:
    return _field_mb(f"/proc/{pid}/status", "VmRSS")


def pss_mb(pid: int) -> float | None:
    """Proportional set size: pages shared with other clones (template memory) count split."""
    return _field_mb(f"/proc/{pid}/smaps_rollup", "Pss")


def available_mb() -> float:
    return _field_mb("/proc/meminfo", "MemAvailable") or 0.0


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def idle_cpu(pids: list[int], window_s: float) -> float:
    """Cores used by `pids` together over `window_s` (1.0 = one whole core)."""
    before = {p: cpu_seconds(p) for p in pids}
    time.sleep(window_s)
    used = 0.0
    for pid, start in before.items():
        end = cpu_seconds(pid)
        if start is not None and end is not None:
            used += end - start
    return used / window_s


def density_pool(b: Bench) -> str:
    """The private instance's uncapped pool; `default` on an instance given by URL."""
    return DENSITY_POOL if DENSITY_POOL in b.pools() else "default"


def steps_up_to(limit: int) -> list[int]:
    steps, n = [], 1
    while n < limit:
        steps.append(n)
        n *= 2
    return steps + [limit]


def density(b: Bench) -> list[Result]:
    limit = b.options.density
    if not limit:
        raise BenchError("pass --density N")
    window = b.options.density_window
    from workers.domain import name_prefix

    prefix = name_prefix(b.settings)
    pool = density_pool(b)
    sessions: list[str] = []
    curve: list[dict] = []
    stopped = ""
    time.sleep(SETTLE_S)
    available_before = available_mb()
    try:
        for target in steps_up_to(limit):
            while len(sessions) < target:
                try:
                    sessions.append(b.new_session(pool=pool))
                    b.execute(sessions[-1], "x = 0")
                except Exception as exc:  # noqa: BLE001 - the machine's limit, recorded
                    stopped = f"session {len(sessions) + 1} failed: {exc}"
                    break
            if not sessions:
                raise BenchError(f"no idle session could be made: {stopped}")
            time.sleep(SETTLE_S)
            pids = list(qemu_pids(prefix))
            cores = idle_cpu(pids, window)
            rss = [r for r in (rss_mb(p) for p in pids) if r is not None]
            pss = [r for r in (pss_mb(p) for p in pids) if r is not None]
            drop = (available_before - available_mb()) / len(sessions)
            health = timed_loop(5, 30, lambda _i: _health_ms(b))
            probe = timed_loop(PROBE_CALLS, 60, lambda _i: b.execute(sessions[0], "x += 1")[0])
            point = {
                "sessions": len(sessions),
                "qemu_processes": len(pids),
                "rss_mb": stats.summarize(rss),
                "rss_total_mb": round(sum(rss), 1),
                "pss_mb": stats.summarize(pss),
                "available_drop_per_session_mb": round(drop, 1),
                "idle_cpu_cores": round(cores, 4),
                "idle_cpu_per_vm_pct": round(100 * cores / max(len(pids), 1), 3),
                "warm_p50_ms": round(stats.percentile(probe, 50), 2),
                "healthz_p50_ms": round(stats.percentile(health, 50), 2),
            }
            curve.append(point)
            b.progress(
                f"  {len(sessions)} idle sessions: RSS p50 {point['rss_mb'].get('p50')} MB, "
                f"PSS p50 {point['pss_mb'].get('p50')} MB, host memory {drop:.0f} MB each, "
                f"idle CPU {100 * cores:.1f}% of a core in all, "
                f"warm p50 {point['warm_p50_ms']} ms"
            )
            if stopped:
                b.progress(f"  stopped: {stopped}")
                break
    finally:
        for session_id in sessions:
            b.delete_session(session_id)
    last = curve[-1] if curve else {}
    return [
        Result(
            "density_sessions",
            f"idle sessions held (asked for {limit}; ready-pool VMs not counted)",
            unit="sessions",
            value=float(last.get("sessions", 0)),
            goals=tuple(
                Goal(f">= {held} idle sessions", "value", held, at_least=True, issue=issue)
                for held, issue in HELD_GOALS
                if limit >= held
            ),
            notes=stopped,
            extra={"curve": curve, "window_s": window},
        ),
        Result(
            "density_warm_slowdown",
            "warm p50 of the first session at the largest step / at one session",
            unit="x",
            value=round(last.get("warm_p50_ms", 0.0) / max(curve[0]["warm_p50_ms"], 0.01), 2)
            if curve
            else 0.0,
            goals=(Goal("<= 1.5x", "value", 1.5, issue=14),),
        ),
        Result(
            "density_rss",
            "resident memory of one idle VM's QEMU process (at the largest step)",
            unit="MB",
            value=float(last.get("rss_mb", {}).get("p50", 0.0)),
            goals=(Goal("<= 200 MB", "value", 200.0, issue=4),),
        ),
        Result(
            "density_host_memory",
            "host memory per idle session: MemAvailable's drop / sessions (at the largest step)",
            unit="MB",
            value=float(last.get("available_drop_per_session_mb", 0.0)),
            goals=(Goal("<= 120 MB", "value", 120.0, issue=14),),
            notes=f"PSS p50 {last.get('pss_mb', {}).get('p50')} MB",
        ),
        Result(
            "density_idle_cpu",
            "CPU of one idle VM (all QEMU processes / count, over the window)",
            unit="% core",
            value=float(last.get("idle_cpu_per_vm_pct", 0.0)),
            goals=(Goal("< 1% of a core", "value", 1.0, issue=4),),
        ),
    ]


def _health_ms(b: Bench) -> float:
    started = time.perf_counter()
    b.request("GET", "/healthz", timeout=30)
    return (time.perf_counter() - started) * 1000


SCENARIOS = [
    Scenario("density", "(7) density: idle sessions until N", density, in_quick=False, opt_in=True)
]
