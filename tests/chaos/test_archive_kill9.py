"""kill -9 ``betrace archive run`` after each phase, run it again: every span exactly once, hot or cold.

Also chaos scenario 7 of issue 7: cold storage refuses access (a directory that
rejects writes, or the S3 server stopped) -> retries, the day stays hot and is
marked failed, and the next run succeeds.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import duckdb
import pytest

from betrace.archive.synthetic import fill_day
from betrace.metrics import InMemoryHooks
from betrace.sinks.ledger import EmbeddedLedger, SignalLedger, tenant_ledger_path
from betrace.sinks.ledger.archival import ArchivalLedger
from tests.conftest import MotoS3, refuse_writes

pytestmark = [pytest.mark.chaos]

TODAY = dt.datetime.now(dt.UTC).date()
DAYS = [TODAY - dt.timedelta(days=k) for k in (3, 2, 1)]
SPANS = 3_000


def make_data(data: Path) -> Counter[tuple[str, str]]:
    con = duckdb.connect(str(data / "tenant=acme.duckdb"))
    for day in DAYS:
        fill_day(con, "acme", day, spans=SPANS, signals=20)
    keys = Counter(con.execute("SELECT trace_id, span_id FROM spans").fetchall())
    con.close()
    return keys


def env_for(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}
    env.update(
        BETRACE_DATA_DIR=str(data),
        BETRACE_ARCHIVE__HOT_DAYS="0",
        BETRACE_ARCHIVE__RETRIES="3",
        BETRACE_ARCHIVE__BACKOFF_BASE_S="0.05",
        BETRACE_ARCHIVE__BACKOFF_MAX_S="0.1",
        BETRACE_LOG_LEVEL="WARNING",
        COLUMNS="220",
    )
    env.update(extra)
    return env


def archive(data: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "betrace"), "archive", *args],
        env=env_for(data, **extra),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def spans_everywhere(data: Path, cold_files: list[Path]) -> Counter[tuple[str, str]]:
    """Every (trace_id, span_id) in the hot file and in every span Parquet file in cold storage."""
    con = duckdb.connect(str(data / "tenant=acme.duckdb"), read_only=True)
    try:
        found = Counter(con.execute("SELECT trace_id, span_id FROM spans").fetchall())
        if cold_files:
            found.update(
                con.execute(
                    "SELECT trace_id, span_id FROM read_parquet($f)", {"f": [str(p) for p in cold_files]}
                ).fetchall()
            )
    finally:
        con.close()
    return found


@pytest.mark.parametrize("phase", ["export", "upload", "verify", "cleanup"])
def test_kill9_after_each_phase_then_rerun_loses_and_duplicates_nothing(tmp_path: Path, phase: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    truth = make_data(data)
    crashed = archive(data, "run", BETRACE_FAILPOINT=f"archive.after_{phase}")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    cold = data / "cold"
    mid = spans_everywhere(data, sorted(cold.rglob("spans-*.parquet")))
    assert set(mid) == set(truth)  # nothing lost at the crash either
    rerun = archive(data, "run")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    if phase != "cleanup":
        assert "resumed after" in rerun.stdout
    files = sorted(cold.rglob("spans-*.parquet"))
    assert len(files) == len(DAYS)
    assert spans_everywhere(data, files) == truth  # every span exactly once
    con = duckdb.connect(str(data / "tenant=acme.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM spans").fetchone() == (0,)
        states = con.execute("SELECT DISTINCT state FROM archive_days").fetchall()
    finally:
        con.close()
    assert states == [("cleaned",)]
    ledger_file = tenant_ledger_path(data, "acme")
    signals = SignalLedger(EmbeddedLedger(ledger_file, read_only=True), hooks=InMemoryHooks())
    try:
        assert ArchivalLedger(signals).balance("acme", "spans", "archived") == sum(truth.values())
    finally:
        signals.shutdown()
    status = archive(data, "status")
    assert status.returncode == 0 and "cleaned" in status.stdout


def test_cold_directory_refusing_writes_keeps_days_hot_then_next_run_succeeds(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    truth = make_data(data)
    cold = tmp_path / "cold"
    cold.mkdir()
    with refuse_writes(cold):
        failed = archive(data, "run", BETRACE_COLD__PATH=str(cold))
    assert failed.returncode == 1
    assert "failed" in failed.stdout and "transient" in failed.stdout
    assert spans_everywhere(data, []) == truth  # the day stayed hot
    status = archive(data, "status", BETRACE_COLD__PATH=str(cold))
    assert "failed (after exported)" in status.stdout
    ok = archive(data, "run", BETRACE_COLD__PATH=str(cold))
    assert ok.returncode == 0, ok.stdout[-2000:]
    assert spans_everywhere(data, sorted(cold.rglob("spans-*.parquet"))) == truth


def test_s3_server_down_keeps_days_hot_then_next_run_succeeds(
    tmp_path: Path, moto_s3: MotoS3, s3_bucket: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    truth = make_data(data)
    s3 = {
        "BETRACE_COLD__BACKEND": "s3",
        "BETRACE_COLD__ENDPOINT": moto_s3.endpoint,
        "BETRACE_COLD__BUCKET": s3_bucket,
        "BETRACE_COLD__ACCESS_KEY": "AKIDEXAMPLE",
        "BETRACE_COLD__SECRET_KEY": "never-printed-secret",
        "BETRACE_COLD__TIMEOUT_S": "2",
    }
    moto_s3.stop()
    try:
        failed = archive(data, "run", **s3)
    finally:
        moto_s3.start()
    assert failed.returncode == 1 and "transient" in failed.stdout
    assert "never-printed-secret" not in failed.stdout + failed.stderr
    assert spans_everywhere(data, []) == truth
    # moto keeps buckets in memory: the restarted server needs the bucket again.
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key="a",
        secret_key="b",
        region="us-east-1",
        scheme="http",
        endpoint_override=f"127.0.0.1:{moto_s3.port}",
        allow_bucket_creation=True,
    )
    fs.create_dir(s3_bucket)
    ok = archive(data, "run", **s3)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    con = duckdb.connect(str(data / "tenant=acme.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM spans").fetchone() == (0,)
        keys = [
            k
            for (ks,) in con.execute("SELECT keys FROM archive_days WHERE kind = 'spans'").fetchall()
            for k in ks
            if "/spans-" in k  # a spans unit also holds its traces-NNNN summary file
        ]
    finally:
        con.close()
    cold = Counter[tuple[str, str]]()
    import pyarrow.dataset as ds

    table = ds.dataset([f"{s3_bucket}/{k}" for k in keys], filesystem=fs, format="parquet").to_table(
        columns=["trace_id", "span_id"]
    )
    cold.update(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))
    assert cold == truth
