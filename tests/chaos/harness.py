"""Chaos harness: a workload with ground truth through real worker processes, a real fault, the checks.

Every scenario runs the same way::

    run = ChaosRun("kill9-x5", cfg, tmp_path)
    run.start_worker()
    run.load_in_background()          # the generated workload, paced, retried on broker errors
    run.fault_begins("kill -9")       # inject the fault right after this call
    ...
    run.fault_ends()                  # the fault is removed (process restarted, broker back, …)
    result = run.finish()             # drain, stop, verify, write one JSON line, assert zero loss

Definitions of the recorded figures (all wall-clock seconds from ``time.monotonic``):

* ``detect_s``: from ``fault_begins`` to the first *evidence* the monitor sees after it, sampling
  every 0.25 s: the worker's ``/health/ready`` answering anything but 200 (or not answering),
  the consumer-lag read failing, a worker exiting, or a scenario's own detector (for example a
  record arriving on the dead-letter topic). ``None`` when nothing showed the fault.
* ``recover_s``: from ``fault_ends`` until the pipeline is drained: the worker group has committed
  every record of the input, spans, traces and pending-signals topics (lag 0), checked again after
  the idle timeout so that the last traces have closed and their signals are out.
* ``peak_lag``: the largest total lag of the group over those four topics, sampled every 0.25 s
  from the start of the run.
* ``lost_*`` / ``duplicated_*``: spans (ground truth vs. the DuckDB files), signals (ground truth
  vs. the signals topic), and ``ledger_mismatch`` (|ledger counter - signals on the topic|, summed
  over tenant and rule). All must be 0.

Each result is appended as one JSON line to ``BETRACE_CHAOS_RESULTS`` (default
``.dev/chaos/results.jsonl``); ``tests/chaos/report.py`` renders them into docs/reliability.md.
With ``BETRACE_CHAOS_FULL=1`` faults last the issue's 30 s instead of a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from betrace.cli.demo import demo_settings
from betrace.config import Settings, load_settings
from betrace.config.sections import ReceiverSettings
from betrace.dev.worker import WorkerProcess
from betrace.errors import BetraceError, BrokerError
from betrace.metrics import InMemoryHooks
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.ledger import SignalLedger, open_ledger, tenant_ledger_path
from betrace.streams.admin import ensure_topics
from betrace.streams.lag import LagReader
from betrace.streams.topics import verdicts_topic
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import OtlpMessage, batch_messages
from tests.integration.helpers import read_topic

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
FULL = os.environ.get("BETRACE_CHAOS_FULL") == "1"
RESULTS_FILE = Path(os.environ.get("BETRACE_CHAOS_RESULTS", str(ROOT / ".dev" / "chaos" / "results.jsonl")))
# A SIGKILLed member leaves the group only when its session times out; faust's 60 s default
# would make every kill cost a minute. faust reads these from the environment.
WORKER_ENV = {"BROKER_SESSION_TIMEOUT": "8", "BROKER_HEARTBEAT_INTERVAL": "1"}
SAMPLE_S = 0.25
_LOG_EVIDENCE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")


def fault_seconds(short: float = 3.0) -> float:
    """How long a timed fault lasts: a few seconds in CI, the issue's 30 s with BETRACE_CHAOS_FULL=1."""
    return 30.0 if FULL else short


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chaos_settings(brokers: str, tmp_path: Path, name: str, *, replication_factor: int = 1) -> Settings:
    """Fresh topics, group and data directory on ``brokers`` (like the ``pipeline_settings`` fixture)."""
    run_id = f"chaos-{re.sub(r'[^A-Za-z0-9]+', '-', name)[:30]}-{uuid.uuid4().hex[:8]}"
    base = load_settings(brokers=brokers, rules_dir=ROOT / "config" / "rules")
    cfg = demo_settings(base, run_id, tmp_path / "data", idle_timeout_s=1.0)
    if replication_factor != 1:
        topics = cfg.topics.model_copy(update={"replication_factor": replication_factor})
        cfg = cfg.model_copy(update={"topics": topics})
    asyncio.run(ensure_topics(cfg))
    return cfg


def metric_total(port: int, name: str) -> float:
    """Sum of a metric's samples on a worker's /metrics (0 when unreachable or absent)."""
    value = metric_or_none(port, name)
    return value or 0.0


def metric_or_none(port: int, name: str) -> float | None:
    """Sum of a metric's samples on a worker's /metrics; None when the worker does not answer
    or has no sample of it yet (a worker that just started and has not reported its spools
    must not count as "spools empty": a dead worker's spooled writes may wait in its slot)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
    values = [float(m.group(1)) for m in pattern.finditer(text)]
    return sum(values) if values else None


@dataclass
class Evidence:
    at: float
    kind: str
    detail: str


@dataclass
class ScenarioResult:
    scenario: str
    fault: str
    fault_s: float
    spans: int
    expected_signals: int
    detect_s: float | None
    detected_by: str | None
    recover_s: float | None
    peak_lag: int
    lost_spans: int
    duplicated_spans: int
    lost_signals: int
    duplicated_signals: int
    unexpected_signals: int
    ledger_mismatch: int
    worker_restarts: int
    total_s: float
    full: bool = FULL
    notes: list[str] = field(default_factory=list)
    finished_at: str = ""

    @property
    def clean(self) -> bool:
        return not (
            self.lost_spans
            or self.duplicated_spans
            or self.lost_signals
            or self.duplicated_signals
            or self.unexpected_signals
            or self.ledger_mismatch
        )


def _stage_topics(cfg: Settings) -> list[str]:
    t = cfg.topics
    return [t.input, t.spans, t.traces, verdicts_topic(cfg)]


class Monitor(threading.Thread):
    """Samples lag, readiness and scenario detectors every 0.25 s in its own thread and loop."""

    def __init__(self, run: ChaosRun) -> None:
        super().__init__(name="chaos-monitor", daemon=True)
        self.run_ = run
        self.stop_event = threading.Event()
        self.evidence: list[Evidence] = []
        self.peak_lag = 0
        self.last_lag: int | None = None
        self.last_committed_all = False
        self._lock = threading.Lock()

    def first_after(self, t: float) -> Evidence | None:
        with self._lock:
            return next((e for e in self.evidence if e.at >= t), None)

    def _note(self, kind: str, detail: str) -> None:
        with self._lock:
            self.evidence.append(Evidence(time.monotonic(), kind, detail[:200]))

    def _ready(self) -> int | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.run_.web_port}/health/ready", timeout=1
            ) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return None

    def run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        reader: LagReader | None = None
        was_ready = False
        try:
            while not self.stop_event.is_set():
                reader = await self._sample_lag(reader)
                was_ready = await self._check(was_ready)
                await asyncio.sleep(SAMPLE_S)
        finally:  # also when a step raised: its connections must not outlive the test
            if reader is not None:
                with contextlib.suppress(Exception):
                    await reader.stop()

    async def _sample_lag(self, reader: LagReader | None) -> LagReader | None:
        """Record the lag; the reader to use next (a failed one is rebuilt: the broker may be gone)."""
        cfg = self.run_.cfg
        try:
            if reader is None:
                reader = LagReader(cfg.brokers, timeout_s=2.0)
                await asyncio.wait_for(reader.start(), 3)
            lags = await asyncio.wait_for(reader.lag(cfg.group_id, _stage_topics(cfg)), 3)
        except (BrokerError, TimeoutError, OSError) as exc:
            self._note("lag-read-failed", str(exc) or type(exc).__name__)
            if reader is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.stop(), 3)
            return None
        total = sum(p.lag for p in lags)
        self.last_lag = total
        self.peak_lag = max(self.peak_lag, total)
        self.last_committed_all = bool(lags) and all(
            p.committed is not None and p.lag == 0 for p in lags if p.end > 0
        )
        return reader

    async def _check(self, was_ready: bool) -> bool:
        """Readiness, the worker's exit and the scenario detectors; whether it has been ready."""
        status = await asyncio.to_thread(self._ready)
        if status == 200:
            was_ready = True
        elif was_ready:
            self._note("not-ready", f"/health/ready {status if status is not None else 'unreachable'}")
        worker = self.run_.worker
        if worker is not None and worker.proc is not None and not worker.alive:
            self._note("worker-exited", f"worker pid {worker.proc.pid} exited {worker.proc.returncode}")
        # A copy: the test thread adds detectors while this runs (fault_begins).
        for name, detector in list(self.run_.detectors.items()):
            try:
                fired = await asyncio.to_thread(detector)
                if fired:
                    self._note(name, fired if isinstance(fired, str) else "scenario detector fired")
            except BetraceError as exc:
                self._note(name, str(exc))
        return was_ready


class ChaosRun:
    """One scenario: workload, workers, monitor, fault timestamps and the final checks."""

    def __init__(
        self,
        scenario: str,
        cfg: Settings,
        tmp_path: Path,
        *,
        spans: int = 3_000,
        seed: int = 1,
        tenants: tuple[str, ...] = ("default", "acme"),
        spans_per_message: int = 40,
        redis: bool = False,
    ) -> None:
        self.scenario = scenario
        self.web_port = free_port()
        # Readiness must fail only for the fault, not for ordinary lag under load.
        self.cfg = cfg.model_copy(
            update={
                "web_port": self.web_port,
                "lag_threshold": 10**9,
                "lag_interval_s": 1.0,
                "checkpoint_interval_s": 0.5,
                "receiver": ReceiverSettings(enabled=False),
                # Without a Redis of its own the cache tier's warnings would read as fault evidence.
                "cache": cfg.cache if redis else cfg.cache.model_copy(update={"enabled": False}),
                # Breakers try again after 5 s in CI (30 s, the default, with BETRACE_CHAOS_FULL=1).
                "resilience": cfg.resilience.model_copy(
                    update={"breaker_reset_timeout_seconds": 30.0 if FULL else 5.0}
                ),
            }
        )
        self.tmp_path = tmp_path
        self.gen = TraceGenerator(tenants=tenants, violation_rate=0.2, seed=seed)
        self.messages: list[OtlpMessage] = list(
            batch_messages(self.gen.traces(spans), spans_per_message=spans_per_message)
        )
        self.rng = random.Random(seed)
        self.workers: list[WorkerProcess] = []
        # A detector returns False/"" while it sees nothing, else True or a description.
        self.detectors: dict[str, Callable[[], bool | str]] = {}
        self.notes: list[str] = []
        self.fault = ""
        self.fault_start: float | None = None
        self.fault_end: float | None = None
        self.restarts = 0
        self.started = time.monotonic()
        self.monitor = Monitor(self)
        self.monitor.start()
        self._loader: threading.Thread | None = None
        self._load_error: list[BaseException] = []

    # ------------------------------------------------------------------ workers

    @property
    def worker(self) -> WorkerProcess | None:
        return self.workers[-1] if self.workers else None

    def start_worker(self, *, wait_ready: bool = True) -> WorkerProcess:
        worker = WorkerProcess(
            self.cfg, self.tmp_path / f"worker{len(self.workers) + 1}.log", extra_env=dict(WORKER_ENV)
        )
        self.workers.append(worker)
        worker.start()
        if wait_ready:
            self.wait_ready()
        return worker

    def kill_worker(self) -> None:
        """``kill -9`` of the worker's process group."""
        if self.worker is not None:
            self.worker.kill()

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.monitor._ready() == 200:
                return
            self._supervise()
            time.sleep(0.2)
        msg = f"worker not ready in {timeout_s:.0f}s:\n{self.worker.log_tail() if self.worker else ''}"
        raise AssertionError(msg)

    def _supervise(self) -> None:
        """Restart a worker that exited, as a process supervisor (systemd, Kubernetes) would."""
        worker = self.worker
        if worker is not None and worker.proc is not None and not worker.alive:
            self.restarts += 1
            self.notes.append(f"worker exited with {worker.proc.returncode}; restarted")
            logger.warning("worker exited (%s); restarting:\n%s", worker.proc.returncode, worker.log_tail(15))
            self.start_worker(wait_ready=False)

    # ------------------------------------------------------------------ load

    def produce(self, messages: Sequence[OtlpMessage], *, retry_s: float = 120.0) -> None:
        """Produce, retrying on broker errors (a retry may duplicate records; the sinks dedupe)."""
        deadline = time.monotonic() + retry_s
        while True:
            try:
                asyncio.run(_produce(self.cfg, list(messages)))
                return
            except BrokerError as exc:
                if time.monotonic() > deadline:
                    raise
                self.notes.append(f"producer retried after: {str(exc)[:80]}")
                time.sleep(0.5)

    def load_in_background(self, messages: Sequence[OtlpMessage] | None = None, *, chunks: int = 10) -> None:
        """Produce ``messages`` (default: the whole workload) in ``chunks`` paced 0.3 s apart."""
        todo = list(self.messages if messages is None else messages)
        size = max(1, len(todo) // chunks)

        def run() -> None:
            try:
                for i in range(0, len(todo), size):
                    self.produce(todo[i : i + size])
                    time.sleep(0.3)
            except BaseException as exc:
                self._load_error.append(exc)

        self._loader = threading.Thread(target=run, name="chaos-load", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout_s: float = 180.0) -> None:
        if self._loader is not None:
            self._loader.join(timeout_s)
            assert not self._loader.is_alive(), "the load did not finish"
        if self._load_error:
            raise self._load_error[0]

    # ------------------------------------------------------------------ the fault

    def fault_begins(self, what: str) -> None:
        self.fault = self.fault or what
        if self.fault_start is None:
            self.fault_start = time.monotonic()
            # Log evidence: a warning or error the worker writes after this moment.
            offsets = {w.log_file: w.log_file.stat().st_size for w in self.workers if w.log_file.exists()}
            self.detectors.setdefault("worker-log", lambda: self._log_evidence(offsets))

    def _log_evidence(self, offsets: dict[Path, int]) -> str:
        # Only workers running when the fault began: a fresh worker's start-up warnings are no evidence.
        for log_file, offset in offsets.items():
            with log_file.open("rb") as f:
                f.seek(offset)
                for line in f.read().decode(errors="replace").splitlines():
                    if _LOG_EVIDENCE.search(line):
                        return line[24:].strip()  # without the timestamp
        return ""

    def fault_ends(self) -> None:
        self.fault_end = time.monotonic()

    def drain(self, timeout_s: float = 180.0) -> float:
        """Until every stage topic is committed and no trace is open, again after the idle
        timeout; the time it took."""
        deadline = time.monotonic() + timeout_s
        self.wait_loaded(timeout_s)
        for rounds in range(2):
            while True:
                self._supervise()
                if self._settled():
                    # Confirmed by a later reading, not one taken before the last records arrived.
                    time.sleep(SAMPLE_S * 2.5)
                    if self._settled():
                        break
                if time.monotonic() > deadline:
                    tail = f"{self.worker.log_tail()}\n{self.worker.dump_state()}" if self.worker else ""
                    msg = f"{self.scenario}: pipeline did not drain in {timeout_s:.0f}s:\n{tail}"
                    raise AssertionError(msg)
                time.sleep(SAMPLE_S)
            if rounds == 0:
                time.sleep(self.cfg.idle_timeout_s + 1.5)  # the last traces close on the idle timer
        return time.monotonic()

    def _settled(self) -> bool:
        """Nothing left anywhere: committed, spools replayed, and a worker that has restored
        its state (a restarted worker's lag reads zero while its restored traces are open)."""
        return (
            self.monitor.last_committed_all
            and self.monitor.last_lag == 0
            and self._spool_empty()
            and self.monitor._ready() == 200
            and metric_or_none(self.web_port, "betrace_live_traces") == 0
        )

    def _spool_empty(self) -> bool:
        """Writes a sink spooled during the fault are acknowledged on Kafka but not yet stored:
        drained means replayed too (``betrace_spool_depth`` 0 on every spool)."""
        return metric_or_none(self.web_port, "betrace_spool_depth") == 0

    # ------------------------------------------------------------------ checks

    def read_topic(self, topic: str) -> list[Any]:
        return read_topic(self.cfg, topic)

    def _ledger_counts(self, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Per-rule counters, read from each tenant's ledger (as ``betrace signals count`` does)."""
        counts: dict[tuple[str, str], int] = {}
        for tenant in sorted({t for t, _ in pairs}):
            embedded = not self.cfg.tigerbeetle_addresses
            if embedded and not tenant_ledger_path(self.cfg.data_dir, tenant).exists():
                counts.update({(t, r): 0 for t, r in pairs if t == tenant})  # nothing ever recorded
                continue
            ledger = SignalLedger(
                open_ledger(
                    self.cfg.data_dir,
                    self.cfg.tigerbeetle_addresses,
                    cluster_id=self.cfg.tigerbeetle_cluster_id,
                    read_only=True,
                    tenant=tenant,
                ),
                hooks=InMemoryHooks(),
            )
            try:
                for t, r in pairs:
                    if t == tenant:
                        counts[(t, r)] = sum(c.signals for c in ledger.counts(t, r))
            finally:
                ledger.shutdown()
        return counts

    def finish(self, *, drain_timeout_s: float = 180.0) -> ScenarioResult:
        """Drain, stop the worker, verify against the ground truth, record, and assert zero loss."""
        try:
            drained_at = self.drain(drain_timeout_s)
            signal_docs = [orjson.loads(r.value) for r in self.read_topic(self.cfg.topics.signals)]
        finally:
            self.monitor.stop_event.set()
            self.monitor.join(10)
            for worker in self.workers:
                if worker.alive:
                    code = worker.stop()
                    if code != 0:
                        self.notes.append(f"worker stop exit code {code}")
        got = [(d["tenant"], d["rule_id"], d["trace_id"]) for d in signal_docs]
        expected = self.gen.truth.expected
        counts = _stored(self.cfg)
        distinct = sum(c[1] for c in counts.values())
        rows = sum(c[0] for c in counts.values())
        per_rule = Counter((t, r) for t, r, _ in set(got))
        ledger = self._ledger_counts({(t, r) for t, r, _ in expected | set(got)})
        evidence = self.monitor.first_after(self.fault_start) if self.fault_start is not None else None
        result = ScenarioResult(
            scenario=self.scenario,
            fault=self.fault,
            fault_s=round((self.fault_end or self.fault_start or 0) - (self.fault_start or 0), 2),
            spans=self.gen.truth.spans,
            expected_signals=len(expected),
            detect_s=round(evidence.at - self.fault_start, 2) if evidence and self.fault_start else None,
            detected_by=f"{evidence.kind}: {evidence.detail}" if evidence else None,
            recover_s=round(drained_at - self.fault_end, 2) if self.fault_end is not None else None,
            peak_lag=self.monitor.peak_lag,
            lost_spans=max(0, self.gen.truth.spans - distinct),
            duplicated_spans=rows - distinct,
            lost_signals=len(expected - set(got)),
            duplicated_signals=len(got) - len(set(got)),
            unexpected_signals=len(set(got) - expected),
            ledger_mismatch=sum(
                abs(ledger.get(k, 0) - per_rule.get(k, 0)) for k in ledger.keys() | per_rule.keys()
            ),
            worker_restarts=self.restarts,
            total_s=round(time.monotonic() - self.started, 1),
            notes=sorted(set(self.notes))[:10],
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        dup_ids = Counter(d.get("signal_id") for d in signal_docs)
        twice = sorted(k for k, n in Counter(got).items() if n > 1)
        if twice:
            same_id = all(
                dup_ids[d.get("signal_id")] > 1
                for d in signal_docs
                if (d["tenant"], d["rule_id"], d["trace_id"]) in twice
            )
            how = "each time with the same signal_id" if same_id else "with different signal_ids"
            result.notes.append(f"{len(twice)} signal(s) published more than once, {how}: {twice[:2]}")
        missing = sorted(expected - set(got))[:3]
        if missing:
            result.notes.append(f"missing signals (tenant, rule, trace): {missing}")
        record(result)
        assert result.clean, f"{self.scenario}: data lost or duplicated: {asdict(result)}"
        return result


async def _produce(cfg: Settings, messages: list[OtlpMessage]) -> None:
    """As ``betrace.workload.producer.produce`` (acks=all), but the client is closed on every path:
    while the broker is down, start() fails and an unclosed producer would leak."""
    producer = AIOKafkaProducer(
        bootstrap_servers=cfg.brokers, acks="all", linger_ms=5, request_timeout_ms=10_000
    )
    try:
        await asyncio.wait_for(producer.start(), 10)
        futures = [
            await producer.send(
                cfg.topics.input, value=m.value, key=m.key, headers=[(cfg.tenant_header, m.tenant.encode())]
            )
            for m in messages
        ]
        await asyncio.gather(*futures)
    except (KafkaError, TimeoutError, OSError) as exc:
        msg = f"producing to {cfg.brokers} failed: {type(exc).__name__}: {exc}"
        raise BrokerError(msg) from None
    finally:
        await producer.stop()


def _stored(cfg: Settings) -> dict[str, tuple[int, int]]:
    store = TenantStore(cfg.data_dir, read_only=True)
    try:
        return store.span_counts()
    finally:
        store.close()


def record(result: ScenarioResult) -> None:
    """Append one JSON line to the results file."""
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS_FILE.open("a") as f:
        f.write(json.dumps(asdict(result), sort_keys=True) + "\n")
