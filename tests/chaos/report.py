"""Render the chaos results (JSON lines from tests/chaos/harness.py) into docs/reliability.md.

    .venv/bin/python -m tests.chaos.report [--results .dev/chaos/results.jsonl] [--doc docs/reliability.md]

``tests/chaos/results_notes.md`` (how the faults are made, findings) goes under the table.

The latest result of each scenario becomes one table row. Everything under the
``## Chaos suite results`` heading, up to the next ``## `` heading, is replaced;
the rest of the document is left as it is (the heading is appended if missing).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from tests.chaos.harness import RESULTS_FILE, ROOT

HEADING = "## Chaos suite results"

INTRO = """\
`tests/chaos/` (markers `chaos`, `slow`, `integration`) runs each scenario against real
worker processes (`betrace run`) on a real broker while a generated workload with a known
ground truth flows, injects a real fault, lets the pipeline recover and then checks, every
time: every span stored exactly once, every expected signal published exactly once, and the
ledger's per-rule counters equal to the signals published. `tests/chaos/harness.py` measures:

* **detect**: seconds from the fault to the first evidence the harness sees (sampling every
  0.25 s): `/health/ready` not 200 or not answering, the consumer-lag read failing, the worker
  exiting, a warning/error line in the worker's log, or a scenario's own signal (a dead-letter
  count > 0).
* **recover**: seconds from the end of the fault (process restarted, broker or server back,
  directory writable again) until the pipeline is drained: lag 0 on the input, spans, traces
  and pending-signals topics, spools empty, checked again after the idle timeout.
* **peak lag**: largest total lag of the worker group on those topics during the run.
* **lost / dup.**: spans and signals missing or present twice (ground truth vs. DuckDB files
  and the signals topic), and |ledger counter - signals| summed over tenant and rule.

CI runs faults of a few seconds; `BETRACE_CHAOS_FULL=1` gives the issue's 30 s. Regenerate
this section with `python -m tests.chaos.report` after a run.
"""


def latest(results: Path) -> list[dict[str, Any]]:
    """The last result of each scenario, in scenario order (the number they start with)."""
    by_name: dict[str, dict[str, Any]] = {}
    for line in results.read_text().splitlines():
        if line.strip():
            doc = json.loads(line)
            by_name[doc["scenario"]] = doc
    return sorted(by_name.values(), key=lambda d: (_number(d["scenario"]), d["scenario"]))


def _number(name: str) -> int:
    match = re.match(r"(\d+)", name)
    return int(match.group(1)) if match else 99


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | fault | spans | signals | detect (s) | detected by | recover (s) | peak lag "
        "| lost spans / signals | dup. spans / signals | ledger mismatch | worker restarts | run (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        by = (r.get("detected_by") or "-").replace("|", "/")[:90]
        lost = r["lost_signals"] + r.get("unexpected_signals", 0)
        lines.append(
            f"| {r['scenario']} | {r['fault'].replace('|', '/')} | {r['spans']:,} | {r['expected_signals']} "
            f"| {_secs(r['detect_s'])} | {by} | {_secs(r['recover_s'])} | {r['peak_lag']:,} "
            f"| {r['lost_spans']} / {lost} | {r['duplicated_spans']} / {r['duplicated_signals']} "
            f"| {r['ledger_mismatch']} | {r['worker_restarts']} | {r['total_s']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def render(rows: list[dict[str, Any]], extra: str = "") -> str:
    mode = (
        "30 s faults (BETRACE_CHAOS_FULL=1)"
        if rows and all(r.get("full") for r in rows)
        else "CI-length faults"
    )
    stamp = max((r.get("finished_at", "") for r in rows), default="")
    body = f"{HEADING}\n\n{INTRO}\nLast run: {stamp}, {mode}.\n\n{table(rows)}"
    return body + (f"\n{extra.strip()}\n" if extra.strip() else "")


def update(doc: Path, section: str) -> None:
    text = doc.read_text() if doc.exists() else ""
    start = text.find(HEADING)
    if start < 0:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    else:
        nxt = text.find("\n## ", start + len(HEADING))
        end = len(text) if nxt < 0 else nxt + 1
        text = text[:start] + section + ("\n" + text[end:] if nxt >= 0 else "")
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_FILE)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument(
        "--notes",
        type=Path,
        default=Path(__file__).with_name("results_notes.md"),
        help="Markdown appended under the table: how faults are made, findings (default: results_notes.md)",
    )
    args = parser.parse_args(argv)
    if not args.results.exists():
        print(
            f"error: no results at {args.results}; run 'pytest -m chaos tests/chaos' first", file=sys.stderr
        )
        return 1
    rows = latest(args.results)
    extra = args.notes.read_text() if args.notes and args.notes.exists() else ""
    update(args.doc, render(rows, extra))
    print(f"{len(rows)} scenario(s) written to {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
