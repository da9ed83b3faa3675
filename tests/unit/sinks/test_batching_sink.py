"""The BatchingSink contract shared by every sink."""

from __future__ import annotations

import asyncio

import pytest

from betrace.errors import BackpressureError, SinkError
from betrace.metrics import InMemoryHooks
from betrace.sinks.base import BatchingSink


class ListSink(BatchingSink[str]):
    """A real sink whose destination is a Python list; ``fail`` makes the next write raise."""

    step_id = "list"

    def __init__(self, *, max_items: int, hooks: InMemoryHooks) -> None:
        super().__init__(max_items=max_items, hooks=hooks)
        self.written: list[list[str]] = []
        self.fail: Exception | None = None

    async def write(self, batch: list[str]) -> None:
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        self.written.append(list(batch))


@pytest.mark.asyncio
async def test_flush_writes_one_batch_and_counts_rows() -> None:
    hooks = InMemoryHooks()
    sink = ListSink(max_items=10, hooks=hooks)
    sink.add("a")
    sink.add("b", size=3)
    assert len(sink) == 4
    await sink.flush()
    assert sink.written == [["a", "b"]]
    assert len(sink) == 0
    assert hooks.total("betrace_sink_rows_total", sink="list") == 4
    [flush_times] = [v for (name, _), v in hooks.observations.items() if name == "betrace_sink_flush_seconds"]
    assert len(flush_times) == 1
    assert flush_times[0] >= 0


@pytest.mark.asyncio
async def test_flush_of_an_empty_sink_writes_nothing() -> None:
    hooks = InMemoryHooks()
    sink = ListSink(max_items=10, hooks=hooks)
    await sink.flush()
    assert sink.written == []
    assert not hooks.counters
    assert not hooks.observations


@pytest.mark.asyncio
async def test_failed_write_still_clears_the_batch() -> None:
    hooks = InMemoryHooks()
    sink = ListSink(max_items=10, hooks=hooks)
    sink.add("lost")
    sink.fail = SinkError("disk full")
    with pytest.raises(SinkError, match="disk full"):
        await sink.flush()
    # Not retried from memory: the items come back by replay from Kafka.
    assert len(sink) == 0
    assert not sink.full
    assert hooks.total("betrace_sink_rows_total") == 0
    sink.add("next")
    await sink.flush()
    assert sink.written == [["next"]]
    assert hooks.total("betrace_sink_rows_total", sink="list") == 1


@pytest.mark.asyncio
async def test_non_sink_errors_propagate_and_clear_too() -> None:
    sink = ListSink(max_items=2, hooks=InMemoryHooks())
    sink.add("x")
    sink.fail = RuntimeError("bug")
    with pytest.raises(RuntimeError, match="bug"):
        await sink.flush()
    assert len(sink) == 0


@pytest.mark.asyncio
async def test_full_sink_raises_backpressure_until_flushed() -> None:
    sink = ListSink(max_items=3, hooks=InMemoryHooks())
    sink.add("a")
    sink.add("b")
    assert (len(sink), sink.full) == (2, False)
    sink.add("c")
    assert (len(sink), sink.full) == (3, True)
    with pytest.raises(BackpressureError, match="max 3") as info:
        sink.add("d")
    assert info.value.retriable is True
    assert isinstance(info.value, SinkError)
    assert len(sink) == 3  # the rejected item was not buffered
    await sink.flush()
    assert sink.written == [["a", "b", "c"]]
    sink.add("d")
    assert len(sink) == 1


def test_one_large_item_may_overshoot_but_blocks_the_next() -> None:
    sink = ListSink(max_items=100, hooks=InMemoryHooks())
    sink.add("big table", size=250)
    assert len(sink) == 250
    assert sink.full
    with pytest.raises(BackpressureError):
        sink.add("small", size=1)


@pytest.mark.parametrize("max_items", [0, -1])
def test_max_items_must_be_positive(max_items: int) -> None:
    with pytest.raises(ValueError, match="max_items"):
        ListSink(max_items=max_items, hooks=InMemoryHooks())


@pytest.mark.asyncio
async def test_due_by_age_of_the_oldest_item_or_when_full() -> None:
    """A buffer is due once its first item is old enough; a flush starts the clock again."""
    sink = ListSink(max_items=3, hooks=InMemoryHooks())
    assert not sink.due(0.0)  # empty: never due
    sink.add("a")
    assert not sink.due(60.0)
    await asyncio.sleep(0.02)
    sink.add("b")  # a later item does not restart the clock
    assert sink.due(0.01)
    await sink.flush()
    assert not sink.due(0.0)
    sink.add("c", size=3)
    assert sink.due(60.0)  # full
