"""The buffered recorder against real DuckDB files (and a real second process holding the file)."""

from __future__ import annotations

import datetime as dt
import itertools
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from betrace.audit.events import AuditEventType, EventRef, NullAuditRecorder, derived_event_id
from betrace.audit.recorder import DuckDBAuditRecorder
from betrace.audit.store import AuditStore, EventFilter
from betrace.errors import BetraceError
from betrace.metrics import InMemoryHooks

T = AuditEventType


def _rows(path: Path) -> list[tuple[str, str | None, int]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(
            "SELECT event_id, parent_event_id, recorded_at FROM audit_events ORDER BY recorded_at"
        ).fetchall()
    finally:
        con.close()


def test_record_returns_at_once_and_close_writes_parents_before_children(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    hooks = InMemoryHooks()
    rec = DuckDBAuditRecorder(path, flush_events=10_000, flush_interval_s=60, hooks=hooks)
    ref = rec.record(T.WORKER_STARTED, actor="w", subject="worker")
    chain = [ref]
    for i in range(50):  # one batch, 51 levels deep: DuckDB checks the FK per statement
        chain.append(rec.record(T.EVALUATION_BATCH, actor="w", subject=f"b{i}", parent=chain[-1], tenant="t"))
    assert not path.exists() or rec.buffered == 51  # nothing written yet: record() does no I/O
    rec.close()
    rows = {r[0]: r[1] for r in _rows(path)}
    assert len(rows) == 51
    for parent, child in itertools.pairwise(chain):
        assert rows[child.event_id] == parent.event_id
    assert hooks.total("betrace_audit_events_total", type="evaluation.batch") == 50


def test_flushes_by_count_and_by_interval(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    rec = DuckDBAuditRecorder(path, flush_events=5, flush_interval_s=0.2)
    for i in range(5):
        rec.record(T.WORKER_STARTED, actor="w", subject=f"s{i}")
    deadline = time.monotonic() + 5
    while rec.written < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rec.written == 5
    rec.record(T.WORKER_STARTED, actor="w", subject="late")  # below flush_events: the timer writes it
    deadline = time.monotonic() + 5
    while rec.written < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rec.written == 6
    rec.close()


def test_derived_ids_are_written_once_across_recorders_and_days(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    event_id = derived_event_id("signal.emitted", "abc")
    for day in (dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 1, 2, tzinfo=dt.UTC)):
        with DuckDBAuditRecorder(path) as rec:  # e.g. a replay after a restart, on another day
            rec.record(T.SIGNAL_EMITTED, actor="w", subject="s", event_id=event_id, at=day)
            rec.record(T.SIGNAL_EMITTED, actor="w", subject="s", event_id=event_id, at=day)
    assert [r[0] for r in _rows(path)] == [event_id]


def test_a_parent_that_was_never_written_is_detached_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    hooks = InMemoryHooks()
    lost = EventRef.new()  # e.g. recorded by a process killed before its flush
    with DuckDBAuditRecorder(path, hooks=hooks) as rec:
        ok = rec.record(T.WORKER_STARTED, actor="w", subject="ok")
        orphan = rec.record(T.SIGNAL_EMITTED, actor="w", subject="s", parent=lost)
        rec.record(T.WORKER_STOPPED, actor="w", subject="ok", parent=ok)
    store = AuditStore(path)
    doc = store.get(orphan.event_id)
    assert doc is not None
    assert doc["parent_event_id"] is None
    assert doc["payload"]["detached_parent"] == lost.to_dict()
    assert hooks.total("betrace_audit_dropped_total", reason="detached_parent") == 1
    assert store.count() == 3


def test_recorded_at_grows_across_processes_in_commit_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    script = (
        "import sys; from pathlib import Path\n"
        "from betrace.audit.recorder import DuckDBAuditRecorder\n"
        "from betrace.audit.events import AuditEventType as T\n"
        "with DuckDBAuditRecorder(Path(sys.argv[1]), flush_events=7) as r:\n"
        "    for i in range(200): r.record(T.WORKER_STARTED, actor=sys.argv[2], subject=str(i))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), f"p{n}"]) for n in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    rows = _rows(path)
    assert len(rows) == 600
    stamps = [r[2] for r in rows]
    assert len(set(stamps)) == 600  # one process writes at a time, each after the last commit


def test_file_held_by_another_process_delays_but_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    with DuckDBAuditRecorder(path) as rec:
        rec.record(T.WORKER_STARTED, actor="w", subject="first")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
            "time.sleep(2.5); c.close()",
            str(path),
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    rec = DuckDBAuditRecorder(path, lock_timeout_s=0.3, flush_interval_s=0.2)
    rec.record(T.WORKER_STARTED, actor="w", subject="second")
    with pytest.raises(BetraceError, match="locked"):
        rec.flush()  # the explicit flush reports the hold; the event stays buffered
    assert rec.buffered == 1
    holder.wait(10)
    holder.stdout.close()
    deadline = time.monotonic() + 10
    while rec.buffered and time.monotonic() < deadline:  # the flush thread retries
        time.sleep(0.05)
    rec.close()
    assert AuditStore(path).count() == 2


def test_buffer_is_bounded(tmp_path: Path) -> None:
    hooks = InMemoryHooks()
    rec = DuckDBAuditRecorder(
        tmp_path / "audit.duckdb", flush_events=100_000, flush_interval_s=60, max_buffered=100, hooks=hooks
    )
    refs = [rec.record(T.WORKER_STARTED, actor="w", subject=str(i)) for i in range(105)]
    assert len({r.event_id for r in refs}) == 105  # callers always get a reference
    assert rec.buffered == 100
    assert hooks.total("betrace_audit_dropped_total", reason="buffer_full") == 5
    rec.close()
    assert AuditStore(tmp_path / "audit.duckdb").count() == 100


def test_list_filters_and_keyset_pages(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    with DuckDBAuditRecorder(path) as rec:
        for i in range(25):
            rec.record(T.SIGNAL_EMITTED, actor="w", subject=f"s{i}", tenant="acme" if i % 2 else "beta")
        rec.record(T.WORKER_STARTED, actor="op", subject="worker")
    store = AuditStore(path)
    seen: list[str] = []
    after = None
    while True:
        page = store.list_events(EventFilter(tenant="acme"), limit=4, after=after)
        seen += [d["subject"] for d in page.items]
        if page.next_key is None:
            break
        after = page.next_key
    assert seen == [f"s{i}" for i in range(1, 25, 2)]
    system = store.list_events(EventFilter(system_only=True), limit=10)
    assert [d["event_type"] for d in system.items] == ["worker.started"]
    typed = store.list_events(EventFilter(event_types=("worker.started",), actor="op"), limit=10)
    assert len(typed.items) == 1


def test_chain_walks_up_and_down_within_bounds(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    with DuckDBAuditRecorder(path) as rec:
        root = rec.record(T.WORKER_STARTED, actor="w", subject="root")
        mid = rec.record(T.EVALUATION_BATCH, actor="w", subject="mid", parent=root)
        kids = [rec.record(T.SIGNAL_EMITTED, actor="w", subject=f"k{i}", parent=mid) for i in range(3)]
        rec.record(T.EVALUATION_BATCH, actor="w", subject="sibling", parent=root)
    store = AuditStore(path)
    chain = store.chain(mid.event_id)
    assert chain is not None
    assert [d["event_id"] for d in chain.ancestors] == [root.event_id]
    assert sorted(d["event_id"] for d in chain.descendants) == sorted(k.event_id for k in kids)
    assert not chain.truncated
    full = store.chain(root.event_id, max_depth=1)
    assert full is not None
    assert {d["subject"] for d in full.descendants} == {"mid", "sibling"}
    assert full.truncated  # the signals are one level further down
    capped = store.chain(root.event_id, max_events=2)
    assert capped is not None
    assert len(capped.descendants) == 2
    assert capped.truncated
    assert store.chain("unknown") is None
    page = store.children(mid.event_id, limit=2)
    assert len(page.items) == 2
    assert page.next_key is not None
    rest = store.children(mid.event_id, limit=2, after=page.next_key)
    assert len(rest.items) == 1


def test_null_recorder_hands_out_references() -> None:
    null = NullAuditRecorder()
    ref = null.record(T.WORKER_STARTED, actor="w", subject="s", event_id="fixed")
    assert ref.event_id == "fixed"
    assert null.flush() == 0
    null.close()


def test_a_process_that_forgets_close_still_writes_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    script = (
        "import sys; from pathlib import Path\n"
        "from betrace.audit.recorder import DuckDBAuditRecorder\n"
        "from betrace.audit.events import AuditEventType as T\n"
        "r = DuckDBAuditRecorder(Path(sys.argv[1]), flush_interval_s=3600)\n"
        "r.record(T.INGESTION_RUN_STARTED, actor='cli', subject='import')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
    assert AuditStore(path).count() == 1


def test_reads_and_writes_in_one_process_take_turns(tmp_path: Path) -> None:
    """The worker's API reads the file the worker's recorder writes: DuckDB would refuse the
    read-only open while the same process holds a read-write one, instead of waiting."""
    path = tmp_path / "audit.duckdb"
    rec = DuckDBAuditRecorder(path, flush_events=5, flush_interval_s=0.01)
    rec.record(T.WORKER_STARTED, actor="w", subject="first")
    rec.flush()
    store = AuditStore(path)
    counts = []
    for i in range(300):
        rec.record(T.EVALUATION_BATCH, actor="w", subject=str(i))
        counts.append(store.count())
    rec.close()
    assert counts == sorted(counts)
    assert store.count() == 301
