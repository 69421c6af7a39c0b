"""The run's report: one dict (written as JSON), a text table for the terminal, the same table
in Markdown (for docs/performance.md) and PNG plots made with matplotlib."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from shoal.bench.core import Result
from shoal.bench.executions import FINER, GUEST_PHASES, SEGMENTS


def build(results: list[Result], errors: dict[str, str], meta: dict[str, Any]) -> dict:
    by_name = {r.name: r for r in results}
    rows = []
    for r in results:
        summary = r.summary()
        ratios = {}
        for peer in r.peers:
            mine, theirs = r.headline(), by_name[peer].headline() if peer in by_name else None
            if mine is not None and theirs:
                ratios[peer] = round(mine / theirs, 2)
        if ratios:
            summary["ratios"] = ratios
        goals = [{"text": g.text, "issue": g.issue, "met": g.met(summary)} for g in r.goals]
        rows.append(
            {
                "name": r.name,
                "title": r.title,
                "unit": r.unit,
                "summary": summary,
                "goals": goals,
                "notes": r.notes,
                "extra": r.extra,
                "samples": [round(s, 3) for s in r.samples],
            }
        )
    return {**meta, "results": rows, "errors": errors}


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _goal_text(goals: list[dict]) -> str:
    mark = {True: "met", False: "NOT met", None: "n/a"}
    return "; ".join(f"{g['text']}: {mark[g['met']]}" for g in goals)


def _ratio_text(summary: dict) -> str:
    return ", ".join(f"{v:.2f}x {k}" for k, v in summary.get("ratios", {}).items())


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for row in report["results"]:
        s = row["summary"]
        value = s.get("value")
        rows.append(
            [
                row["name"],
                _fmt(s.get("n")),
                _fmt(s.get("p50", value)),
                _fmt(s.get("p90")),
                _fmt(s.get("p99")),
                _fmt(s.get("mean")),
                row["unit"],
                _ratio_text(s),
                _goal_text(row["goals"]),
            ]
        )
    return rows


HEADER = ["scenario", "n", "p50/value", "p90", "p99", "mean", "unit", "vs peer", "goals"]


def text_table(report: dict) -> str:
    rows = [HEADER, *table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    lines = []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
    for name, error in report["errors"].items():
        lines.append(f"{name}: FAILED: {error.splitlines()[0][:160]}")
    for name, why in report.get("skipped", {}).items():
        lines.append(f"{name}: skipped: {why}")
    return "\n".join(lines)


def markdown_table(report: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in table_rows(report):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(lines)


def breakdown_markdown(report: dict) -> str:
    warm = next((r for r in report["results"] if r["name"] == "warm_v1"), None)
    if not warm or "breakdown" not in warm["extra"]:
        return ""
    parts = warm["extra"]["breakdown"]
    total = sum(parts[name]["p50"] for name, _ in SEGMENTS)
    lines = ["| segment | p50 ms | p90 ms | share of p50 sum | what |", "|---|---|---|---|---|"]
    for name, what in SEGMENTS:
        p = parts[name]
        share = 100 * p["p50"] / total if total else 0
        lines.append(f"| {name} | {_fmt(p['p50'])} | {_fmt(p['p90'])} | {share:.0f}% | {what} |")
    lines.append(f"| sum of p50s | {_fmt(total)} | | | (warm_v1 p50: "
                 f"{_fmt(warm['summary'].get('p50'))} ms) |")  # fmt: skip
    for name, what in FINER + GUEST_PHASES:
        if name in parts:
            p = parts[name]
            lines.append(f"| ({name}) | {_fmt(p['p50'])} | {_fmt(p['p90'])} | | {what} |")
    cpu = warm["extra"].get("cpu_ms_per_call")
    if cpu:
        spent = ", ".join(f"{part} {ms:g}" for part, ms in cpu.items())
        lines.append(f"\nCPU per call (ms, /proc of each part over the loop): {spent}")
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")


# --- plots ----------------------------------------------------------------------------------------
WARM = ("warm_v1", "warm_dynamic", "agent_direct", "http_floor", "ipykernel", "celery_noop",
        "kernel_gateway")  # fmt: skip
STARTS = ("new_session_create", "new_session", "new_session_ondemand_create",
          "new_session_ondemand", "import_pandas", "restore_to_ready", "cold_boot",
          "ipykernel_start")  # fmt: skip


def plots(report: dict, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    by_name = {r["name"]: r for r in report["results"]}
    made = []
    subtitle = (
        f"{report['machine']['cpu_count']} cores, {report['accelerator']}, "
        f"{'quick' if report['quick'] else 'full'} run {report['started_at'][:16]}"
    )

    warm = [by_name[n] for n in WARM if n in by_name and by_name[n]["samples"]]
    if warm:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for row in warm:
            xs = sorted(row["samples"])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(
                xs, ys, where="post", label=f"{row['name']} (p50 {_fmt(row['summary']['p50'])})"
            )
        ax.set_xscale("log")
        ax.set_xlabel("round trip, ms (log)")
        ax.set_ylabel("fraction of calls")
        ax.set_title(f"Warm `x += 1`: Shoal and its peers\n{subtitle}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        made.append(_save(fig, directory / "warm_latency.png"))

    starts = [by_name[n] for n in STARTS if n in by_name and by_name[n]["samples"]]
    if starts:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, row in enumerate(starts):
            seconds = [s / 1000 for s in row["samples"]]
            ax.scatter([i] * len(seconds), seconds, alpha=0.7)
            ax.hlines(row["summary"]["p50"] / 1000, i - 0.3, i + 0.3, color="black")
        ax.set_xticks(range(len(starts)), [r["name"] for r in starts], rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log); bar = p50")
        ax.set_title(f"Starting a session or a kernel\n{subtitle}", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        made.append(_save(fig, directory / "session_start.png"))

    rates = [r for r in report["results"] if r["name"].startswith("throughput_")]
    if rates:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [r["name"].split("_", 1)[1] for r in rates]
        ax.bar(labels, [r["summary"]["value"] for r in rates], color="tab:blue")
        ax.axhline(300, color="tab:red", linestyle="--", label="goal at 16 sessions: 300/s")
        ax.set_xlabel("concurrent sessions (one client thread each)")
        ax.set_ylabel("executions/s")
        ax.set_title(f"Throughput of trivial executions\n{subtitle}", fontsize=10)
        ax.legend(fontsize=8)
        made.append(_save(fig, directory / "throughput.png"))

    warm_v1 = by_name.get("warm_v1")
    if warm_v1 and "breakdown" in warm_v1["extra"]:
        parts = warm_v1["extra"]["breakdown"]
        fig, ax = plt.subplots(figsize=(8, 2.2))
        left = 0.0
        for name, _what in SEGMENTS:
            width = parts[name]["p50"]
            ax.barh([0], [width], left=left, label=f"{name} {_fmt(width)} ms")
            left += width
        ax.set_yticks([])
        ax.set_xlabel("ms (p50 of each segment)")
        ax.set_title(f"Where one warm execution's time goes\n{subtitle}", fontsize=10)
        ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.45))
        made.append(_save(fig, directory / "breakdown.png"))

    density = by_name.get("density_sessions")
    if density and density["extra"].get("curve"):
        curve = density["extra"]["curve"]
        xs = [p["sessions"] for p in curve]
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
        axes[0].plot(xs, [p["rss_mb"].get("p50", 0) for p in curve], marker="o")
        axes[0].axhline(200, color="tab:red", linestyle="--")
        axes[0].set_title("RSS per VM, MB (p50)", fontsize=9)
        axes[1].plot(xs, [p["idle_cpu_per_vm_pct"] for p in curve], marker="o")
        axes[1].axhline(1.0, color="tab:red", linestyle="--")
        axes[1].set_title("idle CPU per VM, % of a core", fontsize=9)
        axes[2].plot(xs, [p["warm_p50_ms"] for p in curve], marker="o")
        axes[2].set_title("warm execution p50, ms", fontsize=9)
        for ax in axes:
            ax.set_xlabel("idle sessions")
            ax.grid(True, alpha=0.3)
        fig.suptitle(f"Density\n{subtitle}", fontsize=10)
        made.append(_save(fig, directory / "density.png"))
    return made


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
