"""Signals in the ledger: exactly-once counters, tenant isolation, batching and backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from betrace.errors import BackpressureError
from betrace.metrics import InMemoryHooks
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.ledger import EmbeddedLedger, SignalLedger, Transfer, transfer_id
from betrace.sinks.ledger.signals import REGISTRY_LEDGER
from betrace.sinks.signals import SignalSink


def doc(
    n: int, tenant: str = "acme", rule: str = "pii-audit", version: int = 1, **extra: Any
) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "signal_id": f"{transfer_id(tenant, rule, version, f'{n:032x}'):032x}",
        "tenant": tenant,
        "rule_id": rule,
        "rule_version": version,
        "rule_name": "r",
        "trace_id": f"{n:032x}",
        "span_ids": [f"{n:016x}"],
        "severity": "high",
        "message": "m",
        "detected_at": "2026-11-25T02:47:08.165Z",
        "source_produced_ms": 1_795_574_826_312,
        **extra,
    }


@pytest_asyncio.fixture
async def signals(tmp_path: Path) -> AsyncIterator[SignalLedger]:
    ledger = SignalLedger(EmbeddedLedger(tmp_path / "ledger.duckdb"), hooks=InMemoryHooks())
    yield ledger
    await ledger.close()


def totals(ledger: SignalLedger, tenant: str, rule: str) -> dict[int, int]:
    return {c.version: c.signals for c in ledger.counts(tenant, rule)}


def test_transfer_id_is_the_signal_id_for_window_zero() -> None:
    from betrace.agents.evaluate import signal_id
    from betrace.rules.model import Rule

    rule = Rule(id="pii-audit", tenant="acme", name="n", expression="when { a } always { b }", version=3)
    assert transfer_id("acme", "pii-audit", 3, "ab" * 16) == int(signal_id("acme", rule, "ab" * 16), 16)
    assert transfer_id("acme", "pii-audit", 3, "ab" * 16, window=2) != transfer_id(
        "acme", "pii-audit", 3, "ab" * 16
    )


@pytest.mark.asyncio
async def test_replays_never_count_twice(signals: SignalLedger) -> None:
    batch = [doc(i) for i in range(300)]
    assert await signals.record(batch) == (300, 0)
    assert await signals.record(batch) == (0, 300)
    assert await signals.record([*batch[:10], doc(1000)]) == (1, 10)
    assert totals(signals, "acme", "pii-audit") == {1: 301}
    # The balance is the number of immutable transfers, each keyed by its trace.
    transfers = signals.signal_transfers("acme", "pii-audit", 1)
    assert len(transfers) == 301
    assert {t.user_data_128 for t in transfers} == set(range(300)) | {1000}


@pytest.mark.asyncio
async def test_a_new_process_reads_the_same_counters(tmp_path: Path) -> None:
    first = SignalLedger(EmbeddedLedger(tmp_path / "ledger.duckdb"), hooks=InMemoryHooks())
    await first.record([doc(i, rule="r", version=v) for i in range(5) for v in (1, 2)])
    await first.close()
    second = SignalLedger(EmbeddedLedger(tmp_path / "ledger.duckdb"), hooks=InMemoryHooks())
    try:
        assert totals(second, "acme", "r") == {1: 5, 2: 5}
        assert await second.record([doc(0, rule="r", version=1)]) == (0, 1)
    finally:
        await second.close()
    reader = SignalLedger(EmbeddedLedger(tmp_path / "ledger.duckdb", read_only=True), hooks=InMemoryHooks())
    try:
        assert totals(reader, "acme", "r") == {1: 5, 2: 5}
        assert totals(reader, "nobody", "r") == {}
        assert reader.ledger_for("nobody", create=False) is None
    finally:
        reader.shutdown()


@pytest.mark.asyncio
async def test_tenant_ledger_numbers_are_stable_and_distinct(signals: SignalLedger) -> None:
    numbers = {t: signals.ledger_for(t) for t in ("a", "b", "c", "acme")}
    assert len(set(numbers.values())) == 4
    assert all(n is not None and n >= 2 and n != REGISTRY_LEDGER for n in numbers.values())
    fresh = SignalLedger(signals.ledger, hooks=InMemoryHooks())  # same ledger, empty caches
    assert {t: fresh.ledger_for(t) for t in numbers} == numbers


@pytest.mark.asyncio
async def test_ledger_number_collisions_probe_to_the_next_number(signals: SignalLedger) -> None:
    from betrace.sinks.ledger import Account
    from betrace.sinks.ledger.model import U32_MAX, hash128
    from betrace.sinks.ledger.signals import CODE_LEDGER_CLAIM, FIRST_TENANT_LEDGER, claim_account_id

    span = U32_MAX - FIRST_TENANT_LEDGER + 1
    wanted = FIRST_TENANT_LEDGER + hash128("betrace.ledger-number", "victim") % span
    squatter = Account(
        id=claim_account_id(wanted), ledger=REGISTRY_LEDGER, code=CODE_LEDGER_CLAIM, user_data_128=1
    )
    signals.ledger.create_accounts([squatter])
    assert signals.ledger_for("victim") == FIRST_TENANT_LEDGER + (wanted - FIRST_TENANT_LEDGER + 1) % span


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    events=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["r1", "r2"]), st.integers(0, 40)),
        min_size=1,
        max_size=60,
    ),
    replay=st.booleans(),
)
def test_tenant_isolation_and_exactly_once_property(
    tmp_path_factory: pytest.TempPathFactory, events: list[tuple[str, str, int]], replay: bool
) -> None:
    """Each tenant's counters equal its own distinct signals, whatever the others record, replays included."""

    async def run() -> None:
        path = tmp_path_factory.mktemp("prop") / "ledger.duckdb"
        ledger = SignalLedger(EmbeddedLedger(path), hooks=InMemoryHooks())
        try:
            docs = [doc(n, tenant=t, rule=r) for t, r, n in events]
            await ledger.record(docs)
            if replay:
                await ledger.record(list(reversed(docs)))
            for tenant in ("a", "b", "c"):
                for rule in ("r1", "r2"):
                    expected = len({n for t, r, n in events if t == tenant and r == rule})
                    assert sum(totals(ledger, tenant, rule).values()) == expected
                    seen = {t.user_data_128 for t in ledger.signal_transfers(tenant, rule, 1)}
                    assert seen == {n for t, r, n in events if t == tenant and r == rule}
        finally:
            await ledger.close()

    asyncio.run(run())


@pytest.mark.asyncio
async def test_sink_flushes_at_128_items(signals: SignalLedger) -> None:
    sink = signals.sink
    sizes: list[int] = []
    original = signals.ledger.create_transfers

    def spy(transfers: Any) -> Any:
        sizes.append(len(transfers))
        return original(transfers)

    signals.ledger.create_transfers = spy  # type: ignore[method-assign]
    prepared = await signals.run(signals.prepare, [doc(i) for i in range(300)])
    for t in prepared:
        await sink.put(t)
    assert sizes == [128, 128]
    assert len(sink) == 44
    assert not sink.flush_due
    await asyncio.sleep(sink.flush_interval_s)
    assert sink.flush_due
    await sink.flush_if_due()
    assert sizes == [128, 128, 44]
    assert sink.created == 300


@pytest.mark.asyncio
async def test_sink_timer_flushes_on_age(signals: SignalLedger) -> None:
    stop = asyncio.Event()
    timer = asyncio.create_task(signals.sink.run_timer(stop))
    (t,) = await signals.run(signals.prepare, [doc(1)])
    await signals.sink.put(t)
    await asyncio.sleep(0.3)
    assert len(signals.sink) == 0
    assert signals.sink.created == 1
    stop.set()
    await timer


@pytest.mark.asyncio
async def test_a_full_buffer_is_backpressure(tmp_path: Path) -> None:
    ledger = SignalLedger(
        EmbeddedLedger(tmp_path / "l.duckdb"), hooks=InMemoryHooks(), flush_items=4, capacity=4
    )
    try:
        prepared: list[Transfer] = await ledger.run(ledger.prepare, [doc(i) for i in range(5)])
        for t in prepared[:4]:
            ledger.sink.add(t)
        with pytest.raises(BackpressureError, match="flush first"):
            ledger.sink.add(prepared[4])
        await ledger.sink.flush()
        ledger.sink.add(prepared[4])
    finally:
        await ledger.close()
    assert ledger.sink.created == 5


class Broker:
    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.fail = 0

    async def __call__(self, docs: list[dict[str, Any]]) -> None:
        if self.fail:
            self.fail -= 1
            msg = "broker down"
            raise RuntimeError(msg)
        self.published.extend(docs)


@pytest.mark.asyncio
async def test_signal_sink_counts_each_signal_once_across_replays_and_failures(
    tmp_path: Path, signals: SignalLedger
) -> None:
    store = TenantStore(tmp_path / "data")
    broker = Broker()
    sink = SignalSink(store, broker, max_items=1000, hooks=InMemoryHooks(), ledger=signals)
    try:
        batch = [doc(i) for i in range(20)] + [doc(i, tenant="other") for i in range(5)]
        broker.fail = 1
        for item in batch:
            sink.add(item)
        with pytest.raises(RuntimeError):
            await sink.flush()  # recorded in the ledger, not published: Kafka replays the batch
        for _ in range(3):  # the replay, then two more
            for item in batch:
                sink.add(item)
            await sink.flush()
        assert sorted(d["signal_id"] for d in broker.published) == sorted({d["signal_id"] for d in batch})
        assert totals(signals, "acme", "pii-audit") == {1: 20}
        assert totals(signals, "other", "pii-audit") == {1: 5}
    finally:
        store.close()
