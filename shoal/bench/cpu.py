"""CPU time each part of the instance spends per call of a loop: the API processes, the worker,
Redis, the instance's QEMU processes and the benchmark itself. On a 2-core host these parts
share the cores, so CPU spent anywhere on the way lengthens the path."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any

from shoal.bench.density import cpu_seconds, qemu_pids
from shoal.ops import processes


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def parts(settings: Any) -> dict[str, list[int]]:
    """{part: pids} of the instance behind `settings` (what its run directory names)."""
    from workers.domain import name_prefix

    found: dict[str, list[int]] = {"bench": [os.getpid()]}
    for name in ("api", "worker", "redis"):
        pid = processes.running_pid(settings, name)
        if pid is not None:
            found[name] = [pid] + (_children(pid) if name == "api" else [])
    found["qemu"] = list(qemu_pids(name_prefix(settings)))
    return found


def per_call(settings: Any, calls: Callable[[], int]) -> dict[str, float]:
    """Run `calls` (it returns how many calls it made); CPU ms per call of each part."""
    pids = parts(settings)
    before = {part: [cpu_seconds(p) or 0.0 for p in ps] for part, ps in pids.items()}
    count = calls()
    result = {}
    for part, ps in pids.items():
        spent = sum((cpu_seconds(p) or 0.0) - b for p, b in zip(ps, before[part], strict=True))
        result[part] = round(spent * 1000 / max(count, 1), 2)
    return result
