"""A tenant file with three days of synthetic spans and signals, and a job over a cold directory."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from betrace.archive.job import ArchiveJob
from betrace.archive.synthetic import fill_day
from betrace.config.sections import ArchiveSettings
from betrace.sinks.cold import ColdStorage, FilesystemColdStorage
from betrace.sinks.duckdb_store import TenantStore

TODAY = dt.date(2026, 11, 25)
DAYS = [TODAY - dt.timedelta(days=k) for k in (4, 3, 2)]
SPANS_PER_DAY = 1_500
SIGNALS_PER_DAY = 12


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TenantStore]:
    st = TenantStore(tmp_path / "data")
    con = st.connection("acme")
    for day in DAYS:
        fill_day(con, "acme", day, spans=SPANS_PER_DAY, signals=SIGNALS_PER_DAY)
    yield st
    st.close()


@pytest.fixture
def cold(tmp_path: Path) -> FilesystemColdStorage:
    return FilesystemColdStorage(tmp_path / "cold")


def make_job(store: TenantStore, cold: ColdStorage, **kwargs: object) -> ArchiveJob:
    settings = ArchiveSettings(hot_days=1, retries=3, backoff_base_s=0.01, backoff_max_s=0.02)
    return ArchiveJob(store, cold, settings, clock=lambda: TODAY, **kwargs)  # type: ignore[arg-type]
