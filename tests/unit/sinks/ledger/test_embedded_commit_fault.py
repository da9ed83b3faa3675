"""A real failed COMMIT of the embedded ledger: its file refuses writes (``chattr +i``).

The ledger keeps one long-lived connection per file. A COMMIT that fails must
count nothing of its batch and leave the connection usable once the file
accepts writes again, both on a ledger of its own and on one attached to a
shared DuckDB instance as in a worker (its store's tenant files). Here the
COMMIT itself fails (the WAL write). DuckDB (2.0) ends the transaction on a
failed COMMIT by itself, so this passes without the ledger's ROLLBACK too;
it pins the behaviour, whichever of the two provides it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.faults import immutable_supported, read_only_dir

from betrace.sinks.attached import AttachedFiles
from betrace.sinks.ledger import Account, CreateTransferStatus, EmbeddedLedger, LedgerError, Transfer

LEDGER, CODE = 7, 3


def transfer(tid: int) -> Transfer:
    return Transfer(id=tid, debit_account_id=1, credit_account_id=2, amount=1, ledger=LEDGER, code=CODE)


@pytest.fixture(params=["own instance", "shared instance"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmbeddedLedger]:
    if not immutable_supported(tmp_path):
        pytest.skip("chattr +i is not supported here")
    files = AttachedFiles(memory_mib=64) if request.param == "shared instance" else None
    (tmp_path / "ledger").mkdir()
    opened = EmbeddedLedger(tmp_path / "ledger" / "tenant=a.duckdb", files=files)
    try:
        opened.create_accounts([Account(id=i, ledger=LEDGER, code=CODE) for i in (1, 2)])
        yield opened
    finally:
        opened.close()
        if files is not None:
            files.close()


def balances(ledger: EmbeddedLedger) -> list[tuple[int, int]]:
    return [(a.debits_posted, a.credits_posted) for a in ledger.lookup_accounts([1, 2])]


def test_a_failed_commit_is_rolled_back_and_the_next_write_succeeds(
    ledger: EmbeddedLedger, tmp_path: Path
) -> None:
    assert [r.status for r in ledger.create_transfers([transfer(10)])] == [CreateTransferStatus.CREATED]
    with read_only_dir(tmp_path / "ledger"), pytest.raises(LedgerError, match="write failed"):
        ledger.create_transfers([transfer(11), transfer(12)])
    # Nothing of the failed batch counts, in memory or in the file.
    assert balances(ledger) == [(1, 0), (0, 1)]
    assert ledger.lookup_transfers([11, 12]) == []
    # The same connection writes again; the retried batch is counted once.
    retried = ledger.create_transfers([transfer(11), transfer(12)])
    assert [r.status for r in retried] == [CreateTransferStatus.CREATED] * 2
    assert [r.status for r in ledger.create_transfers([transfer(11)])] == [CreateTransferStatus.EXISTS]
    assert balances(ledger) == [(3, 0), (0, 3)]
