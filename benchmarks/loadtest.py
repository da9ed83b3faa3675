"""Rate-driven load test of the whole pipeline through the real broker.

Starts N worker processes in one consumer group (``--workers``; with
``--split-ingest`` they run the downstream stages and ``--ingest-workers``
processes decode in their own group), writes 20 rules per tenant for 10
tenants, then drives load from several producer processes (each with its own
aiokafka producer and pre-encoded OTLP protobuf messages with ground truth)
at a target total rate for a duration. Every second it samples produced and
consumed spans (committed offsets), lag per consumer group, RSS and CPU of
each worker (from /proc), produce-to-signal latency (``source_produced_ms``
of each signal, also split at the signal's candidate record on
``betrace.signals.pending``: the stages before the signal sink, then the sink)
and rule-evaluation time per batch (the workers'
``betrace_evaluate_seconds`` histogram). At the end it checks exactly-once
(stored spans == produced, signals == ground truth, ledger transfers ==
signals), prints a summary and a compact table, and writes ``result.json``
and ``loadtest.png`` to the output directory.

    .venv/bin/python benchmarks/loadtest.py --rate 50000 --duration 60 --workers 1
    .venv/bin/python benchmarks/loadtest.py --rate 80000 --duration 300 --workers 2 --split-ingest
    .venv/bin/python benchmarks/loadtest.py --smoke            # a few seconds at a low rate (CI)
    .venv/bin/betrace bench --rate 50000 --duration 60         # the same through the CLI

Exit status: 0 when the run completed and exactly-once held (and, outside
--smoke, the producers reached the target rate); 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import aiohttp  # noqa: E402
from aiokafka import AIOKafkaConsumer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402
from harness import probes, report  # noqa: E402
from harness.producers import ProducerPlan, ProducerResult, producer_main, read_result  # noqa: E402
from harness.rules import check_rules_against_workload, tenant_names, write_rule_files  # noqa: E402

from betrace.cli.demo import demo_settings  # noqa: E402
from betrace.config import Settings, load_settings  # noqa: E402
from betrace.dev.worker import WorkerProcess  # noqa: E402
from betrace.errors import BrokerError  # noqa: E402
from betrace.streams.admin import ensure_topics  # noqa: E402
from betrace.streams.lag import LagReader  # noqa: E402
from betrace.streams.topics import verdicts_topic  # noqa: E402

#: Why traces closed, read from the workers' ``betrace_traces_closed_total`` (the ordinary causes).
CLOSE_CAUSES = ("idle", "root", "max_age")
SMOKE = {"rate": 3000.0, "duration": 5.0, "producers": 2, "workers": 1, "drain_timeout": 60.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=50_000, help="target spans/s over all producers")
    p.add_argument("--duration", type=float, default=60, help="seconds of load")
    p.add_argument("--producers", type=int, default=2, help="producer processes")
    p.add_argument("--workers", type=int, choices=(1, 2, 4), default=1, help="worker processes in the group")
    p.add_argument("--split-ingest", action="store_true", help="workers run downstream; ingest separately")
    p.add_argument("--ingest-workers", type=int, default=1, help="ingest processes with --split-ingest")
    p.add_argument("--tenants", type=int, default=10)
    p.add_argument("--rules-per-tenant", type=int, default=20)
    p.add_argument("--partitions", type=int, default=None, help="default: max(4, workers)")
    p.add_argument("--spans-per-message", type=int, default=200)
    p.add_argument("--violation-rate", type=float, default=0.05)
    p.add_argument("--idle-timeout", type=float, default=0.5, help="seconds that close a trace")
    p.add_argument(
        "--root-close-delay",
        type=float,
        default=0.0,
        help="seconds without a span that close a trace once its root arrived (0: the idle timeout only)",
    )
    p.add_argument("--pool-spans", type=int, default=300_000, help="pre-encoded spans per producer")
    p.add_argument("--warmup-pct", type=float, default=20.0, help="RSS growth is measured after this")
    p.add_argument("--min-produce-ratio", type=float, default=0.95, help="achieved/target below this fails")
    p.add_argument("--drain-timeout", type=float, default=180.0, help="seconds to wait for the backlog")
    p.add_argument("--brokers", default=None, help="use this cluster instead of starting the local broker")
    p.add_argument("--broker-pid", type=int, default=None, help="sample this broker process's CPU too")
    p.add_argument("--out", type=Path, default=None, help="result directory (default .dev/loadtest/<run>)")
    p.add_argument("--keep-data", action="store_true", help="keep the DuckDB files after the checks")
    p.add_argument("--py-spy", type=Path, default=None, help="record a flame graph SVG of one worker")
    p.add_argument("--py-spy-target", default="w0", help="worker to profile (w0.., ingest0..)")
    p.add_argument("--smoke", action="store_true", help="a few seconds at a low rate; no timing checks")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.rate <= 0 or args.duration <= 0 or args.producers < 1 or args.ingest_workers < 1:
        p.error("--rate, --duration, --producers and --ingest-workers must be positive")
    args.partitions = args.partitions or max(4, args.workers, args.ingest_workers if args.split_ingest else 1)
    if args.partitions < args.workers:
        p.error(f"--partitions {args.partitions} < --workers {args.workers}: some workers would be idle")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def git_commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return out + ("+dirty" if dirty else "")


class LoadTest:
    def __init__(self, args: argparse.Namespace, base: Settings, broker_pid: int | None) -> None:
        self.args = args
        self.run_id = f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        self.out: Path = args.out or ROOT / ".dev" / "loadtest" / self.run_id
        self.out.mkdir(parents=True, exist_ok=True)
        self.data_root = ROOT / ".dev" / "loadtest" / "data" / self.run_id
        self.tenants = tenant_names(args.tenants)
        rules_dir = write_rule_files(self.out / "rules", self.tenants, args.rules_per_tenant)
        cfg = demo_settings(base, self.run_id, self.data_root, args.idle_timeout)
        self.cfg = cfg.model_copy(
            update={
                "topics": cfg.topics.model_copy(update={"partitions": args.partitions}),
                "rules_dir": rules_dir,
                "log_level": "WARNING",
                "root_close_delay_s": args.root_close_delay,
            }
        )
        self.broker_pid = broker_pid
        stage = "downstream" if args.split_ingest else "all"
        self.workers: dict[str, WorkerProcess] = {}
        self.web_ports: dict[str, int] = {}
        roles = [(f"w{i}", stage) for i in range(args.workers)]
        if args.split_ingest:
            roles += [(f"ingest{i}", "ingest") for i in range(args.ingest_workers)]
        for name, role in roles:
            port = free_port()
            wcfg = self.cfg.model_copy(
                # One data directory, as in a deployment: each tenant file has one owner at a time.
                update={"stages": role, "data_dir": self.data_root, "web_port": port}
            )
            self.workers[name] = WorkerProcess(wcfg, self.out / f"{name}.log")
            self.web_ports[name] = port
        self.downstream = [f"w{i}" for i in range(args.workers)]
        topics = self.cfg.topics
        downstream_topics = [topics.spans, topics.store, topics.traces, verdicts_topic(self.cfg)]
        if args.split_ingest:
            self.groups = {self.cfg.app_id: downstream_topics, f"{self.cfg.app_id}.ingest": [topics.input]}
            self.members = {self.cfg.app_id: args.workers, f"{self.cfg.app_id}.ingest": args.ingest_workers}
            self.input_group = f"{self.cfg.app_id}.ingest"
        else:
            self.groups = {self.cfg.app_id: [topics.input, *downstream_topics]}
            self.members = {self.cfg.app_id: args.workers}
            self.input_group = self.cfg.app_id
        self.samples: list[dict[str, Any]] = []
        self.signals: list[dict[str, Any]] = []  # {"t", "latency_ms", "key", "signal_id", "ts", "source_ms"}
        #: signal id -> Kafka timestamp of its first candidate record (``betrace.signals.pending``).
        self.candidates: dict[str, int] = {}
        self.start = 0.0
        self.failures: list[str] = []
        self.warnings: list[str] = []

    # --- processes -------------------------------------------------------

    def start_producers(self) -> tuple[list[Any], list[Any], Any, list[Any], list[ProducerPlan]]:
        ctx = multiprocessing.get_context("spawn")
        go = ctx.Value("d", 0.0, lock=False)
        args = self.args
        share = args.rate / args.producers
        pool = int(min(args.pool_spans, share * args.duration * 1.05 + args.spans_per_message))
        procs, readies, shared, plans = [], [], [], []
        for i in range(args.producers):
            plan = ProducerPlan(
                index=i,
                brokers=self.cfg.brokers,
                topic=self.cfg.topics.input,
                tenant_header=self.cfg.tenant_header,
                tenants=self.tenants,
                rate=share,
                duration_s=args.duration,
                pool_spans=max(pool, args.spans_per_message),
                spans_per_message=args.spans_per_message,
                violation_rate=args.violation_rate,
                seed=1000 + i,
                result_file=self.out / f"producer{i}.json",
            )
            ready = ctx.Event()
            counters = ctx.Array("q", 2, lock=False)
            proc = ctx.Process(target=producer_main, args=(plan, ready, go, counters), daemon=True)
            proc.start()
            procs.append(proc)
            readies.append(ready)
            shared.append(counters)
            plans.append(plan)
        return procs, readies, go, shared, plans

    async def wait_for_groups(self, timeout_s: float = 180.0) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.cfg.brokers)
        await admin.start()
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for name, worker in self.workers.items():
                    if not worker.alive:
                        msg = f"worker {name} died during start-up:\n{worker.log_tail()}"
                        raise SystemExit(msg)
                states = {}
                try:
                    for group in self.members:  # one group per request: aiokafka mis-decodes several
                        for response in await admin.describe_consumer_groups([group]):
                            for g in response.to_object().get("groups", []):
                                states[g["group"]] = (g.get("state"), len(g.get("members", [])))
                except Exception:  # the coordinator is not there before the first join
                    states = {}
                if all(states.get(g) == ("Stable", n) for g, n in self.members.items()):
                    return
                await asyncio.sleep(0.5)
        finally:
            await admin.close()
        msg = f"the consumer groups did not become stable with {self.members} members in {timeout_s:.0f}s"
        raise SystemExit(msg)

    # --- sampling --------------------------------------------------------

    async def follow_signals(self, stop: asyncio.Event) -> None:
        """Signals and their candidates: the split shows whether the sink or the stages before it wait."""
        pending = verdicts_topic(self.cfg)
        consumer = AIOKafkaConsumer(
            self.cfg.topics.signals, pending, bootstrap_servers=self.cfg.brokers, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            while not stop.is_set():
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    for r in records:
                        doc = json.loads(r.value)
                        if tp.topic == pending:
                            self.candidates.setdefault(doc["signal_id"], r.timestamp)
                            continue
                        self.signals.append(
                            {
                                "t": time.time() - self.start,
                                "latency_ms": r.timestamp - doc["source_produced_ms"],
                                "key": (doc["tenant"], doc["rule_id"], doc["trace_id"]),
                                "signal_id": doc["signal_id"],
                                "ts": r.timestamp,
                                "source_ms": doc["source_produced_ms"],
                            }
                        )
        finally:
            await consumer.stop()

    async def scrape(self, session: aiohttp.ClientSession, name: str) -> str | None:
        try:
            url = f"http://127.0.0.1:{self.web_ports[name]}/metrics"
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=0.8)) as resp:
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def sample_loop(self, stop: asyncio.Event, shared: list[Any], producer_pids: list[int]) -> None:
        reader = LagReader(self.cfg.brokers)
        await reader.start()
        meters = {n: probes.CpuMeter(w.proc.pid) for n, w in self.workers.items() if w.proc is not None}
        pmeters = [probes.CpuMeter(pid) for pid in producer_pids]
        bmeter = probes.CpuMeter(self.broker_pid) if self.broker_pid else None
        eval_hist: dict[str, dict[float, float]] = {}
        stored_rows: dict[str, float] = {}
        closed: dict[str, dict[str, float]] = {}
        prev = {"t": 0.0, "produced": 0, "consumed": 0.0, "stored": 0.0, "hist": {}, "sig": 0}
        await asyncio.sleep(max(0.0, self.start - time.time()))
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                wall = time.time()
                t = wall - self.start
                produced = sum(int(c[0]) for c in shared)
                messages = sum(int(c[1]) for c in shared)
                lag: dict[str, int | None] = {}
                committed_input = None
                for group, topics in self.groups.items():
                    try:
                        parts = await reader.lag(group, topics)
                        lag[group] = sum(p.lag for p in parts)
                        if group == self.input_group:
                            committed_input = sum(
                                p.committed or 0 for p in parts if p.topic == self.cfg.topics.input
                            )
                    except BrokerError:
                        lag[group] = None
                per_record = produced / messages if messages else 0.0
                consumed = (committed_input or 0) * per_record
                texts = await asyncio.gather(*(self.scrape(session, n) for n in self.downstream))
                for name, text in zip(self.downstream, texts, strict=True):
                    if text is not None:
                        eval_hist[name] = probes.parse_histogram(text, "betrace_evaluate_seconds")
                        stored_rows[name] = probes.parse_counter(
                            text, "betrace_sink_rows_total", 'sink="duckdb"'
                        )
                        closed[name] = {
                            c: probes.parse_counter(text, "betrace_traces_closed_total", f'cause="{c}"')
                            for c in CLOSE_CAUSES
                        }
                hist = probes.add_histograms(eval_hist.values())
                stored = sum(stored_rows.values())
                dt = max(t - prev["t"], 1e-6)
                window = [s["latency_ms"] for s in self.signals[prev["sig"] :]]
                window.sort()
                interval_hist = probes.diff_histogram(hist, prev["hist"])
                eval_p99 = probes.histogram_quantile(interval_hist, 0.99)
                sample = {
                    "t": round(t, 2),
                    "phase": "load" if t <= self.args.duration else "drain",
                    "produced": produced,
                    "consumed": round(consumed),
                    "stored": round(stored),
                    "produce_rate": (produced - prev["produced"]) / dt,
                    "consume_rate": (consumed - prev["consumed"]) / dt,
                    "store_rate": (stored - prev["stored"]) / dt,
                    "lag": lag,
                    "lag_total": sum(v for v in lag.values() if v is not None) if lag else None,
                    "signals": len(self.signals),
                    "latency_p50_ms": probes.percentile(window, 0.5),
                    "latency_p99_ms": probes.percentile(window, 0.99),
                    "evaluate_p99_ms": eval_p99 * 1000 if eval_p99 is not None else None,
                    "workers": {
                        n: {
                            "rss": probes.rss_bytes(m.pid),
                            "cpu_pct": m.sample(wall),
                            "threads": probes.thread_count(m.pid),
                            "duckdb_files": probes.open_files(m.pid, ".duckdb"),
                        }
                        for n, m in meters.items()
                    },
                    "producers_cpu_pct": [m.sample(wall) for m in pmeters],
                    "broker_cpu_pct": bmeter.sample(wall) if bmeter else None,
                }
                self.samples.append(sample)
                prev = {"t": t, "produced": produced, "consumed": consumed, "stored": stored, "hist": hist}
                prev["sig"] = len(self.signals)
                self.eval_hist_total = hist
                self.closed_by = {c: round(sum(w[c] for w in closed.values())) for c in CLOSE_CAUSES}
                await asyncio.sleep(max(0.0, 1.0 - (time.time() - wall)))
        await reader.stop()

    async def drained(self, expected: set[tuple[str, str, str]]) -> bool:
        last = self.samples[-1] if self.samples else None
        if last is None or any(v is None or v > 0 for v in last["lag"].values()):
            return False
        return {s["key"] for s in self.signals} >= expected

    # --- the run ---------------------------------------------------------

    async def run_async(
        self, shared: list[Any], go: Any, procs: list[Any], plans: list[ProducerPlan]
    ) -> list[ProducerResult]:
        await self.wait_for_groups()
        stop = asyncio.Event()
        self.start = time.time() + 1.0
        go.value = self.start
        follow = asyncio.create_task(self.follow_signals(stop))
        sampler = asyncio.create_task(self.sample_loop(stop, shared, [p.pid for p in procs]))
        spy = None
        if self.args.py_spy is not None:
            spy = await self.start_py_spy()
        await asyncio.sleep(max(0.0, self.start - time.time() + self.args.duration))
        await asyncio.to_thread(lambda: [p.join() for p in procs])
        results = [read_result(plan.result_file) for plan in plans]
        for r in results:
            if r.error:
                self.failures.append(f"producer {r.index} failed: {r.error}")
        expected = {k for r in results for k in r.truth}
        deadline = time.monotonic() + self.args.drain_timeout
        while not await self.drained(expected):
            dead = [n for n, w in self.workers.items() if not w.alive]
            if dead:
                self.failures.append(f"worker(s) {dead} died:\n{self.workers[dead[0]].log_tail()}")
                break
            if time.monotonic() > deadline:
                self.failures.append(f"the pipeline did not drain within {self.args.drain_timeout:.0f}s")
                break
            await asyncio.sleep(0.5)
        self.drained_at = time.time() - self.start
        await asyncio.sleep(1.5)  # the last commits and emitted-marks land before the stop
        stop.set()
        await asyncio.gather(follow, sampler)
        if spy is not None:
            await asyncio.to_thread(spy.wait)
        return results

    async def start_py_spy(self) -> subprocess.Popen[bytes]:
        target = self.workers[self.args.py_spy_target].proc
        assert target is not None
        warm = self.args.duration * self.args.warmup_pct / 100
        await asyncio.sleep(max(0.0, self.start - time.time() + warm))
        seconds = max(1, int(self.args.duration - warm))
        svg = self.args.py_spy.resolve()
        cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(target.pid)]
        cmd += ["--duration", str(seconds), "--rate", "50", "--nonblocking", "--format", "flamegraph"]
        cmd += ["--output", str(svg)]
        print(f"py-spy: recording {self.args.py_spy_target} (pid {target.pid}) for {seconds}s into {svg}")
        log = self.out / "py-spy.log"
        return await asyncio.to_thread(
            lambda: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        )

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        violations = check_rules_against_workload(self.args.rules_per_tenant)
        print(f"rules agree with the ground truth ({violations} planted violations in a sample)")
        asyncio.run(ensure_topics(self.cfg))
        procs, readies, go, shared, plans = self.start_producers()
        for w in self.workers.values():
            w.start()
        for ready in readies:
            if not ready.wait(600):
                msg = "a producer did not finish encoding its message pool in 600s"
                raise SystemExit(msg)
        took = time.perf_counter() - t0
        print(f"{len(procs)} producers ready, {len(self.workers)} workers starting ({took:.1f}s)")
        try:
            results = asyncio.run(self.run_async(shared, go, procs, plans))
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            codes = {n: w.stop() for n, w in self.workers.items()}
        for name, code in codes.items():
            if code != 0:
                self.failures.append(f"worker {name} exited with {code}: {self.workers[name].log_tail(10)}")
        return self.summarise(results)

    def summarise(self, results: list[ProducerResult]) -> dict[str, Any]:
        from harness.summary import summarise  # noqa: PLC0415 - keeps this file short

        return summarise(self, results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = load_settings()
    broker_pid = args.broker_pid
    if args.brokers:
        base = base.model_copy(update={"brokers": args.brokers})
    else:
        from betrace.dev.kafka import LocalKafka  # noqa: PLC0415

        kafka = LocalKafka(ROOT)
        kafka.up()
        base = base.model_copy(update={"brokers": kafka.bootstrap_servers})
        broker_pid = next((s.pid for s in kafka.status() if s.running), None)
    test = LoadTest(args, base, broker_pid)
    print(f"run {test.run_id}: results in {test.out}")
    result = test.run()
    result["command"] = " ".join(["benchmarks/loadtest.py", *(argv if argv is not None else sys.argv[1:])])
    result["commit"] = git_commit()
    result["machine"] = f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}"
    result["plot"] = None
    if not args.no_plot:
        why = report.plot(test.out / "loadtest.png", result)
        result["plot"] = None if why else str(test.out / "loadtest.png")
        print(f"plot: {why}" if why else f"plot: {test.out / 'loadtest.png'}")
    report.write_json(test.out / "result.json", result)
    if not args.keep_data and not result["failures"]:
        shutil.rmtree(test.data_root, ignore_errors=True)
    print(f"result: {test.out / 'result.json'}")
    if result["failures"]:
        print("FAILED:\n  " + "\n  ".join(result["failures"]), file=sys.stderr)
        return 1
    print("load test passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
