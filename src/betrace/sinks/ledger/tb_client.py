"""The TigerBeetle ledger: BeTrace's :class:`Ledger` over the official ``tigerbeetle`` client.

Written against the documented API of the ``tigerbeetle`` PyPI package 0.17.x:
``ClientSync(cluster_id=, replica_addresses=)``, ``create_accounts`` /
``create_transfers`` answering one ``(timestamp, status)`` result per event,
``lookup_*``, ``get_account_transfers(AccountFilter)`` and
``query_accounts`` / ``query_transfers(QueryFilter)``.

Compatibility: TigerBeetle clients only talk to replicas of their own release
or newer (subject to the replica's "oldest supported client version"), so the
0.17.9 client needs a 0.17.9-or-later cluster. The client retries forever and
has no request timeout; :func:`open_tigerbeetle` probes the cluster once with
a bounded wait so that a wrong address fails start-up instead of hanging.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import tigerbeetle as tb

from betrace.sinks.ledger.model import (
    MAX_BATCH,
    Account,
    AccountFilter,
    AccountFlags,
    CreateAccountResult,
    CreateAccountStatus,
    CreateTransferResult,
    CreateTransferStatus,
    LedgerError,
    LedgerRequestError,
    QueryFilter,
    Transfer,
    TransferFlags,
)

logger = logging.getLogger(__name__)

R = TypeVar("R")

#: The client release this adapter is written and tested against.
CLIENT_VERSION = "0.17.9"


def _to_tb_account(a: Account) -> tb.Account:
    return tb.Account(
        id=a.id,
        debits_pending=a.debits_pending,
        debits_posted=a.debits_posted,
        credits_pending=a.credits_pending,
        credits_posted=a.credits_posted,
        user_data_128=a.user_data_128,
        user_data_64=a.user_data_64,
        user_data_32=a.user_data_32,
        ledger=a.ledger,
        code=a.code,
        flags=tb.AccountFlags(int(a.flags)),
        timestamp=a.timestamp,
    )


def _from_tb_account(a: tb.Account) -> Account:
    return Account(
        id=a.id,
        ledger=a.ledger,
        code=a.code,
        flags=AccountFlags(int(a.flags)),
        debits_pending=a.debits_pending,
        debits_posted=a.debits_posted,
        credits_pending=a.credits_pending,
        credits_posted=a.credits_posted,
        user_data_128=a.user_data_128,
        user_data_64=a.user_data_64,
        user_data_32=a.user_data_32,
        timestamp=a.timestamp,
    )


def _to_tb_transfer(t: Transfer) -> tb.Transfer:
    return tb.Transfer(
        id=t.id,
        debit_account_id=t.debit_account_id,
        credit_account_id=t.credit_account_id,
        amount=t.amount,
        pending_id=t.pending_id,
        user_data_128=t.user_data_128,
        user_data_64=t.user_data_64,
        user_data_32=t.user_data_32,
        timeout=t.timeout,
        ledger=t.ledger,
        code=t.code,
        flags=tb.TransferFlags(int(t.flags)),
        timestamp=t.timestamp,
    )


def _from_tb_transfer(t: tb.Transfer) -> Transfer:
    return Transfer(
        id=t.id,
        debit_account_id=t.debit_account_id,
        credit_account_id=t.credit_account_id,
        amount=t.amount,
        ledger=t.ledger,
        code=t.code,
        flags=TransferFlags(int(t.flags)),
        pending_id=t.pending_id,
        user_data_128=t.user_data_128,
        user_data_64=t.user_data_64,
        user_data_32=t.user_data_32,
        timeout=t.timeout,
        timestamp=t.timestamp,
    )


class TigerBeetleLedger:
    """A TigerBeetle cluster; requests larger than 8,189 events are split."""

    backend = "tigerbeetle"

    def __init__(self, addresses: str, *, cluster_id: int = 0) -> None:
        self.addresses = addresses
        self.cluster_id = cluster_id
        try:
            self._client = tb.ClientSync(cluster_id=cluster_id, replica_addresses=addresses)
        except Exception as exc:  # the client raises a bare InitError for bad addresses
            msg = f"cannot create a TigerBeetle client for {addresses!r}: {exc!r}"
            raise LedgerRequestError(msg) from exc

    def _call(self, fn: Callable[..., R], *args: Any) -> R:
        try:
            return fn(*args)
        except tb.TooMuchDataError as exc:
            msg = f"TigerBeetle rejected the request as too large: {exc}"
            raise LedgerRequestError(msg) from exc
        except (tb.ClientReleaseTooLowError, tb.ClientReleaseTooHighError) as exc:
            msg = f"TigerBeetle client {CLIENT_VERSION} and the cluster at {self.addresses} disagree: {exc}"
            raise LedgerRequestError(msg) from exc
        except (tb.ClientClosedError, tb.ClientEvictedError) as exc:
            msg = f"TigerBeetle client at {self.addresses} is unusable: {exc}"
            raise LedgerError(msg) from exc

    def create_accounts(self, accounts: Sequence[Account]) -> list[CreateAccountResult]:
        out: list[CreateAccountResult] = []
        for i in range(0, len(accounts), MAX_BATCH):
            chunk = [_to_tb_account(a) for a in accounts[i : i + MAX_BATCH]]
            out.extend(
                CreateAccountResult(timestamp=r.timestamp, status=CreateAccountStatus(int(r.status)))
                for r in self._call(self._client.create_accounts, chunk)
            )
        return out

    def create_transfers(self, transfers: Sequence[Transfer]) -> list[CreateTransferResult]:
        out: list[CreateTransferResult] = []
        for i in range(0, len(transfers), MAX_BATCH):
            chunk = [_to_tb_transfer(t) for t in transfers[i : i + MAX_BATCH]]
            out.extend(
                CreateTransferResult(timestamp=r.timestamp, status=CreateTransferStatus(int(r.status)))
                for r in self._call(self._client.create_transfers, chunk)
            )
        return out

    def lookup_accounts(self, ids: Sequence[int]) -> list[Account]:
        out: list[Account] = []
        for i in range(0, len(ids), MAX_BATCH):
            out.extend(
                _from_tb_account(a)
                for a in self._call(self._client.lookup_accounts, list(ids[i : i + MAX_BATCH]))
            )
        return out

    def lookup_transfers(self, ids: Sequence[int]) -> list[Transfer]:
        out: list[Transfer] = []
        for i in range(0, len(ids), MAX_BATCH):
            found = self._call(self._client.lookup_transfers, list(ids[i : i + MAX_BATCH]))
            out.extend(_from_tb_transfer(t) for t in found)
        return out

    def get_account_transfers(self, account_filter: AccountFilter) -> list[Transfer]:
        f = account_filter
        native = tb.AccountFilter(
            account_id=f.account_id,
            user_data_128=f.user_data_128,
            user_data_64=f.user_data_64,
            user_data_32=f.user_data_32,
            code=f.code,
            timestamp_min=f.timestamp_min,
            timestamp_max=f.timestamp_max,
            limit=f.limit,
            flags=tb.AccountFilterFlags(int(f.flags)),
        )
        return [_from_tb_transfer(t) for t in self._call(self._client.get_account_transfers, native)]

    @staticmethod
    def _query_filter(f: QueryFilter) -> tb.QueryFilter:
        return tb.QueryFilter(
            user_data_128=f.user_data_128,
            user_data_64=f.user_data_64,
            user_data_32=f.user_data_32,
            ledger=f.ledger,
            code=f.code,
            timestamp_min=f.timestamp_min,
            timestamp_max=f.timestamp_max,
            limit=f.limit,
            flags=tb.QueryFilterFlags(int(f.flags)),
        )

    def query_accounts(self, query_filter: QueryFilter) -> list[Account]:
        found = self._call(self._client.query_accounts, self._query_filter(query_filter))
        return [_from_tb_account(a) for a in found]

    def query_transfers(self, query_filter: QueryFilter) -> list[Transfer]:
        found = self._call(self._client.query_transfers, self._query_filter(query_filter))
        return [_from_tb_transfer(t) for t in found]

    def close(self) -> None:
        self._client.close()


def open_tigerbeetle(
    addresses: str, *, cluster_id: int = 0, connect_timeout_s: float = 10.0
) -> TigerBeetleLedger:
    """Connect and prove the cluster answers within ``connect_timeout_s`` (a lookup of id 1)."""
    ledger = TigerBeetleLedger(addresses, cluster_id=cluster_id)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="betrace-tb-probe")
    try:
        pool.submit(ledger.lookup_accounts, [1]).result(timeout=connect_timeout_s)
    except concurrent.futures.TimeoutError:
        try:
            ledger.close()  # fails the in-flight probe with ClientClosedError, freeing its thread
        except Exception:
            logger.debug("closing the unanswered TigerBeetle client failed", exc_info=True)
        msg = (
            f"TigerBeetle cluster {cluster_id} at {addresses} did not answer within {connect_timeout_s:.0f}s "
            f"(client {CLIENT_VERSION} needs a 0.17.9-or-newer cluster)"
        )
        raise LedgerError(msg) from None
    finally:
        pool.shutdown(wait=False)
    logger.info("ledger: TigerBeetle cluster %d at %s", cluster_id, addresses)
    return ledger
