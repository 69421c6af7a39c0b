"""Keeps the benchmark harness from rotting: the quick mode's smallest scenario (warm `x += 1`
over /v1, a few calls) through `shoal bench` against the test instance, with its JSON report,
the where-the-time-goes breakdown and a plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shoal.bench.target import lift_tenant_limits
from tests.integration.conftest import REPO

pytestmark = pytest.mark.guest


def test_quick_warm_execution_scenario(stack, tmp_path):
    lift_tenant_limits(stack.env)  # as docs/performance.md tells an operator to
    out = tmp_path / "results"
    run = subprocess.run(
        [
            sys.executable, "-m", "shoal.ops.cli", "bench", "--url", stack.url, "--key", stack.key,
            "--home", str(stack.home), "--quick", "--only", "warm_v1", "--calls", "10",
            "--out", str(out),
        ],
        env=stack.env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "bench: [1/1] warm_v1" in run.stdout
    (report_path,) = out.glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["errors"] == {}
    assert report["machine"]["cpu_count"] >= 1
    assert report["accelerator"] in ("TCG", "KVM")
    rows = {r["name"]: r for r in report["results"]}
    warm = rows["warm_v1"]["summary"]
    assert warm["n"] == 10 and 0 < warm["p50"] <= warm["p99"]
    segments = rows["warm_v1"]["extra"]["breakdown"]
    assert {"http_in", "queue", "host_channel", "guest", "http_out"} <= set(segments)
    assert all(s["n"] == 10 for s in segments.values())
    assert rows["http_floor"]["summary"]["n"] > 0
    assert list(out.glob("*/warm_latency.png"))
