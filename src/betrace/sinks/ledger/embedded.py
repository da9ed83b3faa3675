"""The embedded ledger: TigerBeetle's semantics for single-phase transfers, stored in DuckDB.

Used when no TigerBeetle cluster is configured. One file (``ledger.duckdb`` in
the data directory) holds every tenant's ledger, as one TigerBeetle cluster
would. Each request is validated in memory, in order, exactly as TigerBeetle
validates a batch (linked chains roll back together; ``exists`` answers a
replay), then its effects are committed in one DuckDB transaction, so a
request is all-or-nothing on disk as well.

128-bit values (ids, amounts, balances, ``user_data_128``) are stored as 32
lower-case hex characters, which sort like the numbers they encode.

Not supported (a :class:`LedgerRequestError`, never a silent difference):
two-phase transfers (``pending``/``post``/``void``), balancing and closing
transfers, imported events. BeTrace's signal ledger uses none of them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from betrace.sinks.attached import AttachedFiles, spill_dir
from betrace.sinks.ledger.model import (
    U128_MAX,
    Account,
    AccountFilter,
    AccountFilterFlags,
    AccountFlags,
    CreateAccountResult,
    CreateAccountStatus,
    CreateTransferResult,
    CreateTransferStatus,
    LedgerError,
    LedgerLockedError,
    LedgerRequestError,
    QueryFilter,
    QueryFilterFlags,
    Transfer,
    TransferFlags,
    check_batch,
)

logger = logging.getLogger(__name__)

#: Block cache of a ledger opened on its own (not in a worker's shared instance).
LEDGER_MEMORY_MIB = 64

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS accounts (
    id VARCHAR PRIMARY KEY,
    debits_pending VARCHAR NOT NULL,
    debits_posted VARCHAR NOT NULL,
    credits_pending VARCHAR NOT NULL,
    credits_posted VARCHAR NOT NULL,
    user_data_128 VARCHAR NOT NULL,
    user_data_64 UBIGINT NOT NULL,
    user_data_32 UINTEGER NOT NULL,
    ledger UINTEGER NOT NULL,
    code USMALLINT NOT NULL,
    flags USMALLINT NOT NULL,
    timestamp UBIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS transfers (
    id VARCHAR PRIMARY KEY,
    debit_account_id VARCHAR NOT NULL,
    credit_account_id VARCHAR NOT NULL,
    amount VARCHAR NOT NULL,
    pending_id VARCHAR NOT NULL,
    user_data_128 VARCHAR NOT NULL,
    user_data_64 UBIGINT NOT NULL,
    user_data_32 UINTEGER NOT NULL,
    timeout UINTEGER NOT NULL,
    ledger UINTEGER NOT NULL,
    code USMALLINT NOT NULL,
    flags USMALLINT NOT NULL,
    timestamp UBIGINT NOT NULL
);
"""

ACCOUNT_COLUMNS = (
    "id",
    "debits_pending",
    "debits_posted",
    "credits_pending",
    "credits_posted",
    "user_data_128",
    "user_data_64",
    "user_data_32",
    "ledger",
    "code",
    "flags",
    "timestamp",
)
TRANSFER_COLUMNS = (
    "id",
    "debit_account_id",
    "credit_account_id",
    "amount",
    "pending_id",
    "user_data_128",
    "user_data_64",
    "user_data_32",
    "timeout",
    "ledger",
    "code",
    "flags",
    "timestamp",
)
_HEX_ACCOUNT = {"id", "debits_pending", "debits_posted", "credits_pending", "credits_posted", "user_data_128"}
_HEX_TRANSFER = {"id", "debit_account_id", "credit_account_id", "amount", "pending_id", "user_data_128"}

_ACCOUNT_SCHEMA = pa.schema(
    [(c, pa.string()) if c in _HEX_ACCOUNT else (c, pa.uint64()) for c in ACCOUNT_COLUMNS]
)
_TRANSFER_SCHEMA = pa.schema(
    [(c, pa.string()) if c in _HEX_TRANSFER else (c, pa.uint64()) for c in TRANSFER_COLUMNS]
)

#: Flags the embedded ledger implements; any other known flag is a LedgerRequestError.
_ACCOUNT_FLAGS_SUPPORTED = (
    AccountFlags.LINKED
    | AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
    | AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS
    | AccountFlags.HISTORY
)
_ACCOUNT_FLAGS_KNOWN = (1 << 6) - 1
_TRANSFER_FLAGS_SUPPORTED = TransferFlags.LINKED
_TRANSFER_FLAGS_KNOWN = (1 << 9) - 1

AS = CreateAccountStatus
TS = CreateTransferStatus
E = TypeVar("E", Account, Transfer)
S = TypeVar("S", CreateAccountStatus, CreateTransferStatus)


def _hex(value: int) -> str:
    return f"{value:032x}"


def _account(row: Sequence[Any]) -> Account:
    v = dict(zip(ACCOUNT_COLUMNS, row, strict=True))
    return Account(
        id=int(v["id"], 16),
        ledger=int(v["ledger"]),
        code=int(v["code"]),
        flags=AccountFlags(int(v["flags"])),
        debits_pending=int(v["debits_pending"], 16),
        debits_posted=int(v["debits_posted"], 16),
        credits_pending=int(v["credits_pending"], 16),
        credits_posted=int(v["credits_posted"], 16),
        user_data_128=int(v["user_data_128"], 16),
        user_data_64=int(v["user_data_64"]),
        user_data_32=int(v["user_data_32"]),
        timestamp=int(v["timestamp"]),
    )


def _transfer(row: Sequence[Any]) -> Transfer:
    v = dict(zip(TRANSFER_COLUMNS, row, strict=True))
    return Transfer(
        id=int(v["id"], 16),
        debit_account_id=int(v["debit_account_id"], 16),
        credit_account_id=int(v["credit_account_id"], 16),
        amount=int(v["amount"], 16),
        ledger=int(v["ledger"]),
        code=int(v["code"]),
        flags=TransferFlags(int(v["flags"])),
        pending_id=int(v["pending_id"], 16),
        user_data_128=int(v["user_data_128"], 16),
        user_data_64=int(v["user_data_64"]),
        user_data_32=int(v["user_data_32"]),
        timeout=int(v["timeout"]),
        timestamp=int(v["timestamp"]),
    )


def _row(obj: Account | Transfer, columns: Iterable[str], hex_columns: set[str]) -> dict[str, Any]:
    return {c: _hex(getattr(obj, c)) if c in hex_columns else int(getattr(obj, c)) for c in columns}


class _Journal:
    """Undo log for one linked chain: restore dict entries when the chain fails."""

    def __init__(self) -> None:
        self._entries: list[tuple[dict[int, Any], int, Any]] = []

    def set(self, mapping: dict[int, Any], key: int, value: Any) -> None:
        self._entries.append((mapping, key, mapping.get(key)))
        mapping[key] = value

    def rollback(self) -> None:
        for mapping, key, previous in reversed(self._entries):
            if previous is None:
                mapping.pop(key, None)
            else:
                mapping[key] = previous
        self._entries.clear()


def _run_chains(
    events: Sequence[E],
    *,
    linked: Callable[[E], bool],
    apply: Callable[[E, int, _Journal], tuple[S, int]],
    base_ts: int,
    chain_open: S,
    chain_failed: S,
    created: S,
) -> list[tuple[int, S]]:
    """TigerBeetle's linked-chain rules over ``events``; returns (timestamp, status) per event."""
    results: list[tuple[int, S]] = []
    n, i = len(events), 0
    while i < n:
        j = i
        while j < n - 1 and linked(events[j]):
            j += 1
        journal = _Journal()
        chain: list[tuple[int, S]] = []
        failed = -1
        for k in range(i, j + 1):
            ts = base_ts + k + 1
            if k == n - 1 and linked(events[k]):
                status, stamp = chain_open, ts
            else:
                status, stamp = apply(events[k], ts, journal)
            chain.append((stamp, status))
            if status != created and j > i:
                failed = k
                break
        if failed >= 0:
            journal.rollback()
            chain = [
                (base_ts + k + 1, chain[k - i][1] if k == failed else chain_failed) for k in range(i, j + 1)
            ]
        results.extend(chain)
        i = j + 1
    return results


class EmbeddedLedger:
    """A TigerBeetle-compatible ledger in one DuckDB file; one writer process at a time."""

    backend = "embedded"

    def __init__(self, path: Path, *, read_only: bool = False, files: AttachedFiles | None = None) -> None:
        """Open ``path`` in ``files`` (one DuckDB instance shared with other tenant files), else alone."""
        self.path = path
        self.read_only = read_only
        self._lock = threading.Lock()
        self._own_files = files is None
        self._files = files or AttachedFiles(memory_mib=LEDGER_MEMORY_MIB, temp_dir=spill_dir(path.parent))
        self._name: str | None = None
        if read_only and not path.exists():
            msg = f"no embedded ledger at {path} (no signal has been recorded yet)"
            raise LedgerError(msg)
        try:
            if not read_only:
                path.parent.mkdir(parents=True, exist_ok=True)
            self._name = self._files.attach(path, read_only=read_only)
            self._con = self._files.cursor(self._name)
            if not read_only:
                self._con.execute(SCHEMA_SQL)
        except BaseException as exc:
            if hasattr(self, "_con"):
                self._con.close()
            self._release()
            if not isinstance(exc, duckdb.Error):
                raise
            if "lock" in str(exc).lower():
                msg = (
                    f"the embedded ledger {path} is held by another process (a running worker); "
                    "DuckDB allows one writer and no concurrent readers from other processes: "
                    "ask the worker's query API instead, or stop the worker"
                )
                raise LedgerLockedError(msg) from None
            msg = f"cannot open the embedded ledger {path}: {exc}"
            raise LedgerError(msg) from exc
        row = self._con.execute(
            "SELECT greatest((SELECT coalesce(max(timestamp), 0) FROM accounts),"
            " (SELECT coalesce(max(timestamp), 0) FROM transfers))"
        ).fetchone()
        self._last_ts = int(row[0]) if row else 0
        #: The writer's accounts as committed (this process holds the file's only write
        #: lock): a transfer batch then skips one of its five statements. Cleared on any
        #: failed write, so a rolled-back balance is read back from the file.
        self._accounts: dict[int, Account] = {}

    # -- writes ---------------------------------------------------------------------------

    def _reserve(self, n: int) -> int:
        """Timestamps base+1 .. base+n: unique, strictly increasing, close to wall-clock ns."""
        base = max(time.time_ns(), self._last_ts)
        self._last_ts = base + n
        return base

    def _writable(self) -> None:
        if self.read_only:
            msg = f"the embedded ledger {self.path} is open read-only"
            raise LedgerRequestError(msg)

    def create_accounts(self, accounts: Sequence[Account]) -> list[CreateAccountResult]:
        check_batch(len(accounts))
        self._writable()
        for a in accounts:
            if a.flags & AccountFlags.IMPORTED:
                msg = "the embedded ledger does not support imported accounts"
                raise LedgerRequestError(msg)
        with self._lock:
            known = {a.id: a for a in self._lookup_accounts({a.id for a in accounts})}
            new: dict[int, Account] = {}

            def apply(a: Account, ts: int, journal: _Journal) -> tuple[CreateAccountStatus, int]:
                status = self._check_account(a, known.get(a.id) or new.get(a.id))
                if status == AS.EXISTS:
                    return status, (known.get(a.id) or new[a.id]).timestamp
                if status == AS.CREATED:
                    journal.set(new, a.id, _replace_ts(a, ts))
                return status, ts

            base = self._reserve(len(accounts))
            results = _run_chains(
                accounts,
                linked=lambda a: bool(a.flags & AccountFlags.LINKED),
                apply=apply,
                base_ts=base,
                chain_open=AS.LINKED_EVENT_CHAIN_OPEN,
                chain_failed=AS.LINKED_EVENT_FAILED,
                created=AS.CREATED,
            )
            if new:
                rows = [_row(a, ACCOUNT_COLUMNS, _HEX_ACCOUNT) for a in new.values()]
                table = pa.Table.from_pylist(rows, schema=_ACCOUNT_SCHEMA)
                self._commit(lambda con: self._insert_table(con, "accounts", table))
        return [CreateAccountResult(timestamp=ts, status=status) for ts, status in results]

    @staticmethod
    def _check_account(a: Account, existing: Account | None) -> CreateAccountStatus:
        checks = (
            (a.timestamp != 0, AS.TIMESTAMP_MUST_BE_ZERO),
            (int(a.flags) & ~_ACCOUNT_FLAGS_KNOWN != 0, AS.RESERVED_FLAG),
            (a.id == 0, AS.ID_MUST_NOT_BE_ZERO),
            (a.id == U128_MAX, AS.ID_MUST_NOT_BE_INT_MAX),
            (
                bool(a.flags & AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
                and bool(a.flags & AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS),
                AS.FLAGS_ARE_MUTUALLY_EXCLUSIVE,
            ),
            (a.debits_pending != 0, AS.DEBITS_PENDING_MUST_BE_ZERO),
            (a.debits_posted != 0, AS.DEBITS_POSTED_MUST_BE_ZERO),
            (a.credits_pending != 0, AS.CREDITS_PENDING_MUST_BE_ZERO),
            (a.credits_posted != 0, AS.CREDITS_POSTED_MUST_BE_ZERO),
            (a.ledger == 0, AS.LEDGER_MUST_NOT_BE_ZERO),
            (a.code == 0, AS.CODE_MUST_NOT_BE_ZERO),
        )
        for failed, status in checks:
            if failed:
                return status
        if existing is None:
            return AS.CREATED
        differences = (
            (a.flags != existing.flags, AS.EXISTS_WITH_DIFFERENT_FLAGS),
            (a.user_data_128 != existing.user_data_128, AS.EXISTS_WITH_DIFFERENT_USER_DATA_128),
            (a.user_data_64 != existing.user_data_64, AS.EXISTS_WITH_DIFFERENT_USER_DATA_64),
            (a.user_data_32 != existing.user_data_32, AS.EXISTS_WITH_DIFFERENT_USER_DATA_32),
            (a.ledger != existing.ledger, AS.EXISTS_WITH_DIFFERENT_LEDGER),
            (a.code != existing.code, AS.EXISTS_WITH_DIFFERENT_CODE),
        )
        for differs, status in differences:
            if differs:
                return status
        return AS.EXISTS

    def create_transfers(self, transfers: Sequence[Transfer]) -> list[CreateTransferResult]:
        check_batch(len(transfers))
        self._writable()
        for t in transfers:
            if int(t.flags) & _TRANSFER_FLAGS_KNOWN & ~int(_TRANSFER_FLAGS_SUPPORTED):
                msg = f"the embedded ledger does not support transfer flags {t.flags!r} (two-phase etc.)"
                raise LedgerRequestError(msg)
        with self._lock:
            known = {t.id: t for t in self._lookup_transfers({t.id for t in transfers})}
            wanted = {t.debit_account_id for t in transfers} | {t.credit_account_id for t in transfers}
            accounts = {i: self._accounts[i] for i in wanted if i in self._accounts}
            if len(accounts) < len(wanted):
                accounts |= {a.id: a for a in self._lookup_accounts(wanted - accounts.keys())}
            balances = {a.id: (a.debits_posted, a.credits_posted) for a in accounts.values()}
            new: dict[int, tuple[Transfer, int]] = {}

            def apply(t: Transfer, ts: int, journal: _Journal) -> tuple[CreateTransferStatus, int]:
                fresh = new.get(t.id)
                existing = known.get(t.id) or (fresh[0] if fresh else None)
                status = self._check_transfer(t, accounts, balances, existing)
                if status == TS.EXISTS:
                    return status, known[t.id].timestamp if t.id in known else new[t.id][1]
                if status != TS.CREATED:
                    return status, ts
                dr = balances[t.debit_account_id]
                journal.set(balances, t.debit_account_id, (dr[0] + t.amount, dr[1]))
                cr = balances[t.credit_account_id]
                journal.set(balances, t.credit_account_id, (cr[0], cr[1] + t.amount))
                journal.set(new, t.id, (t, ts))
                return status, ts

            base = self._reserve(len(transfers))
            results = _run_chains(
                transfers,
                linked=lambda t: bool(t.flags & TransferFlags.LINKED),
                apply=apply,
                base_ts=base,
                chain_open=TS.LINKED_EVENT_CHAIN_OPEN,
                chain_failed=TS.LINKED_EVENT_FAILED,
                created=TS.CREATED,
            )
            if new:
                touched = {t.debit_account_id for t, _ in new.values()} | {
                    t.credit_account_id for t, _ in new.values()
                }

                def persist(con: duckdb.DuckDBPyConnection) -> None:
                    self._insert_table(con, "transfers", _transfer_table(list(new.values())))
                    ids = sorted(touched)
                    table = pa.table(
                        {
                            "id": [_hex(i) for i in ids],
                            "dp": [_hex(balances[i][0]) for i in ids],
                            "cp": [_hex(balances[i][1]) for i in ids],
                        }
                    )
                    con.register("_balances", table)
                    try:
                        con.execute(
                            "UPDATE accounts SET debits_posted = b.dp, credits_posted = b.cp "
                            "FROM _balances b WHERE accounts.id = b.id"
                        )
                    finally:
                        con.unregister("_balances")

                self._commit(persist)
            for i, a in accounts.items():
                self._accounts[i] = replace(a, debits_posted=balances[i][0], credits_posted=balances[i][1])
        return [CreateTransferResult(timestamp=ts, status=status) for ts, status in results]

    @staticmethod
    def _check_transfer(  # noqa: PLR0911 - one return per TigerBeetle status, in its order
        t: Transfer,
        accounts: dict[int, Account],
        balances: dict[int, tuple[int, int]],
        existing: Transfer | None,
    ) -> CreateTransferStatus:
        checks = (
            (t.timestamp != 0, TS.TIMESTAMP_MUST_BE_ZERO),
            (int(t.flags) & ~_TRANSFER_FLAGS_KNOWN != 0, TS.RESERVED_FLAG),
            (t.id == 0, TS.ID_MUST_NOT_BE_ZERO),
            (t.id == U128_MAX, TS.ID_MUST_NOT_BE_INT_MAX),
            (t.debit_account_id == 0, TS.DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO),
            (t.debit_account_id == U128_MAX, TS.DEBIT_ACCOUNT_ID_MUST_NOT_BE_INT_MAX),
            (t.credit_account_id == 0, TS.CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO),
            (t.credit_account_id == U128_MAX, TS.CREDIT_ACCOUNT_ID_MUST_NOT_BE_INT_MAX),
            (t.credit_account_id == t.debit_account_id, TS.ACCOUNTS_MUST_BE_DIFFERENT),
            (t.pending_id != 0, TS.PENDING_ID_MUST_BE_ZERO),
            (t.timeout != 0, TS.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER),
            (t.ledger == 0, TS.LEDGER_MUST_NOT_BE_ZERO),
            (t.code == 0, TS.CODE_MUST_NOT_BE_ZERO),
        )
        for failed, status in checks:
            if failed:
                return status
        dr, cr = accounts.get(t.debit_account_id), accounts.get(t.credit_account_id)
        if dr is None:
            return TS.DEBIT_ACCOUNT_NOT_FOUND
        if cr is None:
            return TS.CREDIT_ACCOUNT_NOT_FOUND
        if dr.ledger != cr.ledger:
            return TS.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER
        if t.ledger != dr.ledger:
            return TS.TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS
        if existing is not None:
            return _transfer_exists(t, existing)
        dr_debits, dr_credits = balances[dr.id]
        cr_debits, cr_credits = balances[cr.id]
        limits = (
            (bool(dr.flags & AccountFlags.CLOSED), TS.DEBIT_ACCOUNT_ALREADY_CLOSED),
            (bool(cr.flags & AccountFlags.CLOSED), TS.CREDIT_ACCOUNT_ALREADY_CLOSED),
            (dr_debits + t.amount > U128_MAX, TS.OVERFLOWS_DEBITS_POSTED),
            (cr_credits + t.amount > U128_MAX, TS.OVERFLOWS_CREDITS_POSTED),
            (dr.debits_pending + dr_debits + t.amount > U128_MAX, TS.OVERFLOWS_DEBITS),
            (cr.credits_pending + cr_credits + t.amount > U128_MAX, TS.OVERFLOWS_CREDITS),
            (
                bool(dr.flags & AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
                and dr.debits_pending + dr_debits + t.amount > dr_credits,
                TS.EXCEEDS_CREDITS,
            ),
            (
                bool(cr.flags & AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)
                and cr.credits_pending + cr_credits + t.amount > cr_debits,
                TS.EXCEEDS_DEBITS,
            ),
        )
        for failed, status in limits:
            if failed:
                return status
        return TS.CREATED

    def _commit(self, work: Callable[[duckdb.DuckDBPyConnection], None]) -> None:
        con = self._con
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                work(con)
                con.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT: this connection is long-lived, and an aborted
                # transaction left on it would fail every later write.
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
        except BaseException as exc:
            self._accounts.clear()  # read back from the file: the balances were not written
            if isinstance(exc, duckdb.Error):
                msg = f"embedded ledger write failed: {exc}"
                raise LedgerError(msg) from exc
            raise

    @staticmethod
    def _insert_table(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
        con.register("_rows", rows)
        try:
            con.execute(f"INSERT INTO {table} SELECT * FROM _rows")  # noqa: S608 - fixed table names
        finally:
            con.unregister("_rows")

    # -- reads ----------------------------------------------------------------------------

    def _select(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            cur = self._files.cursor(self._alias())
            try:
                return cur.execute(sql, list(params)).fetchall()
            finally:
                cur.close()
        except duckdb.Error as exc:
            msg = f"embedded ledger read failed: {exc}"
            raise LedgerError(msg) from exc

    def _lookup_accounts(self, ids: Iterable[int]) -> list[Account]:
        keys = [_hex(i) for i in ids]
        if not keys:
            return []
        cols = ", ".join(ACCOUNT_COLUMNS)
        rows = self._select(f"SELECT {cols} FROM accounts WHERE list_contains(?, id)", [keys])  # noqa: S608
        return [_account(r) for r in rows]

    def _lookup_transfers(self, ids: Iterable[int]) -> list[Transfer]:
        keys = [_hex(i) for i in ids]
        if not keys:
            return []
        cols = ", ".join(TRANSFER_COLUMNS)
        rows = self._select(f"SELECT {cols} FROM transfers WHERE list_contains(?, id)", [keys])  # noqa: S608
        return [_transfer(r) for r in rows]

    def lookup_accounts(self, ids: Sequence[int]) -> list[Account]:
        check_batch(len(ids))
        found = {a.id: a for a in self._lookup_accounts(ids)}
        return [found[i] for i in dict.fromkeys(ids) if i in found]

    def lookup_transfers(self, ids: Sequence[int]) -> list[Transfer]:
        check_batch(len(ids))
        found = {t.id: t for t in self._lookup_transfers(ids)}
        return [found[i] for i in dict.fromkeys(ids) if i in found]

    def get_account_transfers(self, account_filter: AccountFilter) -> list[Transfer]:
        f = account_filter
        sides = []
        if f.flags & AccountFilterFlags.DEBITS:
            sides.append("debit_account_id = ?")
        if f.flags & AccountFilterFlags.CREDITS:
            sides.append("credit_account_id = ?")
        if not sides or f.limit <= 0 or f.account_id in {0, U128_MAX}:
            return []  # TigerBeetle answers an invalid filter with no results
        where = [f"({' OR '.join(sides)})"]
        params: list[Any] = [_hex(f.account_id)] * len(sides)
        self._common_filters(
            where, params, ud128=f.user_data_128, ud64=f.user_data_64, ud32=f.user_data_32, code=f.code
        )
        reversed_ = bool(f.flags & AccountFilterFlags.REVERSED)
        return [
            _transfer(r)
            for r in self._query("transfers", TRANSFER_COLUMNS, where, params, f, reversed_=reversed_)
        ]

    def query_accounts(self, query_filter: QueryFilter) -> list[Account]:
        where, params = self._query_filter(query_filter)
        if where is None:
            return []
        reversed_ = bool(query_filter.flags & QueryFilterFlags.REVERSED)
        rows = self._query("accounts", ACCOUNT_COLUMNS, where, params, query_filter, reversed_=reversed_)
        return [_account(r) for r in rows]

    def query_transfers(self, query_filter: QueryFilter) -> list[Transfer]:
        where, params = self._query_filter(query_filter)
        if where is None:
            return []
        reversed_ = bool(query_filter.flags & QueryFilterFlags.REVERSED)
        rows = self._query("transfers", TRANSFER_COLUMNS, where, params, query_filter, reversed_=reversed_)
        return [_transfer(r) for r in rows]

    @staticmethod
    def _common_filters(
        where: list[str], params: list[Any], *, ud128: int, ud64: int, ud32: int, code: int
    ) -> None:
        for column, value, encoded in (
            ("user_data_128", ud128, _hex(ud128)),
            ("user_data_64", ud64, ud64),
            ("user_data_32", ud32, ud32),
            ("code", code, code),
        ):
            if value:
                where.append(f"{column} = ?")
                params.append(encoded)

    def _query_filter(self, f: QueryFilter) -> tuple[list[str] | None, list[Any]]:
        if f.limit <= 0:
            return None, []
        where: list[str] = []
        params: list[Any] = []
        self._common_filters(
            where, params, ud128=f.user_data_128, ud64=f.user_data_64, ud32=f.user_data_32, code=f.code
        )
        if f.ledger:
            where.append("ledger = ?")
            params.append(f.ledger)
        return where, params

    def _query(
        self,
        table: str,
        columns: Sequence[str],
        where: list[str],
        params: list[Any],
        f: AccountFilter | QueryFilter,
        *,
        reversed_: bool,
    ) -> list[tuple[Any, ...]]:
        where, params = list(where), list(params)
        if f.timestamp_min:
            where.append("timestamp >= ?")
            params.append(f.timestamp_min)
        if f.timestamp_max:
            where.append("timestamp <= ?")
            params.append(f.timestamp_max)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        order = "DESC" if reversed_ else "ASC"
        params.append(min(f.limit, 8189))
        sql = f"SELECT {', '.join(columns)} FROM {table} {clause} ORDER BY timestamp {order} LIMIT ?"  # noqa: S608
        return self._select(sql, params)

    def _alias(self) -> str:
        if self._name is None:
            msg = f"the embedded ledger {self.path} is closed"
            raise LedgerError(msg)
        return self._name

    def _release(self) -> None:
        """Detach the file (DuckDB checkpoints it and drops its lock); close a private instance."""
        name, self._name = self._name, None
        try:
            if name is not None:
                self._files.detach(name)
        finally:
            if self._own_files:
                self._files.close()

    def close(self) -> None:
        with self._lock:
            if self._name is None:
                return
            try:
                self._con.close()
            finally:
                self._release()


def _replace_ts(obj: E, ts: int) -> E:
    return replace(obj, timestamp=ts)


def _transfer_table(items: list[tuple[Transfer, int]]) -> pa.Table:
    """New transfers (with their assigned timestamps) as one Arrow table, column by column."""
    ts = [t for t, _ in items]
    columns: dict[str, list[Any]] = {}
    for name in TRANSFER_COLUMNS:
        if name == "timestamp":
            columns[name] = [stamp for _, stamp in items]
        elif name in _HEX_TRANSFER:
            columns[name] = [f"{getattr(t, name):032x}" for t in ts]
        else:
            columns[name] = [int(getattr(t, name)) for t in ts]
    return pa.Table.from_pydict(columns, schema=_TRANSFER_SCHEMA)


def _transfer_exists(t: Transfer, e: Transfer) -> CreateTransferStatus:
    differences = (
        (t.flags != e.flags, TS.EXISTS_WITH_DIFFERENT_FLAGS),
        (t.debit_account_id != e.debit_account_id, TS.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID),
        (t.credit_account_id != e.credit_account_id, TS.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID),
        (t.amount != e.amount, TS.EXISTS_WITH_DIFFERENT_AMOUNT),
        (t.pending_id != e.pending_id, TS.EXISTS_WITH_DIFFERENT_PENDING_ID),
        (t.user_data_128 != e.user_data_128, TS.EXISTS_WITH_DIFFERENT_USER_DATA_128),
        (t.user_data_64 != e.user_data_64, TS.EXISTS_WITH_DIFFERENT_USER_DATA_64),
        (t.user_data_32 != e.user_data_32, TS.EXISTS_WITH_DIFFERENT_USER_DATA_32),
        (t.timeout != e.timeout, TS.EXISTS_WITH_DIFFERENT_TIMEOUT),
        (t.ledger != e.ledger, TS.EXISTS_WITH_DIFFERENT_LEDGER),
        (t.code != e.code, TS.EXISTS_WITH_DIFFERENT_CODE),
    )
    for differs, status in differences:
        if differs:
            return status
    return TS.EXISTS
