"""Summaries of samples: n, percentiles, mean. Pure functions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summarize(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    n = len(samples)
    mean = sum(samples) / n
    return {
        "n": n,
        "p50": round(percentile(samples, 50), 3),
        "p90": round(percentile(samples, 90), 3),
        "p99": round(percentile(samples, 99), 3),
        "mean": round(mean, 3),
        "min": round(min(samples), 3),
        "max": round(max(samples), 3),
    }
