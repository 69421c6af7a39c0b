"""The resident memory of the instance's own components (the API, the host worker) while
something runs: sampled in a thread, their peak growth over what they held before."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from shoal.bench.density import rss_mb
from shoal.ops import processes

SAMPLE_EVERY_S = 0.1


def group_pids(pgid: int) -> list[int]:
    """Every process in the process group `pgid` (a component and its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def total_rss_mb(pids: list[int]) -> float:
    return sum(rss_mb(pid) or 0.0 for pid in pids)


class PeakGrowth:
    """With-block: the peak RSS growth of each named component (`processes.start` names, each
    in its own process group) over the block, in MB; empty for a component not running here."""

    def __init__(self, settings: Any, names: tuple[str, ...] = ("api", "worker")):
        self.groups = {
            name: pid
            for name in names
            if (pid := processes.running_pid(settings, name)) is not None
        }
        self.pids: dict[str, list[int]] = {}  # found once: /proc is not walked while sampling
        self.before: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakGrowth:
        self.pids = {name: group_pids(pgid) for name, pgid in self.groups.items()}
        self.before = {name: total_rss_mb(pids) for name, pids in self.pids.items()}
        self.peak = dict(self.before)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            for name, pids in self.pids.items():
                self.peak[name] = max(self.peak[name], total_rss_mb(pids))

    def growth_mb(self) -> dict[str, float]:
        return {name: round(self.peak[name] - self.before[name], 1) for name in self.groups}
