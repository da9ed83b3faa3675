"""``betrace audit backfill``: legacy rows, a kill -9 in the middle, a resumed run, validation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from betrace.audit.backfill import backfill, legacy_count, validate
from betrace.audit.schema import ensure_schema


def make_legacy(path: Path, n: int, *, dangling: int = 0) -> None:
    """Rows as an older BeTrace wrote them: parents named by id only (parent_event_date NULL)."""
    con = duckdb.connect(str(path))
    ensure_schema(con)
    con.execute(
        "INSERT INTO audit_events SELECT 'e' || i, DATE '2026-01-01' + (i // 5000)::INT, "
        "CASE WHEN i % 3 = 0 THEN NULL ELSE 'e' || (i - 1) END, NULL, "
        "'evaluation.batch', 'w', 'acme', 's' || i, 'ok', NULL, i, i FROM range(?) t(i)",
        [n],
    )
    if dangling:
        con.execute(
            "INSERT INTO audit_events SELECT 'd' || i, DATE '2026-01-01', 'gone' || i, NULL, "
            "'signal.emitted', 'w', 'acme', 's', 'ok', NULL, ? + i, ? + i FROM range(?) t(i)",
            [n, n, dangling],
        )
    con.close()


def _env(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}
    env.update({"BETRACE_DATA_DIR": str(data), "BETRACE_LOG_LEVEL": "INFO"})
    return env


def test_backfill_survives_kill_9_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = data / "audit.duckdb"
    make_legacy(path, 30_000)  # 20,000 legacy rows, chains of 3: two waves
    assert legacy_count(path) == 20_000
    log = tmp_path / "backfill.log"
    cmd = [sys.executable, "-m", "betrace", "audit", "backfill", "--batch-size", "500", "--pause", "0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=_env(data), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while "10000 rows filled" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # a crash in the middle of the run
    finally:
        proc.wait(10)
    left = legacy_count(path)
    assert 0 < left <= 10_000, left  # the committed batches stay committed
    assert validate(path).fk_violations == 0

    done = subprocess.run(cmd[:-2], env=_env(data), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{left:,} legacy row(s)" in done.stdout + done.stderr
    assert "ok: every parent reference is complete" in done.stdout + done.stderr
    report = validate(path)
    assert (report.legacy_remaining, report.fk_violations, report.rows) == (0, 0, 30_000)
    # Every filled date is the parent's real date, now enforced by the foreign key.
    con = duckdb.connect(str(path))
    wrong = con.execute(
        "SELECT count(*) FROM audit_events c JOIN audit_events p ON p.event_id = c.parent_event_id "
        "WHERE c.parent_event_date <> p.event_date"
    ).fetchall()
    assert wrong == [(0,)]
    parent = con.execute("SELECT parent_event_id FROM audit_events WHERE event_id = 'e2'").fetchall()[0][0]
    try:
        con.execute("DELETE FROM audit_events WHERE event_id = ?", [parent])
        raise AssertionError("deleting a parent must be refused")
    except duckdb.ConstraintException:
        pass
    con.close()


def test_dangling_references_are_reported_and_fail_validation(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    make_legacy(path, 3_000, dangling=7)
    progress: list[int] = []
    result = backfill(path, batch_size=400, on_progress=lambda done, _n: progress.append(done))
    assert result.filled == 2_000
    assert progress == sorted(progress)
    assert progress[-1] == 2_000
    report = validate(path)
    assert (report.legacy_remaining, report.dangling, report.fk_violations) == (7, 7, 0)
    assert not report.ok
    assert report.samples[0].startswith("d0 -> gone0")
    assert backfill(path).filled == 0  # nothing left that can be filled: a rerun is a no-op
