"""Two downstream workers in one group: tenant ownership and a rebalance mid-stream (real broker).

A second worker joins while traces are open and windows are in flight, then
the first leaves with SIGTERM; both times partitions (and with them tenants)
move. Every span must be stored once, every expected signal published once,
the ledger counters must equal the signals, and no tenant file may ever have
two writers: each file's ``_writer_sessions`` journal (written under DuckDB's
own single-writer lock) must show disjoint writer sessions.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from pathlib import Path

import duckdb
import pytest

from betrace.config import Settings
from betrace.dev.worker import WorkerProcess
from betrace.metrics import InMemoryHooks
from betrace.sinks.ledger import SignalLedger, open_ledger, tenant_ledger_path
from betrace.streams.topics import tenant_partition
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages
from betrace.workload.producer import produce
from tests.integration.helpers import signal_keys, stored, wait_until_drained

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Tenants over all four partitions, so both workers own some and ownership moves.
TENANTS = ("default", "initech", "t2", "t3", "acme")
#: No Redis here: the cache tier is not under test.
NO_REDIS = {"BETRACE_CACHE__ENABLED": "false"}
FORBIDDEN_IN_LOGS = (
    "Traceback",
    "StoreBusyError",
    "NotOwnerError",
    "LedgerLockedError",
    "Could not set lock",
)


def _sessions(path: Path) -> list[tuple[int, int, int | None]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute(
            "SELECT pid, opened_ns, closed_ns FROM _writer_sessions ORDER BY opened_ns"
        ).fetchall()
    finally:
        con.close()
    return [(int(p), int(o), None if c is None else int(c)) for p, o, c in rows]


def _ledger_signals(cfg: Settings, tenant: str, rules: set[str]) -> Counter[str]:
    ledger = SignalLedger(open_ledger(cfg.data_dir, read_only=True, tenant=tenant), hooks=InMemoryHooks())
    try:
        return Counter({rule: sum(c.signals for c in ledger.counts(tenant, rule)) for rule in rules})
    finally:
        ledger.shutdown()


def test_worker_joins_and_leaves_mid_stream_tenants_have_one_writer(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    # Every tenant gets the rules of "default" (the generator's ground truth assumes them).
    rules = tmp_path / "rules"
    rules.mkdir()
    template = (pipeline_settings.rules_dir / "default.yaml").read_text()
    for tenant in TENANTS:
        (rules / f"{tenant}.yaml").write_text(template.replace("tenant: default", f"tenant: {tenant}"))
    cfg = pipeline_settings.model_copy(
        update={"window_spans": 8, "checkpoint_interval_s": 0.5, "rules_dir": rules}
    )
    assert {tenant_partition(t, cfg.topics.partitions) for t in TENANTS} == set(range(4))
    gen = TraceGenerator(tenants=TENANTS, violation_rate=0.2, seed=5)
    messages = list(batch_messages(gen.traces(4_000), spans_per_message=40))
    third = len(messages) // 3

    ingest = WorkerProcess(
        cfg.model_copy(update={"stages": "ingest"}), tmp_path / "ingest.log", extra_env=NO_REDIS
    )
    down = cfg.model_copy(update={"stages": "downstream"})

    def downstream(name: str) -> WorkerProcess:
        # Workers share the data directory (the tenant files) but never a spool.
        env = {"BETRACE_RESILIENCE__SPOOL_DIR": str(tmp_path / f"spool-{name}"), **NO_REDIS}
        return WorkerProcess(down, tmp_path / f"{name}.log", extra_env=env)

    first, second = downstream("first"), downstream("second")
    # The downstream group's inputs (ingest-only workers are a group of their own).
    t = cfg.topics
    downstream_topics = [t.spans, t.store, t.traces, f"{t.signals}.pending"]
    ingest.start()
    first.start()
    try:
        asyncio.run(produce(cfg, messages[:third]))
        assert first.wait_for_log("owning tenant partitions", timeout=60), first.log_tail()
        time.sleep(3)  # traces open, windows in flight
        second.start()  # joins the group: partitions move while traces are open
        asyncio.run(produce(cfg, messages[third : 2 * third]))
        assert second.wait_for_log("owning tenant partitions [", timeout=60), second.log_tail()
        time.sleep(4)
        asyncio.run(produce(cfg, messages[2 * third :]))
        time.sleep(1)
        assert first.stop() == 0, first.log_tail()  # SIGTERM: leaves gracefully, partitions move back
        wait_until_drained(cfg.model_copy(update={"stages": "ingest"}), ingest, topics=[cfg.topics.input])
        wait_until_drained(cfg, second, timeout_s=180, topics=downstream_topics)
        time.sleep(cfg.idle_timeout_s + 2)  # the last traces close on the idle timer
        wait_until_drained(cfg, second, timeout_s=120, topics=downstream_topics)
        signals = signal_keys(cfg)
        # Open traces moved with their partitions (the join and the leave), via the changelog.
        assert second.wait_for_log("restored", timeout=1), second.log_tail()
    finally:
        for worker in (ingest, first, second):
            if worker.alive:
                worker.stop()

    logs = {w: (tmp_path / f"{w}.log").read_text() for w in ("first", "second")}
    for name, text in logs.items():
        bad = [line for line in text.splitlines() if any(f in line for f in FORBIDDEN_IN_LOGS)]
        assert not bad, f"{name}: {bad[:5]}"
    assert "released tenants" in logs["first"], "the first worker never handed tenants over"

    assert len(signals) == len(set(signals)), "a signal was published twice"
    assert sorted(signals) == sorted(gen.truth.expected)
    counts = stored(cfg)
    assert sum(c[0] for c in counts.values()) == gen.truth.spans  # no span lost
    assert all(rows == distinct for rows, distinct in counts.values())  # none stored twice
    assert set(counts) == set(TENANTS)

    per_tenant: dict[str, Counter[str]] = {t: Counter() for t in TENANTS}
    for tenant, rule, _ in signals:
        per_tenant[tenant][rule] += 1
    for tenant, expected in per_tenant.items():
        if expected:
            assert tenant_ledger_path(cfg.data_dir, tenant).exists()
            assert _ledger_signals(cfg, tenant, set(expected)) == expected, tenant

    writers: set[int] = set()
    for tenant in TENANTS:
        sessions = _sessions(cfg.data_dir / f"tenant={tenant}.duckdb")
        writers |= {pid for pid, _, _ in sessions}
        for (_, _, closed), (_, opened, _) in itertools.pairwise(sessions):
            assert closed is not None and closed <= opened, f"{tenant}: overlapping writers {sessions}"
    assert len(writers) == 2, "both workers should have owned tenant files at some point"
