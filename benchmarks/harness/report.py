"""Printing, the JSON result and the PNG plot of a load-test run.

matplotlib is a development dependency only: it is imported when the plot is
drawn, and a missing matplotlib skips the plot with a message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MB = 1024 * 1024


def compact_table(samples: list[dict[str, Any]], workers: list[str], max_rows: int = 24) -> str:
    """One line per sampled second (thinned to ``max_rows``): rates, lag, latency, RSS per worker."""
    if not samples:
        return "(no samples)"
    step = max(1, len(samples) // max_rows)
    rows = samples[::step]
    if rows[-1] is not samples[-1]:
        rows.append(samples[-1])
    head = f"{'t s':>6} {'phase':>7} {'prod/s':>9} {'cons/s':>9} {'lag':>9} {'p99 ms':>7}"
    head += "".join(f" {w[:10]:>10}" for w in workers)
    lines = [head + "   (RSS MiB / CPU %)"]
    for s in rows:
        p99 = s.get("latency_p99_ms")
        line = (
            f"{s['t']:6.0f} {s['phase']:>7} {s['produce_rate']:9,.0f} {s['consume_rate']:9,.0f} "
            f"{s['lag_total'] if s['lag_total'] is not None else '-':>9} "
            f"{f'{p99:.0f}' if p99 is not None else '-':>7}"
        )
        for w in workers:
            proc = s["workers"].get(w) or {}
            rss, cpu = proc.get("rss"), proc.get("cpu_pct")
            cell = f"{rss / MB:.0f}/{cpu:.0f}" if rss is not None and cpu is not None else "-"
            line += f" {cell:>10}"
        lines.append(line)
    return "\n".join(lines)


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")


def plot(path: Path, result: dict[str, Any]) -> str | None:
    """Draw throughput, lag, RSS per worker and latency over time; return why not, if skipped."""
    try:
        import matplotlib as mpl  # noqa: PLC0415 - development dependency, only needed here

        mpl.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[dev]'); no plot was drawn"
    samples = result["samples"]
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    ax = axes[0]
    # Commits and sink flushes arrive in bursts: a 5-second moving average reads better.
    ax.plot(t, _smooth([s["produce_rate"] for s in samples]), label="produced spans/s")
    ax.plot(
        t, _smooth([s["consume_rate"] for s in samples]), label="consumed spans/s (committed input, 5 s avg)"
    )
    ax.plot(
        t,
        _smooth([s["store_rate"] for s in samples]),
        label="stored spans/s (span store rows, 5 s avg)",
        alpha=0.7,
    )
    ax.axhline(result["config"]["rate"], color="grey", linestyle=":", label="target rate")
    ax.set_ylabel("spans/s")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(
        f"BeTrace load test {result['run_id']}: {result['config']['workers']} worker(s)"
        f"{' + split ingest' if result['config']['split_ingest'] else ''}, "
        f"{result['config']['tenants']} tenants x {result['config']['rules_per_tenant']} rules"
    )
    ax = axes[1]
    groups = sorted({g for s in samples for g in s["lag"]})
    for group in groups:
        ax.plot(t, [s["lag"].get(group) for s in samples], label=f"lag {group}")
    ax.set_ylabel("records")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[2]
    for name in result["worker_names"]:
        ax.plot(t, [((s["workers"].get(name) or {}).get("rss") or 0) / MB for s in samples], label=name)
    ax.set_ylabel("RSS MiB")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[3]
    ax.plot(t, [s.get("latency_p50_ms") for s in samples], label="produce-to-signal p50")
    ax.plot(t, [s.get("latency_p99_ms") for s in samples], label="produce-to-signal p99")
    ax.plot(t, [s.get("evaluate_p99_ms") for s in samples], label="rule evaluation p99 per batch")
    ax.set_ylabel("ms")
    ax.set_xlabel("seconds since the producers started")
    ax.legend(loc="upper left", fontsize=8)
    end = result["config"]["duration_s"]
    for ax in axes:
        ax.axvline(end, color="red", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
