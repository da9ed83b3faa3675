"""The ledger data model: TigerBeetle's accounts, transfers, filters and result codes.

Field names, flag bits and status values are TigerBeetle's (client 0.17.x), so
that the embedded ledger and the TigerBeetle adapter are interchangeable and a
status read from either means the same thing. Identifiers and amounts are
unsigned 128-bit integers held in Python ints; ``timestamp`` is assigned by
the ledger (nanoseconds, unique and strictly increasing per ledger cluster).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from betrace.errors import SinkError

U128_MAX = (1 << 128) - 1
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
U16_MAX = (1 << 16) - 1

#: Events per request TigerBeetle accepts with its default message size (8189).
MAX_BATCH = 8189


class LedgerError(SinkError):
    """The ledger could not serve a request (unreachable, closed, busy); retrying may help."""

    retriable = True


class LedgerRequestError(LedgerError):
    """The request itself is invalid (too large, unsupported); retrying cannot help."""

    retriable = False


class LedgerLockedError(LedgerError):
    """The embedded ledger file is held by another process (DuckDB allows one writer)."""


class AccountFlags(enum.IntFlag):
    NONE = 0
    LINKED = 1 << 0
    DEBITS_MUST_NOT_EXCEED_CREDITS = 1 << 1
    CREDITS_MUST_NOT_EXCEED_DEBITS = 1 << 2
    HISTORY = 1 << 3
    IMPORTED = 1 << 4
    CLOSED = 1 << 5


class TransferFlags(enum.IntFlag):
    NONE = 0
    LINKED = 1 << 0
    PENDING = 1 << 1
    POST_PENDING_TRANSFER = 1 << 2
    VOID_PENDING_TRANSFER = 1 << 3
    BALANCING_DEBIT = 1 << 4
    BALANCING_CREDIT = 1 << 5
    CLOSING_DEBIT = 1 << 6
    CLOSING_CREDIT = 1 << 7
    IMPORTED = 1 << 8


class AccountFilterFlags(enum.IntFlag):
    NONE = 0
    DEBITS = 1 << 0
    CREDITS = 1 << 1
    REVERSED = 1 << 2


class QueryFilterFlags(enum.IntFlag):
    NONE = 0
    REVERSED = 1 << 0


class CreateAccountStatus(enum.IntEnum):
    CREATED = 0xFFFFFFFF
    LINKED_EVENT_FAILED = 1
    LINKED_EVENT_CHAIN_OPEN = 2
    TIMESTAMP_MUST_BE_ZERO = 3
    RESERVED_FIELD = 4
    RESERVED_FLAG = 5
    ID_MUST_NOT_BE_ZERO = 6
    ID_MUST_NOT_BE_INT_MAX = 7
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 8
    DEBITS_PENDING_MUST_BE_ZERO = 9
    DEBITS_POSTED_MUST_BE_ZERO = 10
    CREDITS_PENDING_MUST_BE_ZERO = 11
    CREDITS_POSTED_MUST_BE_ZERO = 12
    LEDGER_MUST_NOT_BE_ZERO = 13
    CODE_MUST_NOT_BE_ZERO = 14
    EXISTS_WITH_DIFFERENT_FLAGS = 15
    EXISTS_WITH_DIFFERENT_USER_DATA_128 = 16
    EXISTS_WITH_DIFFERENT_USER_DATA_64 = 17
    EXISTS_WITH_DIFFERENT_USER_DATA_32 = 18
    EXISTS_WITH_DIFFERENT_LEDGER = 19
    EXISTS_WITH_DIFFERENT_CODE = 20
    EXISTS = 21
    IMPORTED_EVENT_EXPECTED = 22
    IMPORTED_EVENT_NOT_EXPECTED = 23
    IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE = 24
    IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE = 25
    IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS = 26


class CreateTransferStatus(enum.IntEnum):
    CREATED = 0xFFFFFFFF
    LINKED_EVENT_FAILED = 1
    LINKED_EVENT_CHAIN_OPEN = 2
    TIMESTAMP_MUST_BE_ZERO = 3
    RESERVED_FLAG = 4
    ID_MUST_NOT_BE_ZERO = 5
    ID_MUST_NOT_BE_INT_MAX = 6
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 7
    DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO = 8
    DEBIT_ACCOUNT_ID_MUST_NOT_BE_INT_MAX = 9
    CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO = 10
    CREDIT_ACCOUNT_ID_MUST_NOT_BE_INT_MAX = 11
    ACCOUNTS_MUST_BE_DIFFERENT = 12
    PENDING_ID_MUST_BE_ZERO = 13
    PENDING_ID_MUST_NOT_BE_ZERO = 14
    PENDING_ID_MUST_NOT_BE_INT_MAX = 15
    PENDING_ID_MUST_BE_DIFFERENT = 16
    TIMEOUT_RESERVED_FOR_PENDING_TRANSFER = 17
    LEDGER_MUST_NOT_BE_ZERO = 19
    CODE_MUST_NOT_BE_ZERO = 20
    DEBIT_ACCOUNT_NOT_FOUND = 21
    CREDIT_ACCOUNT_NOT_FOUND = 22
    ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER = 23
    TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS = 24
    PENDING_TRANSFER_NOT_FOUND = 25
    PENDING_TRANSFER_NOT_PENDING = 26
    PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID = 27
    PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID = 28
    PENDING_TRANSFER_HAS_DIFFERENT_LEDGER = 29
    PENDING_TRANSFER_HAS_DIFFERENT_CODE = 30
    EXCEEDS_PENDING_TRANSFER_AMOUNT = 31
    PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT = 32
    PENDING_TRANSFER_ALREADY_POSTED = 33
    PENDING_TRANSFER_ALREADY_VOIDED = 34
    PENDING_TRANSFER_EXPIRED = 35
    EXISTS_WITH_DIFFERENT_FLAGS = 36
    EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID = 37
    EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID = 38
    EXISTS_WITH_DIFFERENT_AMOUNT = 39
    EXISTS_WITH_DIFFERENT_PENDING_ID = 40
    EXISTS_WITH_DIFFERENT_USER_DATA_128 = 41
    EXISTS_WITH_DIFFERENT_USER_DATA_64 = 42
    EXISTS_WITH_DIFFERENT_USER_DATA_32 = 43
    EXISTS_WITH_DIFFERENT_TIMEOUT = 44
    EXISTS_WITH_DIFFERENT_CODE = 45
    EXISTS = 46
    OVERFLOWS_DEBITS_PENDING = 47
    OVERFLOWS_CREDITS_PENDING = 48
    OVERFLOWS_DEBITS_POSTED = 49
    OVERFLOWS_CREDITS_POSTED = 50
    OVERFLOWS_DEBITS = 51
    OVERFLOWS_CREDITS = 52
    OVERFLOWS_TIMEOUT = 53
    EXCEEDS_CREDITS = 54
    EXCEEDS_DEBITS = 55
    IMPORTED_EVENT_EXPECTED = 56
    IMPORTED_EVENT_NOT_EXPECTED = 57
    IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE = 58
    IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE = 59
    IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS = 60
    IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_DEBIT_ACCOUNT = 61
    IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_CREDIT_ACCOUNT = 62
    IMPORTED_EVENT_TIMEOUT_MUST_BE_ZERO = 63
    CLOSING_TRANSFER_MUST_BE_PENDING = 64
    DEBIT_ACCOUNT_ALREADY_CLOSED = 65
    CREDIT_ACCOUNT_ALREADY_CLOSED = 66
    EXISTS_WITH_DIFFERENT_LEDGER = 67
    ID_ALREADY_FAILED = 68


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    ledger: int
    code: int
    flags: AccountFlags = AccountFlags.NONE
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    user_data_128: int = 0
    user_data_64: int = 0
    user_data_32: int = 0
    timestamp: int = 0


@dataclass(frozen=True, slots=True)
class Transfer:
    id: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    ledger: int
    code: int
    flags: TransferFlags = TransferFlags.NONE
    pending_id: int = 0
    user_data_128: int = 0
    user_data_64: int = 0
    user_data_32: int = 0
    timeout: int = 0
    timestamp: int = 0


@dataclass(frozen=True, slots=True)
class CreateAccountResult:
    timestamp: int
    status: CreateAccountStatus


@dataclass(frozen=True, slots=True)
class CreateTransferResult:
    timestamp: int
    status: CreateTransferStatus


@dataclass(frozen=True, slots=True)
class AccountFilter:
    """Transfers of one account; zero means "no filter", as in TigerBeetle."""

    account_id: int
    limit: int
    flags: AccountFilterFlags = AccountFilterFlags.DEBITS | AccountFilterFlags.CREDITS
    user_data_128: int = 0
    user_data_64: int = 0
    user_data_32: int = 0
    code: int = 0
    timestamp_min: int = 0
    timestamp_max: int = 0


@dataclass(frozen=True, slots=True)
class QueryFilter:
    """Accounts or transfers by the intersection of non-zero fields and a timestamp range."""

    limit: int
    ledger: int = 0
    code: int = 0
    user_data_128: int = 0
    user_data_64: int = 0
    user_data_32: int = 0
    timestamp_min: int = 0
    timestamp_max: int = 0
    flags: QueryFilterFlags = QueryFilterFlags.NONE


class Ledger(Protocol):
    """What BeTrace needs from a ledger; blocking calls, safe from one thread at a time."""

    #: Human-readable backend name for logs and ``--help`` output.
    backend: str

    def create_accounts(self, accounts: Sequence[Account]) -> list[CreateAccountResult]: ...

    def create_transfers(self, transfers: Sequence[Transfer]) -> list[CreateTransferResult]: ...

    def lookup_accounts(self, ids: Sequence[int]) -> list[Account]: ...

    def lookup_transfers(self, ids: Sequence[int]) -> list[Transfer]: ...

    def get_account_transfers(self, account_filter: AccountFilter) -> list[Transfer]: ...

    def query_accounts(self, query_filter: QueryFilter) -> list[Account]: ...

    def query_transfers(self, query_filter: QueryFilter) -> list[Transfer]: ...

    def close(self) -> None: ...


def hash128(*parts: str | int) -> int:
    """A stable, non-zero, non-max 128-bit id from ``parts`` (SHA-256, first 16 bytes)."""
    key = "\x1f".join(str(p) for p in parts).encode()
    value = int.from_bytes(hashlib.sha256(key).digest()[:16], "big")
    if value in {0, U128_MAX}:  # pragma: no cover - 2**-127 odds; ids must avoid both
        value = 1
    return value


def check_batch(size: int) -> None:
    """Reject requests TigerBeetle would answer with ``too_much_data``."""
    if size > MAX_BATCH:
        msg = f"a ledger request holds at most {MAX_BATCH} events, got {size}"
        raise LedgerRequestError(msg)
