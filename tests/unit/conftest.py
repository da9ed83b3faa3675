"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from betrace.sinks.duckdb_store import TenantStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TenantStore]:
    """A tenant store on real DuckDB files in this test's directory."""
    store = TenantStore(tmp_path / "data")
    yield store
    store.close()
