"""`shoal bench`: pick the scenarios, get a target instance, run each with a progress line,
then write bench-results/<timestamp>.json (+ .md table and PNG plots) and print the table.

A scenario that fails is reported (and the exit status is 1) but does not stop the others.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

from shoal.bench import (
    batches,
    density,
    executions,
    files,
    forks,
    neighbours,
    peers,
    pools,
    report,
    sessions,
    sleeping,
    target,
    vms,
)
from shoal.bench.core import Bench, BenchError, BenchSkipped, Result, Scenario
from shoal.ops.stack import healthz_at
from shoal.settings import REPO_ROOT, Settings

# Run order: the peers first (on an idle machine, like the warm loops right after them); the
# worker-log `restore` scenario after the scenarios that make sessions.
SCENARIOS: list[Scenario] = [
    *peers.SCENARIOS,
    *executions.SCENARIOS[:2],
    *sessions.SCENARIOS,
    *pools.SCENARIOS,
    *vms.SCENARIOS,
    executions.SCENARIOS[2],
    *files.SCENARIOS,
    *sleeping.SCENARIOS,
    *forks.SCENARIOS,
    *batches.SCENARIOS,
    *neighbours.SCENARIOS,
    *density.SCENARIOS,
]


def _names(raw: str) -> set[str]:
    return {n.strip() for n in raw.split(",") if n.strip()}


def select(args) -> list[Scenario]:
    only, skip = _names(args.only), _names(args.skip)
    unknown = (only | skip) - {s.name for s in SCENARIOS}
    if unknown:
        raise BenchError(f"unknown scenarios {sorted(unknown)}; see `shoal bench --list`")
    chosen = []
    for s in SCENARIOS:
        if only:
            wanted = s.name in only
        else:
            wanted = (not s.opt_in or (s.name == "density" and args.density > 0)) and (
                s.in_quick or not args.quick
            )
            wanted = wanted and not (s.peer and args.no_peers)
        if wanted and s.name not in skip:
            chosen.append(s)
    return chosen


def progress(message: str) -> None:
    print(f"bench: {message}", flush=True)


def main(settings: Settings, args) -> int:
    if args.list:
        for s in SCENARIOS:
            flags = "peer" if s.peer else ("opt-in" if s.opt_in else "")
            flags += "" if s.in_quick else " full only"
            print(f"{s.name:16} {s.title}  {flags.strip()}")
        return 0
    try:
        chosen = select(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    began = time.monotonic()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    meta: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "scenarios": [s.name for s in chosen],
        "machine": machine(),
    }
    results: list[Result] = []
    errors: dict[str, str] = {}
    skipped: dict[str, str] = meta.setdefault("skipped", {})
    tgt = None
    bench = None
    try:
        tgt = (
            target.external(args.url, args.key, args.home, args.admin_key)
            if args.url
            else (target.start_private(progress))
        )
        health = target.wait_ready(tgt.url, tgt.admin_key, progress)
        bench = Bench(tgt.url, tgt.key, args.quick, tgt.settings, args, tgt.private)
        meta["target"] = {"url": tgt.url, "private": tgt.private,
                          "instance": tgt.settings.instance_id}  # fmt: skip
        meta["accelerator"] = accelerator(health)
        meta["templates_at_start"] = ready_templates(health)
        meta["versions"] = versions(tgt.settings)
        waited = pools.settle(bench)
        progress(f"ready pools filled and quiet after {waited:.0f} s")
        for i, scenario in enumerate(chosen, 1):
            progress(f"[{i}/{len(chosen)}] {scenario.name}: {scenario.title}")
            started = time.monotonic()
            try:
                produced = scenario.run(bench)
            except BenchSkipped as exc:
                skipped[scenario.name] = str(exc)
                progress(f"  skipped: {exc}")
                bench.cleanup()
                continue
            except Exception as exc:  # noqa: BLE001 - reported, the others still run
                errors[scenario.name] = f"{type(exc).__name__}: {exc}"
                progress(f"  FAILED: {errors[scenario.name].splitlines()[0][:200]}")
                if not isinstance(exc, BenchError):
                    traceback.print_exc()
                bench.cleanup()
                continue
            results.extend(produced)
            bench.results.update({r.name: r for r in produced})
            for r in produced:
                progress(f"  {r.name}: {_one_line(r)}")
            progress(f"  ({time.monotonic() - started:.1f} s)")
        meta["templates_at_end"] = ready_templates(healthz_at(tgt.url, tgt.admin_key)[1])
        if meta["templates_at_end"] != meta["templates_at_start"]:
            meta["warning"] = (
                "the snapshot template changed during the run (the guest image was rebuilt?): "
                "figures taken while it was rebuilt came from cold boots"
            )
            progress(f"WARNING: {meta['warning']}")
    except BenchError as exc:
        errors["setup"] = str(exc)
        progress(f"FAILED: {exc}")
    finally:
        if bench is not None:
            bench.cleanup()
        if tgt is not None and tgt.private:
            progress("stopping the private Shoal")
            said = tgt.stop(keep_home=args.keep_home or "setup" in errors)
            progress(said.splitlines()[-1] if said else "stopped")
    meta.setdefault("accelerator", "unknown")
    meta["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["duration_s"] = round(time.monotonic() - began, 1)
    meta["machine"]["loadavg_end"] = list(os.getloadavg())
    data = report.build(results, errors, meta)
    out = Path(args.out) if args.out else REPO_ROOT / "bench-results"
    json_path = out / f"{stamp}.json"
    report.write_json(data, json_path)
    (out / f"{stamp}.md").write_text(
        report.markdown_table(data) + "\n\n" + report.breakdown_markdown(data) + "\n"
    )
    pngs = [] if args.no_plots or not results else report.plots(data, out / stamp)
    print()
    print(report.text_table(data))
    breakdown = report.breakdown_markdown(data)
    if breakdown:
        print("\nWhere one warm execution's time goes (warm_v1):\n" + breakdown)
    print(f"\nload average at start {meta['machine']['loadavg_start']}, "
          f"at end {meta['machine']['loadavg_end']}; {meta['duration_s']} s in all")  # fmt: skip
    if meta.get("warning"):
        print(f"WARNING: {meta['warning']}")
    print(f"results: {json_path}")
    for png in pngs:
        print(f"plot:    {png}")
    return 1 if errors else 0


def _one_line(r: Result) -> str:
    s = r.summary()
    if "p50" in s:
        return f"n={s['n']} p50={s['p50']:.2f} p99={s['p99']:.2f} {r.unit}"
    return f"{s.get('value', 0):.2f} {r.unit}"


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        kib = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
        mem_gib = round(kib / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": mem_gib,
        "loadavg_start": list(os.getloadavg()),
    }


def accelerator(health: dict) -> str:
    kinds = {
        w.get("libvirt", {}).get("accel", {}).get("kind", "unknown")
        for w in health.get("workers", {}).values()
    }
    return ",".join(sorted(kinds)).upper() or "unknown"


def ready_templates(health: dict) -> dict[str, str]:
    """{template key: state} as the workers report them."""
    return {k: v.get("state", "") for k, v in sorted(target.templates_of(health).items())}


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def versions(settings: Settings) -> dict[str, str]:
    found: dict[str, str] = {"python": platform.python_version()}
    for package in ("shoal", "celery", "redis", "jupyter_client", "ipykernel",
                    "jupyter_kernel_gateway", "libvirt-python", "gunicorn", "flask"):  # fmt: skip
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    found["qemu"] = _first_line(["qemu-system-x86_64", "--version"])
    found["libvirtd"] = _first_line(["libvirtd", "--version"])
    try:
        from shoal import redis_conn

        found["redis_server"] = redis_conn.client(settings).info("server")["redis_version"]
    except (Exception, SystemExit):  # noqa: BLE001 - a version is nice to have
        pass
    commit = _first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO_ROOT), "status", "--porcelain"])
    found["git"] = commit + (" (with uncommitted changes)" if dirty else "")
    return found
