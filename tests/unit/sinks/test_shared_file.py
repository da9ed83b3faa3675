"""open_shared: concurrent short-lived writers from several real processes all get through."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from betrace.errors import SinkError
from betrace.sinks.shared_file import open_shared


def _writer(path: str, who: int, n: int) -> None:
    for i in range(n):
        with open_shared(Path(path), timeout_s=30) as con:
            con.execute("CREATE TABLE IF NOT EXISTS t (who INT, i INT)")
            con.execute("INSERT INTO t VALUES (?, ?)", [who, i])


def test_writers_in_three_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "shared.duckdb"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), who, 20)) for who in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with open_shared(path, read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT (who, i)) FROM t").fetchone() == (60, 60)


def test_read_only_open_of_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with (
        pytest.raises(SinkError, match="does not exist"),
        open_shared(tmp_path / "no.duckdb", read_only=True),
    ):
        pass
