"""Admission rules of the receiver that need no broker: queue fill, pipeline backpressure, lag group."""

from __future__ import annotations

import asyncio

from betrace.config import load_settings
from betrace.config.sections import ReceiverSettings
from betrace.receiver import Receiver, ingest_group, pressure_from
from betrace.resilience.backpressure import Backpressure


def _receiver(**receiver: object) -> Receiver:
    cfg = load_settings(brokers="127.0.0.1:1")
    cfg = cfg.model_copy(update={"receiver": ReceiverSettings(lag_interval_s=0, **receiver)})
    return Receiver(cfg)


def test_queue_above_90_percent_refuses() -> None:
    receiver = _receiver(queue_size=10)
    receiver.in_flight = 8
    assert asyncio.run(receiver.refusal()) is None
    receiver.in_flight = 9
    refusal = asyncio.run(receiver.refusal())
    assert refusal is not None and refusal.status == 503
    assert "9/10" in refusal.reason


def test_pipeline_backpressure_refuses_until_it_falls_below_the_low_watermark() -> None:
    buffer: list[int] = []
    bp = Backpressure(high=0.9, low=0.5)
    bp.register("sink.duckdb", lambda: len(buffer) / 10)
    receiver = _receiver()
    receiver.pressure = pressure_from(bp)
    assert asyncio.run(receiver.refusal()) is None
    buffer.extend(range(9))
    refusal = asyncio.run(receiver.refusal())
    assert refusal is not None and "sink.duckdb is 90% full" in refusal.reason
    del buffer[3:]  # 30%: below the low watermark
    assert asyncio.run(receiver.refusal()) is None


def test_lag_group_is_the_group_that_runs_ingest() -> None:
    cfg = load_settings(brokers="127.0.0.1:1", app_id="bt")
    assert ingest_group(cfg) == "bt"
    assert ingest_group(cfg.model_copy(update={"stages": "downstream"})) == "bt.ingest"
    assert ingest_group(cfg.model_copy(update={"stages": "ingest"})) == "bt.ingest"
    named = cfg.model_copy(update={"receiver": ReceiverSettings(lag_group="other")})
    assert ingest_group(named) == "other"
