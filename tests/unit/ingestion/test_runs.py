"""Ingestion runs in a real runs.duckdb, with their events in the real DuckDB audit store."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from betrace.audit import AuditEventType
from betrace.audit.store import AuditStore, recorder_for
from betrace.cli.main import app
from betrace.config import load_settings, settings_env
from betrace.ingestion.runs import IngestionRun, RunStore, recorded_run, runs_path


def test_run_lifecycle_row_and_audit_chain(tmp_path: Path) -> None:
    cfg = load_settings(data_dir=tmp_path)
    audit = recorder_for(cfg)
    run = IngestionRun(tmp_path, "import", "/data/x.jsonl", checkpoint_s=1.0, audit=audit, actor="test")
    run.start()
    assert RunStore(tmp_path).get(run.run_id)["state"] == "running"  # type: ignore[index]
    run.counts.messages, run.counts.spans = 3, 30
    run.checkpoint()
    run.checkpoint()  # nothing new: no second batch event
    run.counts.messages, run.counts.spans = 5, 50
    run.counts.fail("malformed_value", "line 4")
    run.checkpoint()
    run.finish()
    audit.close()

    row = RunStore(tmp_path).get(run.run_id)
    assert row is not None
    assert (row["state"], row["messages"], row["spans"], row["failures"]) == ("finished", 5, 50, 1)
    assert row["failure_reasons"] == {"malformed_value": 1}
    assert row["failure_samples"] == ["line 4: malformed_value"]
    assert row["stored"] is None and row["duplicates"] is None
    assert row["finished_at"] is not None and row["started_at"] <= row["finished_at"]

    assert run.started is not None
    chain = AuditStore.from_settings(cfg).chain(run.started.event_id)
    assert chain is not None
    assert chain.event["event_type"] == AuditEventType.INGESTION_RUN_STARTED
    children = [(d["event_type"], d["payload"]) for d in chain.descendants]
    batches = [p for t, p in children if t == AuditEventType.INGESTION_BATCH]
    assert [(b["messages"], b["spans"]) for b in batches] == [(3, 30), (2, 20)]
    finished = [p for t, p in children if t == AuditEventType.INGESTION_RUN_FINISHED]
    assert len(finished) == 1 and finished[0]["spans"] == 50 and finished[0]["state"] == "finished"


def test_recorded_run_marks_failures_and_interrupts(tmp_path: Path) -> None:
    cfg = load_settings(data_dir=tmp_path)
    with pytest.raises(RuntimeError), recorded_run(cfg, "produce", "topic-a", actor="test"):
        raise RuntimeError("broker went away")
    with pytest.raises(KeyboardInterrupt), recorded_run(cfg, "produce", "topic-a", actor="test"):
        raise KeyboardInterrupt
    with recorded_run(cfg, "produce", "topic-a", actor="test") as ok:
        ok.counts.spans = 7
    store = RunStore(tmp_path)
    assert [r["state"] for r in store.list()] == ["finished", "interrupted", "failed"]
    failed = store.list(state="failed")[0]
    assert failed["failure_reasons"] == {"run_failed": 1}
    assert "broker went away" in failed["failure_samples"][0]
    assert store.list(kind="produce", state="finished")[0]["spans"] == 7


def test_paging_newest_first_without_gaps(tmp_path: Path) -> None:
    ids = []
    for i in range(7):
        run = IngestionRun(tmp_path, "worker", f"w{i}")
        run.start()
        ids.append(run.run_id)
    store = RunStore(tmp_path)
    seen, after = [], None
    while True:
        page = store.list(limit=3, after=after)
        seen += [r["run_id"] for r in page]
        if len(page) < 3:
            break
        after = (page[-1]["started_ns"], page[-1]["run_id"])
    assert seen == sorted(ids, key=lambda i: (store.get(i)["started_ns"], i), reverse=True)  # type: ignore[index]


def test_a_silent_running_row_is_stale(tmp_path: Path) -> None:
    run = IngestionRun(tmp_path, "worker", "w", checkpoint_s=0.5)
    run.start()
    with duckdb.connect(str(runs_path(tmp_path))) as con:
        old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
        con.execute("UPDATE ingestion_runs SET updated_at = ?", [old])
    store = RunStore(tmp_path)
    assert store.get(run.run_id)["state"] == "stale"  # type: ignore[index]
    assert [r["run_id"] for r in store.list(state="stale")] == [run.run_id]
    assert store.list(state="running") == []


def _write_runs(data_dir: str, n: int) -> None:
    for i in range(n):
        run = IngestionRun(Path(data_dir), "produce", f"p{i}")
        run.start()
        run.counts.spans = i
        run.finish()


def test_processes_share_the_file_without_holding_it(tmp_path: Path) -> None:
    """Two real processes write runs.duckdb at once; no write is lost."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_runs, args=(str(tmp_path), 6)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = RunStore(tmp_path).list(limit=100)
    assert len(rows) == 12 and {r["state"] for r in rows} == {"finished"}


def test_finish_while_a_thread_checkpoints_still_finishes(tmp_path: Path) -> None:
    """A worker cancelled mid-checkpoint finishes on the loop while the executor thread saves."""
    for attempt in range(20):
        run = IngestionRun(tmp_path, "worker", f"w{attempt}")
        run.start()
        run.counts.spans = 10
        threads = [threading.Thread(target=run.checkpoint) for _ in range(3)]
        for t in threads:
            t.start()
        run.counts.spans = 11
        run.finish()
        for t in threads:
            t.join()
    rows = RunStore(tmp_path).list(limit=100)
    assert len(rows) == 20
    assert {(r["state"], r["spans"]) for r in rows} == {("finished", 11)}


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown run kind"):
        IngestionRun(tmp_path, "bogus", "x")


def test_runs_cli_lists_shows_and_refuses_bad_options(tmp_path: Path) -> None:
    run = IngestionRun(tmp_path, "import", "/x.jsonl")
    run.start()
    run.counts.fail("invalid_value", "line 3")
    run.finish()
    env = settings_env(load_settings(data_dir=tmp_path))
    runner = CliRunner()
    listed = runner.invoke(app, ["runs", "list"], env=env)
    assert listed.exit_code == 0 and run.run_id in listed.output
    shown = runner.invoke(app, ["runs", "show", run.run_id], env=env)
    assert shown.exit_code == 0 and "line 3: invalid_value" in shown.output
    for args, text in (
        (["runs", "show", "nope"], "no ingestion run"),
        (["runs", "list", "--state", "done"], "--state must be one of"),
        (["runs", "list", "--kind", "x"], "--kind must be one of"),
    ):
        bad = runner.invoke(app, args, env=env)
        assert bad.exit_code == 1 and "error:" in bad.output and text in bad.output, bad.output
