"""``betrace demo``: broker, worker, synthetic load, and a check against the ground truth."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from rich.table import Table

from betrace.api.signals import tail_signals
from betrace.cli.common import console, fail_clearly, out, project_root, settings
from betrace.cli.progress import produce_with_progress
from betrace.config import Settings, TopicSettings
from betrace.dev.kafka import KafkaDevError, LocalKafka
from betrace.dev.redis import project_redis
from betrace.dev.worker import WorkerProcess
from betrace.errors import BetraceError, BrokerError, DevEnvironmentError
from betrace.sinks.duckdb_store import TenantStore
from betrace.streams.admin import ensure_topics
from betrace.streams.lag import group_lag, wait_until_stable


@dataclass
class DemoReport:
    spans: int
    expected: set[tuple[str, str, str]]
    received: list[dict[str, Any]] = field(default_factory=list)
    processing_s: float = 0.0
    stored_spans: int = 0
    stored_distinct: int = 0

    @property
    def detected(self) -> set[tuple[str, str, str]]:
        return {(d["tenant"], d["rule_id"], d["trace_id"]) for d in self.received}

    @property
    def ok(self) -> bool:
        return (
            self.detected == self.expected
            and len(self.received) == len(self.detected)
            and self.stored_spans == self.spans == self.stored_distinct
        )


def demo_settings(base: Settings, run_id: str, data_root: Path, idle_timeout_s: float) -> Settings:
    """Fresh topics, consumer group and data files per run, so runs never mix."""
    prefix = f"demo.{run_id}."
    topics = TopicSettings(
        input=prefix + "otlp_spans",
        spans=prefix + "spans",
        traces=prefix + "traces",
        store=prefix + "store",
        signals=prefix + "signals",
        rules=prefix + "rules",
        dlq=prefix + "dlq",
        partitions=base.topics.partitions,
    )
    return base.model_copy(
        update={
            "topics": topics,
            "app_id": f"betrace-demo-{run_id}",
            "data_dir": data_root / run_id,
            "idle_timeout_s": idle_timeout_s,
            "web_port": 0,
        }
    )


async def _wait_consumed(cfg: Settings, topics: list[str], timeout_s: float) -> float:
    """Seconds until the worker group has committed every record of ``topics``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            lags = await group_lag(cfg.brokers, cfg.app_id, topics)
        except BrokerError:
            lags = []  # the group has no coordinator until the worker joins it
        if lags and all(lag.lag == 0 for lag in lags):
            return time.monotonic() - started
        await asyncio.sleep(0.25)
    msg = f"the worker did not consume {', '.join(topics)} within {timeout_s:.0f}s"
    raise BetraceError(msg)


def _count_stored(cfg: Settings) -> tuple[int, int]:
    store = TenantStore(cfg.data_dir, read_only=True)
    try:
        counts = store.span_counts().values()
    finally:
        store.close()
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def demo(
    spans: Annotated[int, typer.Option("--spans", "-n", min=1, help="Spans to produce.")] = 100_000,
    tenants: Annotated[
        str, typer.Option(help="Comma-separated tenants (each has rules in config/rules/).")
    ] = "default,acme",
    violation_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of violating traces.")
    ] = 0.05,
    idle_timeout: Annotated[
        float, typer.Option(min=0.5, help="Seconds of inactivity that close a trace.")
    ] = 2.0,
    external: Annotated[
        bool,
        typer.Option("--external", help="Use BETRACE_BROKERS as is instead of starting the local broker."),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds of processing.")] = 300.0,
) -> None:
    """Start a local broker and a worker, produce synthetic traces, check every signal.

    Prints expected vs detected signals, what was stored in DuckDB and the
    throughput. Exits 0 only if the detected signals equal the ground truth and
    every span is stored exactly once. The broker and the local Redis (the
    cache tier) keep running afterwards ('betrace dev down' stops them).
    """
    base = settings()
    root = project_root()
    with fail_clearly():
        if not external:
            kafka = LocalKafka(root)
            console.print("starting the local Kafka broker (the first run downloads it with Maven)…")
            try:
                kafka.up()
            except KafkaDevError as exc:
                raise DevEnvironmentError(str(exc)) from None
            base = base.model_copy(update={"brokers": kafka.bootstrap_servers})
            if base.cache.enabled:
                server = project_redis(root)
                console.print(f"starting the local Redis cache tier on port {server.port}…")
                server.start()
                cache = base.cache.model_copy(update={"url": SecretStr(server.url)})
                base = base.model_copy(update={"cache": cache})
        run_id = time.strftime("%Y%m%d-%H%M%S")
        cfg = demo_settings(base, run_id, root / ".dev" / "demo", idle_timeout)
        asyncio.run(ensure_topics(cfg))
        worker = WorkerProcess(cfg, root / ".dev" / "demo" / f"{run_id}.worker.log")
        worker.start()
        console.print("waiting for the worker to join its consumer group…")
        if not asyncio.run(wait_until_stable(cfg.brokers, cfg.group_id, timeout_s=120)):
            worker.stop()
            msg = (
                f"the worker did not join its consumer group in 120s; its log ends with:\n{worker.log_tail()}"
            )
            raise BetraceError(msg)
        try:
            report = _run(cfg, worker, spans, tenants, violation_rate, timeout)
        finally:
            worker.stop()
        report.stored_spans, report.stored_distinct = _count_stored(cfg)
    _print_report(cfg, report)
    if not report.ok:
        raise typer.Exit(1)


def _run(
    cfg: Settings, worker: WorkerProcess, spans: int, tenants: str, violation_rate: float, timeout: float
) -> DemoReport:
    tenant_list = tuple(t.strip() for t in tenants.split(",") if t.strip())
    started = time.monotonic()
    stats, generator = produce_with_progress(
        cfg, spans=spans, tenants=tenant_list, violation_rate=violation_rate, seed=int(started)
    )
    report = DemoReport(spans=stats.spans, expected=generator.truth.expected)
    console.print(
        f"produced {stats.spans:,} spans at {stats.spans_per_s:,.0f} spans/s; waiting for the worker…"
    )

    async def follow() -> None:
        await _wait_consumed(cfg, [cfg.topics.input], timeout)
        report.processing_s = time.monotonic() - started
        await tail_signals(
            cfg,
            report.received.append,
            from_beginning=True,
            timeout_s=timeout,
            idle_exit_s=cfg.idle_timeout_s + 5.0,
            stop=lambda: not worker.alive or _settled(report),
        )

    asyncio.run(follow())
    if not worker.alive:
        msg = f"the worker died; its log ends with:\n{worker.log_tail()}"
        raise BetraceError(msg)
    # Let the last commits land before stopping, so a replay finds nothing new.
    time.sleep(1.5)
    return report


def _settled(report: DemoReport) -> bool:
    return report.detected >= report.expected


def _print_report(cfg: Settings, report: DemoReport) -> None:
    table = Table(title="BeTrace demo", show_header=True)
    table.add_column("check")
    table.add_column("expected", justify="right")
    table.add_column("observed", justify="right")
    table.add_column("", justify="center")
    detected = report.detected

    def row(name: str, want: object, got: object, good: bool) -> None:
        table.add_row(
            name,
            f"{want:,}" if isinstance(want, int) else str(want),
            f"{got:,}" if isinstance(got, int) else str(got),
            "[green]✓[/]" if good else "[red]✗[/]",
        )

    row("signals (rule violations)", len(report.expected), len(detected), detected == report.expected)
    row("missing signals", 0, len(report.expected - detected), not report.expected - detected)
    row("unexpected signals", 0, len(detected - report.expected), not detected - report.expected)
    row("duplicate signals", 0, len(report.received) - len(detected), len(report.received) == len(detected))
    row("spans stored in DuckDB", report.spans, report.stored_spans, report.stored_spans == report.spans)
    row("distinct stored spans", report.spans, report.stored_distinct, report.stored_distinct == report.spans)
    out.print(table)
    rate = report.spans / report.processing_s if report.processing_s else 0.0
    out.print(
        f"throughput: {report.spans:,} spans produced and ingested in {report.processing_s:.1f}s "
        f"= {rate:,.0f} spans/s end to end (includes producing; see benchmarks/ for the pipeline alone)"
    )
    lat = sorted(
        datetime.fromisoformat(d["detected_at"]).timestamp() * 1000 - d["source_produced_ms"]
        for d in report.received
        if d.get("source_produced_ms")
    )
    if lat:
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        out.print(
            f"produce-to-signal latency: p50 {p50:,.0f} ms, p99 {p99:,.0f} ms "
            f"(includes the {cfg.idle_timeout_s:g}s idle timeout that closes a trace)"
        )
    out.print(f"data: {cfg.data_dir}  topics: {cfg.topics.input} … {cfg.topics.signals}")
    out.print("[green]demo passed[/]" if report.ok else "[red]demo FAILED[/]")
