"""report.py keeps the rest of docs/reliability.md and replaces only its own section."""

from __future__ import annotations

import json
from pathlib import Path

from tests.chaos import report


def _row(scenario: str, **over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "scenario": scenario,
        "fault": "kill -9",
        "fault_s": 1.0,
        "spans": 3000,
        "expected_signals": 40,
        "detect_s": 0.25,
        "detected_by": "not-ready: /health/ready unreachable",
        "recover_s": 4.5,
        "peak_lag": 120,
        "lost_spans": 0,
        "duplicated_spans": 0,
        "lost_signals": 0,
        "duplicated_signals": 0,
        "unexpected_signals": 0,
        "ledger_mismatch": 0,
        "worker_restarts": 0,
        "total_s": 30.0,
        "full": False,
        "notes": [],
        "finished_at": "2026-11-25T05:00:00Z",
    }
    row.update(over)
    return row


def test_latest_result_per_scenario_in_scenario_order_and_other_sections_kept(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    lines = [
        _row("8. poison"),
        _row("2. broker restart", recover_s=9.0),
        _row("2. broker restart", recover_s=3.0),
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in lines))
    doc = tmp_path / "reliability.md"
    doc.write_text("# Reliability\n\nintro\n\n## Chaos suite results\n\nold table\n\n## After\n\nkept\n")
    assert report.main(["--results", str(results), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Reliability\n\nintro\n\n## Chaos suite results\n")
    assert "old table" not in text and text.endswith("## After\n\nkept\n")
    rows = [line for line in text.splitlines() if line.startswith(("| 2.", "| 8."))]
    assert [r.split(" | ")[0] for r in rows] == ["| 2. broker restart", "| 8. poison"]
    assert "| 3.00 |" in rows[0]  # the latest run of scenario 2
    # Run twice: still one section.
    assert report.main(["--results", str(results), "--doc", str(doc)]) == 0
    assert doc.read_text().count("## Chaos suite results") == 1


def test_missing_heading_is_appended(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(_row("1. kill")) + "\n")
    doc = tmp_path / "d.md"
    doc.write_text("# Design\n")
    assert report.main(["--results", str(results), "--doc", str(doc)]) == 0
    assert doc.read_text().startswith("# Design\n\n## Chaos suite results\n")
