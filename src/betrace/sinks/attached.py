"""One in-memory DuckDB instance that holds many database files, ``ATTACH``ed.

``duckdb.connect(path)`` makes a database instance per file, and each has its
own buffer pool (limited only by 80 % of RAM) and its own threads (9 here). A
worker holds a store file and a ledger file per tenant, so its RSS grew with
every row written and its threads with every tenant (benchmarks/RESULTS.md,
2026-12-04). Attached to one instance, the files share one thread pool and one
block cache under one limit: ``memory_mib`` plus :data:`FILE_MEMORY_MIB` per
attached file, the part a file holds and cannot evict.

Each attached file gets a fresh name; callers work on cursors that ``USE`` it,
so their SQL names tables without a catalog, as with a file of its own.

An in-memory instance would spill to ``.tmp`` under the working directory, so
:func:`spill_dir` gives each process its own directory beside its files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path

import duckdb

#: Added to the limit per attached file: each holds ~0.9 MiB it cannot evict (metadata,
#: index roots), and a fixed limit ran out at the 291st tenant file (benchmarks/RESULTS.md).
FILE_MEMORY_MIB = 2


#: Under a data directory: ``.duckdb-spill-<pid>``, one per process that spilled there.
SPILL_DIR = ".duckdb-spill"


def spill_dir(parent: Path) -> Path:
    """This process's spill directory in ``parent``; those of dead processes are removed.

    DuckDB removes its spill files when it closes, but not when it is killed, and
    two processes must not share one directory. One level only: DuckDB creates the
    last level itself, and nothing is created before something spills.
    """
    if parent.is_dir():
        for stale in parent.glob(f"{SPILL_DIR}-*"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(stale.name[len(SPILL_DIR) + 1 :])
                if pid != os.getpid() and not _alive(pid):
                    shutil.rmtree(stale, ignore_errors=True)
    return parent / f"{SPILL_DIR}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class AttachedFiles:
    """Database files attached to one DuckDB instance, made on first use."""

    def __init__(
        self, *, memory_mib: int, temp_dir: Path | None = None, settings: Mapping[str, str] | None = None
    ) -> None:
        self.memory_mib = int(memory_mib)
        #: Instance-wide settings (``SET GLOBAL``), e.g. ``checkpoint_threshold``.
        self.settings = dict(settings or {})
        if temp_dir is not None:
            self.settings["temp_directory"] = str(temp_dir)
        self._db: duckdb.DuckDBPyConnection | None = None
        self._names: set[str] = set()
        self._seq = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._names)

    def _instance(self) -> duckdb.DuckDBPyConnection:
        if self._db is None:
            db = duckdb.connect(":memory:", config={"memory_limit": f"{self.memory_mib}MiB"})
            for key, value in self.settings.items():
                db.execute(f"SET GLOBAL {key} = {_literal(value)}")
            self._db = db
        return self._db

    def _set_limit(self) -> None:
        limit = self.memory_mib + FILE_MEMORY_MIB * len(self._names)
        self._instance().execute(f"SET GLOBAL memory_limit = '{limit}MiB'")

    def attach(self, path: Path, *, read_only: bool = False) -> str:
        """Attach ``path`` (created when missing, unless ``read_only``); its name for :meth:`cursor`.

        Raises :class:`duckdb.Error` as opening the file would: another process's
        lock, or this process holding it already.
        """
        literal = _literal(str(path))
        with self._lock:
            self._seq += 1
            name = _quoted(f"file_{self._seq}")
            self._instance().execute(f"ATTACH {literal} AS {name}{' (READ_ONLY)' if read_only else ''}")
            self._names.add(name)
            self._set_limit()
        return name

    def cursor(self, name: str) -> duckdb.DuckDBPyConnection:
        """A new connection whose default database is the attached file ``name``; the caller closes it."""
        with self._lock:
            con = self._instance().cursor()
        try:
            con.execute(f"USE {name}")
        except BaseException:
            con.close()
            raise
        return con

    def detach(self, name: str) -> None:
        """Detach ``name``: DuckDB checkpoints the file and releases its lock."""
        with self._lock:
            if name not in self._names or self._db is None:
                return
            self._names.discard(name)
            self._db.execute(f"DETACH {name}")
            self._set_limit()

    def close(self) -> None:
        """Detach every file and close the instance (a later attach makes a new one)."""
        with self._lock:
            db, self._db = self._db, None
            names, self._names = self._names, set()
            if db is None:
                return
            try:
                for name in names:
                    db.execute(f"DETACH {name}")
            finally:
                db.close()
