"""One contract, two ledgers: TigerBeetle's semantics, which the embedded ledger must match."""

from __future__ import annotations

import random

import pytest

from betrace.sinks.ledger import (
    Account,
    AccountFilter,
    AccountFilterFlags,
    AccountFlags,
    CreateAccountStatus,
    CreateTransferStatus,
    Ledger,
    QueryFilter,
    QueryFilterFlags,
    Transfer,
    TransferFlags,
)

AS, TS = CreateAccountStatus, CreateTransferStatus


class World:
    """Random ids and a random ledger number per test, so tests share one ledger safely."""

    def __init__(self, ledger: Ledger, rng: random.Random) -> None:
        self.ledger = ledger
        self.rng = rng
        self.number = rng.randrange(1000, 2**31)

    def id(self) -> int:
        return self.rng.getrandbits(126) + 1

    def accounts(self, n: int, **fields: object) -> list[int]:
        ids = [self.id() for _ in range(n)]
        fields.setdefault("ledger", self.number)
        fields.setdefault("code", 7)
        results = self.ledger.create_accounts([Account(id=i, **fields) for i in ids])  # type: ignore[arg-type]
        assert [r.status for r in results] == [AS.CREATED] * n
        return ids

    def transfer(self, debit: int, credit: int, amount: int = 1, **fields: object) -> Transfer:
        fields.setdefault("ledger", self.number)
        fields.setdefault("code", 3)
        tid = fields.pop("id", None) or self.id()
        return Transfer(id=tid, debit_account_id=debit, credit_account_id=credit, amount=amount, **fields)  # type: ignore[arg-type]

    def balances(self, *ids: int) -> list[tuple[int, int]]:
        found = {a.id: a for a in self.ledger.lookup_accounts(list(ids))}
        return [(found[i].debits_posted, found[i].credits_posted) for i in ids]


@pytest.fixture
def world(ledger: Ledger, rng: random.Random) -> World:
    return World(ledger, rng)


def test_create_account_is_idempotent_and_reports_differences(world: World) -> None:
    a = Account(id=world.id(), ledger=world.number, code=1, user_data_128=5, user_data_64=6, user_data_32=7)
    (created,) = world.ledger.create_accounts([a])
    assert created.status == AS.CREATED
    assert created.timestamp > 0
    (again,) = world.ledger.create_accounts([a])
    assert again.status == AS.EXISTS
    assert again.timestamp == created.timestamp
    variants = {
        AS.EXISTS_WITH_DIFFERENT_FLAGS: Account(id=a.id, ledger=a.ledger, code=1, flags=AccountFlags.HISTORY),
        AS.EXISTS_WITH_DIFFERENT_USER_DATA_128: Account(id=a.id, ledger=a.ledger, code=1, user_data_128=9),
        AS.EXISTS_WITH_DIFFERENT_CODE: Account(
            id=a.id, ledger=a.ledger, code=2, user_data_128=5, user_data_64=6, user_data_32=7
        ),
        AS.EXISTS_WITH_DIFFERENT_LEDGER: Account(
            id=a.id, ledger=a.ledger + 1, code=1, user_data_128=5, user_data_64=6, user_data_32=7
        ),
    }
    for status, variant in variants.items():
        assert world.ledger.create_accounts([variant])[0].status == status
    (stored,) = world.ledger.lookup_accounts([a.id])
    assert (stored.user_data_128, stored.user_data_64, stored.user_data_32, stored.code) == (5, 6, 7, 1)
    assert stored.timestamp == created.timestamp


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"id": 0}, AS.ID_MUST_NOT_BE_ZERO),
        ({"id": 2**128 - 1}, AS.ID_MUST_NOT_BE_INT_MAX),
        ({"ledger": 0}, AS.LEDGER_MUST_NOT_BE_ZERO),
        ({"code": 0}, AS.CODE_MUST_NOT_BE_ZERO),
        ({"timestamp": 5}, AS.TIMESTAMP_MUST_BE_ZERO),
        ({"debits_posted": 1}, AS.DEBITS_POSTED_MUST_BE_ZERO),
        (
            {
                "flags": AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
                | AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS
            },
            AS.FLAGS_ARE_MUTUALLY_EXCLUSIVE,
        ),
    ],
)
def test_invalid_accounts_are_rejected(world: World, fields: dict[str, object], status: AS) -> None:
    base: dict[str, object] = {"id": world.id(), "ledger": world.number, "code": 1}
    base.update(fields)
    assert world.ledger.create_accounts([Account(**base)])[0].status == status  # type: ignore[arg-type]


def test_transfers_move_balances_once(world: World) -> None:
    dr, cr = world.accounts(2)
    t = world.transfer(dr, cr, 3, user_data_128=42)
    (created,) = world.ledger.create_transfers([t])
    assert created.status == TS.CREATED
    assert world.balances(dr, cr) == [(3, 0), (0, 3)]
    (replayed,) = world.ledger.create_transfers([t])
    assert replayed.status == TS.EXISTS
    assert replayed.timestamp == created.timestamp
    assert world.balances(dr, cr) == [(3, 0), (0, 3)]
    (stored,) = world.ledger.lookup_transfers([t.id])
    assert (stored.amount, stored.user_data_128, stored.timestamp) == (3, 42, created.timestamp)


def test_duplicate_ids_within_one_request_count_once(world: World) -> None:
    dr, cr = world.accounts(2)
    t = world.transfer(dr, cr)
    results = world.ledger.create_transfers([t, t, t])
    assert [r.status for r in results] == [TS.CREATED, TS.EXISTS, TS.EXISTS]
    assert world.balances(dr) == [(1, 0)]


def test_existing_transfer_with_other_fields(world: World) -> None:
    dr, cr, other = world.accounts(3)
    t = world.transfer(dr, cr, 2, user_data_64=9)
    world.ledger.create_transfers([t])
    cases = {
        TS.EXISTS_WITH_DIFFERENT_AMOUNT: world.transfer(dr, cr, 5, id=t.id, user_data_64=9),
        TS.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID: world.transfer(dr, other, 2, id=t.id, user_data_64=9),
        TS.EXISTS_WITH_DIFFERENT_USER_DATA_64: world.transfer(dr, cr, 2, id=t.id, user_data_64=1),
        TS.EXISTS_WITH_DIFFERENT_CODE: world.transfer(dr, cr, 2, id=t.id, user_data_64=9, code=4),
    }
    for status, variant in cases.items():
        assert world.ledger.create_transfers([variant])[0].status == status
    assert world.balances(dr, cr, other) == [(2, 0), (0, 2), (0, 0)]


def test_transfer_validation(world: World) -> None:
    dr, cr = world.accounts(2)
    (foreign,) = world.accounts(1, ledger=world.number + 1)
    missing = world.id()
    cases = [
        (world.transfer(dr, dr), TS.ACCOUNTS_MUST_BE_DIFFERENT),
        (world.transfer(missing, cr), TS.DEBIT_ACCOUNT_NOT_FOUND),
        (world.transfer(dr, missing), TS.CREDIT_ACCOUNT_NOT_FOUND),
        (world.transfer(dr, foreign), TS.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER),
        (world.transfer(dr, cr, ledger=world.number + 1), TS.TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS),
        (world.transfer(dr, cr, code=0), TS.CODE_MUST_NOT_BE_ZERO),
        (world.transfer(0, cr), TS.DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO),
        (world.transfer(dr, cr, timeout=5), TS.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER),
        (world.transfer(dr, cr, pending_id=5), TS.PENDING_ID_MUST_BE_ZERO),
        (
            Transfer(id=0, debit_account_id=dr, credit_account_id=cr, amount=1, ledger=world.number, code=1),
            TS.ID_MUST_NOT_BE_ZERO,
        ),
    ]
    results = world.ledger.create_transfers([t for t, _ in cases])
    assert [r.status for r in results] == [s for _, s in cases]
    assert world.balances(dr, cr) == [(0, 0), (0, 0)]


def test_balance_limits(world: World) -> None:
    (limited,) = world.accounts(1, flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
    (other,) = world.accounts(1)
    statuses = [r.status for r in world.ledger.create_transfers([world.transfer(limited, other, 1)])]
    assert statuses == [TS.EXCEEDS_CREDITS]
    world.ledger.create_transfers([world.transfer(other, limited, 2)])
    results = world.ledger.create_transfers(
        [world.transfer(limited, other, 2), world.transfer(limited, other, 1)]
    )
    assert [r.status for r in results] == [TS.CREATED, TS.EXCEEDS_CREDITS]


def test_a_failed_linked_chain_has_no_effect(world: World) -> None:
    dr, cr = world.accounts(2)
    first = world.transfer(dr, cr, 1, flags=TransferFlags.LINKED)
    second = world.transfer(dr, cr, 1, flags=TransferFlags.LINKED)
    broken = world.transfer(dr, world.id(), 1)  # unknown credit account ends the chain
    alone = world.transfer(dr, cr, 5)
    results = world.ledger.create_transfers([first, second, broken, alone])
    assert [r.status for r in results] == [
        TS.LINKED_EVENT_FAILED,
        TS.LINKED_EVENT_FAILED,
        TS.CREDIT_ACCOUNT_NOT_FOUND,
        TS.CREATED,
    ]
    assert world.balances(dr, cr) == [(5, 0), (0, 5)]
    assert world.ledger.lookup_transfers([first.id, second.id]) == []


def test_a_linked_chain_succeeds_together_and_an_open_chain_fails(world: World) -> None:
    dr, cr = world.accounts(2)
    chain = [world.transfer(dr, cr, 1, flags=TransferFlags.LINKED), world.transfer(dr, cr, 1)]
    assert [r.status for r in world.ledger.create_transfers(chain)] == [TS.CREATED, TS.CREATED]
    dangling = [world.transfer(dr, cr, 1), world.transfer(dr, cr, 1, flags=TransferFlags.LINKED)]
    assert [r.status for r in world.ledger.create_transfers(dangling)] == [
        TS.CREATED,
        TS.LINKED_EVENT_CHAIN_OPEN,
    ]
    assert world.balances(dr) == [(3, 0)]


def test_timestamps_are_unique_and_increasing(world: World) -> None:
    dr, cr = world.accounts(2)
    results = world.ledger.create_transfers([world.transfer(dr, cr) for _ in range(50)])
    stamps = [r.timestamp for r in results]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == 50


def test_lookups_skip_unknown_ids(world: World) -> None:
    a, b = world.accounts(2)
    found = world.ledger.lookup_accounts([b, world.id(), a])
    assert sorted(x.id for x in found) == sorted([a, b])
    assert world.ledger.lookup_transfers([world.id()]) == []


def test_account_transfers_by_side_time_range_and_order(world: World) -> None:
    a, b = world.accounts(2)
    out_ = [world.transfer(a, b, 1, user_data_32=i) for i in range(5)]
    in_ = [world.transfer(b, a, 1, user_data_32=10 + i) for i in range(3)]
    stamps = [r.timestamp for r in world.ledger.create_transfers(out_ + in_)]

    def query(flags: AccountFilterFlags, **kw: int) -> list[int]:
        found = world.ledger.get_account_transfers(AccountFilter(account_id=a, limit=100, flags=flags, **kw))
        return [t.user_data_32 for t in found]

    both = AccountFilterFlags.DEBITS | AccountFilterFlags.CREDITS
    assert query(both) == [0, 1, 2, 3, 4, 10, 11, 12]
    assert query(AccountFilterFlags.DEBITS) == [0, 1, 2, 3, 4]
    assert query(AccountFilterFlags.CREDITS | AccountFilterFlags.REVERSED) == [12, 11, 10]
    assert query(both, timestamp_min=stamps[2], timestamp_max=stamps[5]) == [2, 3, 4, 10]
    assert query(both, user_data_32=11) == [11]
    limited = world.ledger.get_account_transfers(AccountFilter(account_id=a, limit=2, flags=both))
    assert [t.user_data_32 for t in limited] == [0, 1]


def test_query_accounts_and_transfers(world: World) -> None:
    a, b = world.accounts(2, user_data_128=77)
    (c,) = world.accounts(1, user_data_128=78)
    found = world.ledger.query_accounts(QueryFilter(limit=10, ledger=world.number, user_data_128=77))
    assert sorted(x.id for x in found) == sorted([a, b])
    world.ledger.create_transfers(
        [world.transfer(a, c, 1, user_data_128=5), world.transfer(b, c, 1, user_data_128=6)]
    )
    hits = world.ledger.query_transfers(QueryFilter(limit=10, ledger=world.number, user_data_128=6))
    assert [t.debit_account_id for t in hits] == [b]
    newest = world.ledger.query_transfers(
        QueryFilter(limit=1, ledger=world.number, flags=QueryFilterFlags.REVERSED)
    )
    assert [t.user_data_128 for t in newest] == [6]
