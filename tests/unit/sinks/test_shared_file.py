"""open_shared: concurrent short-lived writers from several real processes all get through."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import duckdb
import pytest
from tests.faults import immutable_supported, read_only_dir

from betrace.errors import SinkError
from betrace.sinks.attached import AttachedFiles
from betrace.sinks.shared_file import SHARED_INSTANCE, open_shared


def _writer(path: str, who: int, n: int, attached: bool) -> None:
    via = SHARED_INSTANCE if attached else None
    for i in range(n):
        with open_shared(Path(path), timeout_s=30, via=via) as con:
            con.execute("CREATE TABLE IF NOT EXISTS t (who INT, i INT)")
            con.execute("INSERT INTO t VALUES (?, ?)", [who, i])


def test_writers_in_three_processes_lose_nothing(tmp_path: Path) -> None:
    """One opens the file as an instance of its own, two attach it to their process's instance."""
    path = tmp_path / "shared.duckdb"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), who, 20, who > 0)) for who in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with open_shared(path, read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT (who, i)) FROM t").fetchone() == (60, 60)


def test_an_attached_open_releases_the_file_for_another_process(tmp_path: Path) -> None:
    path = tmp_path / "shared.duckdb"
    files = AttachedFiles(memory_mib=64, settings={"temp_directory": ""})
    try:
        _writer(str(path), 0, 1, attached=False)  # the table
        with open_shared(path, via=files) as con:
            con.execute("INSERT INTO t VALUES (1, 0)")
        assert len(files) == 0
        ctx = mp.get_context("spawn")
        other = ctx.Process(target=_writer, args=(str(path), 9, 1, False))
        other.start()
        other.join(60)
        assert other.exitcode == 0
        with open_shared(path, read_only=True, via=files) as con:
            assert con.execute("SELECT list(who ORDER BY who) FROM t").fetchone() == ([0, 1, 9],)
    finally:
        files.close()


def _insert_then_freeze(path: Path, files: AttachedFiles) -> None:
    fault = read_only_dir(path.parent)
    try:
        with open_shared(path, via=files) as con:
            con.execute("INSERT INTO t VALUES (1)")
            fault.__enter__()  # only the detach meets the read-only directory
    finally:
        fault.__exit__(None, None, None)


def test_a_failed_detach_leaves_nothing_attached_and_loses_no_commit(tmp_path: Path) -> None:
    """DETACH checkpoints. On a read-only directory that fails, yet the file is detached,
    and what was committed is in the WAL for the next open."""
    if not immutable_supported(tmp_path):
        pytest.skip("chattr +i is not supported here")
    folder = tmp_path / "trail"
    path = folder / "shared.duckdb"
    files = AttachedFiles(memory_mib=64, settings={"temp_directory": ""})
    try:
        with open_shared(path, via=files) as con:
            con.execute("CREATE TABLE t (x INT)")
        with pytest.raises(duckdb.Error, match="CHECKPOINT"):
            _insert_then_freeze(path, files)
        assert len(files) == 0
        with open_shared(path, via=files) as con:
            assert con.execute("SELECT count(*) FROM t").fetchone() == (1,)
    finally:
        files.close()


def test_read_only_open_of_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with (
        pytest.raises(SinkError, match="does not exist"),
        open_shared(tmp_path / "no.duckdb", read_only=True),
    ):
        pass
