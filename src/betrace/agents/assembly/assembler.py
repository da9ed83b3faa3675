"""Windowed trace assembler: bounded memory per trace, limits, late spans, durable state.

Per message, Python work is per trace (a slice of the message), never per span.
Per trace the assembler holds at most one window of rows (``window_spans``,
plus what one message adds before the next close tick); when a trace has a
window's worth, the window is folded into per-rule summaries
(:mod:`.summary`) and only the overlap is carried. Windows of all traces due
in one tick are judged in one vectorised pass per tenant.

A trace that closed as a single window is forwarded whole to
``betrace.traces`` (the evaluate stage judges it exactly, as before); a trace
that needed windows is judged here from its summaries and yields signals.

Durability: a message (``seq``) is released, i.e. may be acknowledged, once
every row of it is either forwarded, dropped with a reason, or saved in a
state write (checkpoint / decision) returned to the caller, who must make
those writes durable *before* acknowledging. See :mod:`.state` for how
replayed rows are recognised (``hw``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from betrace.agents.assembly import summary as sm
from betrace.agents.assembly.shared import fold_tenants, sequence_deadlines
from betrace.agents.assembly.state import (
    EMPTY,
    Decision,
    OpenTrace,
    decode_decision,
    decode_open,
    encode_decision,
    encode_open,
    gather,
    piece,
)
from betrace.agents.evaluate import signal_id
from betrace.config.settings import AssemblyPolicy
from betrace.metrics import StageHooks
from betrace.rules.engine import CompiledSequenceRule
from betrace.streams.schemas import SIGNAL_SCHEMA_VERSION
from betrace.streams.topics import partition_of

logger = logging.getLogger(__name__)
#: Every early close and every dropped span is written here with its reason.
anomaly_log = logging.getLogger("betrace.anomaly")

STEP_ID = "assemble"
TRACES_TABLE = "assembly-traces"
DECISIONS_TABLE = "assembly-decisions"
_UNBOUNDED = 1 << 62

Cause = Literal["idle", "root", "max_age", "live_limit", "tenant_live_limit", "bytes_limit", "flush"]


@dataclass(slots=True)
class StateWrite:
    """One changelog record: ``value=None`` deletes the key."""

    table: str
    partition: int
    key: str
    value: bytes | None
    #: A decisions write's value as the object, for in-process readers (the Redis write-through).
    decision: Decision | None = None


@dataclass(slots=True)
class Dropped:
    """Spans the assembler refused, for the dead-letter topic."""

    reason: str
    tenant: str
    trace_id: str
    spans: pa.Table
    detail: str = ""


@dataclass(slots=True)
class ClosedTraces:
    """The outcome of one close tick."""

    spans: pa.Table  # whole single-window traces for the evaluate stage
    traces: int  # traces closed
    released: list[int]  # message seqs that may now be acknowledged
    signals: list[dict[str, Any]] = field(default_factory=list)  # windowed and late verdicts
    writes: list[StateWrite] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)


@dataclass(slots=True)
class _Window:
    tenant: str
    table: pa.Table
    new: pa.Array


def legacy_policy(idle_timeout_s: float, max_trace_age_s: float, max_live_traces: int) -> AssemblyPolicy:
    """No windows, no byte limit, no decision cache: whole traces only."""
    return AssemblyPolicy(
        idle_timeout_s=idle_timeout_s,
        max_trace_age_s=max_trace_age_s,
        window_spans=_UNBOUNDED,
        window_overlap_pct=0.0,
        max_live_traces=_UNBOUNDED,  # the worker-wide limit applies
        max_trace_bytes=_UNBOUNDED,
        decision_cache_s=0.0,
    )


class TraceAssembler:
    """Hold spans of live traces in bounded windows until each trace is due."""

    step_id = STEP_ID

    def __init__(
        self,
        *,
        idle_timeout_s: float,
        max_trace_age_s: float,
        max_live_traces: int,
        hooks: StageHooks,
        clock: Callable[[], float] = time.time,
        policy: Callable[[str], AssemblyPolicy] | None = None,
        rules_for: sm.RulesFor | None = None,
        checkpoint_interval_s: float | None = None,
        decision_cache_max: int = 0,
        partitions: int = 1,
    ) -> None:
        self.max_live_traces = max_live_traces
        self.hooks = hooks
        self.clock = clock
        legacy = legacy_policy(idle_timeout_s, max_trace_age_s, max_live_traces)
        self._policy_fn = policy or (lambda _tenant: legacy)
        self._policies: dict[str, AssemblyPolicy] = {}
        self.rules_for = rules_for
        self.checkpoint_interval_s = checkpoint_interval_s
        self.decision_cache_max = decision_cache_max
        self.partitions = partitions
        self._all: dict[str, OpenTrace] = {}  # first-seen order: oldest first
        self._idle: dict[str, dict[str, OpenTrace]] = {}  # per tenant, last-touch order
        #: The traces of ``_idle`` whose root span arrived (``root_close_delay_s`` on), same order.
        self._rooted: dict[str, dict[str, OpenTrace]] = {}
        self._decisions: dict[str, Decision] = {}  # closed order
        #: Written last tick, summaries still as objects for in-process readers of the writes.
        self._to_compact: list[Decision] = []
        self._late: dict[str, list[tuple[pa.Table, int, int]]] = {}  # rows, seq, offset
        self._fold_due: set[str] = set()
        self._force: dict[str, Cause] = {}
        self._refs: dict[int, int] = {}  # seq -> rows-holding (trace, seq) pairs
        self._open_seqs: set[int] = set()
        self._min_age: float = float(_UNBOUNDED)
        #: When a decision was last forgotten before its time (the cap): late spans may miss it.
        self.evicted_at: float | None = None
        self._ticks = 0

    # -- introspection -------------------------------------------------------

    @property
    def live_traces(self) -> int:
        return len(self._all)

    @property
    def decisions(self) -> int:
        return len(self._decisions)

    def held_bytes(self) -> int:
        row_bytes: dict[int, float] = {}  # the traces are alive, so are their tables and ids
        return sum(t.held_bytes(row_bytes) for t in self._all.values())

    def policy(self, tenant: str) -> AssemblyPolicy:
        p = self._policies.get(tenant)
        if p is None:
            p = self._policies[tenant] = self._policy_fn(tenant)
            self._min_age = min(self._min_age, p.max_trace_age_s)
        return p

    def _rules(self, tenant: str) -> list[Any]:
        return self.rules_for(tenant) if self.rules_for is not None else []

    # -- input ---------------------------------------------------------------

    def add(self, spans: pa.Table, seq: int, *, partition: int = 0, offset: int | None = None) -> None:
        """Take the spans of one message; ``seq`` identifies it for release.

        ``offset`` (the message's offset on its partition) lets replayed rows
        that the saved state already holds be recognised and skipped.
        """
        now = self.clock()
        self._open_seqs.add(seq)
        if spans.num_rows == 0:
            return
        per_row = spans.nbytes / spans.num_rows
        src = -1 if offset is None else offset
        table, groups = _split_by_trace(spans)
        live, decisions, idle_of, refs = self._all, self._decisions, self._idle, self._refs
        roots: set[str] | None = None  # trace ids with a root span here, found when a tenant asks
        # The per-trace loop of assembly: kept flat (no call per trace).
        for trace_id, tenant, start, size in groups:
            trace = live.get(trace_id)
            if trace is None:
                decision = decisions.get(trace_id)
                if decision is not None:
                    if src <= decision.hw and offset is not None:
                        self.hooks.count("betrace_replayed_spans_skipped_total", size, stage=STEP_ID)
                        continue
                    self._late.setdefault(trace_id, []).append((table.slice(start, size), seq, src))
                    self._hold(seq)
                    continue
                trace = OpenTrace(trace_id, tenant, partition, first_seen=now, last_seen=now)
                live[trace_id] = trace
                self.policy(tenant)
            elif offset is not None and src <= trace.hw:
                self.hooks.count("betrace_replayed_spans_skipped_total", size, stage=STEP_ID)
                continue
            trace.chunks.append((table, start, size))
            trace.rows += size
            trace.spans += size
            trace.bytes += int(per_row * size)
            trace.last_seen = now
            trace.hold_until = 0.0  # a new span may be the B it waited for: judge it afresh
            trace.hw = max(trace.hw, src)
            if trace.dirty_since is None:
                trace.dirty_since = now
            if seq not in trace.held:
                trace.held.add(seq)
                refs[seq] = refs.get(seq, 0) + 1  # _hold
            idle = idle_of.get(trace.tenant)
            if idle is None:
                idle = idle_of[trace.tenant] = {}
            idle.pop(trace_id, None)
            idle[trace_id] = trace  # move to the end: most recently touched
            policy = self.policy(trace.tenant)
            if policy.root_close_delay_s > 0:
                roots = self._touch_rooted(trace, table, roots)
            if trace.bytes > policy.max_trace_bytes:
                self._force.setdefault(trace_id, "bytes_limit")
            elif trace.rows + trace.overlap.num_rows >= policy.window_spans:
                self._fold_due.add(trace_id)

    def _touch_rooted(self, trace: OpenTrace, table: pa.Table, roots: set[str] | None) -> set[str] | None:
        """Mark ``trace`` rooted when ``table`` (the message) holds its root; keep it last-touched.

        ``roots`` is the message's rooted trace ids, found once and only for a trace not yet rooted.
        """
        if not trace.rooted:
            if roots is None:
                roots = _root_traces(table)
            trace.rooted = trace.trace_id in roots
        if trace.rooted:
            rooted = self._rooted.get(trace.tenant)
            if rooted is None:
                rooted = self._rooted[trace.tenant] = {}
            rooted.pop(trace.trace_id, None)
            rooted[trace.trace_id] = trace
        return roots

    def _forget(self, trace: OpenTrace) -> None:
        """Take a closed or revoked trace out of every index."""
        del self._all[trace.trace_id]
        self._idle[trace.tenant].pop(trace.trace_id, None)
        if trace.rooted:
            self._rooted[trace.tenant].pop(trace.trace_id, None)
        self._fold_due.discard(trace.trace_id)

    def _hold(self, seq: int) -> None:
        self._refs[seq] = self._refs.get(seq, 0) + 1

    def _unhold(self, seqs: set[int] | list[int]) -> None:
        for seq in seqs:
            left = self._refs[seq] - 1
            if left:
                self._refs[seq] = left
            else:
                del self._refs[seq]

    # -- the close tick --------------------------------------------------------

    def close_due(self, *, flush_all: bool = False) -> ClosedTraces | None:
        """Fold full windows, judge late spans, close due traces, expire decisions."""
        now = self.clock()
        for decision in self._to_compact:
            decision.compact()
        self._to_compact.clear()
        out = ClosedTraces(spans=EMPTY, traces=0, released=[])
        windows: list[_Window] = []
        summaries: dict[str, sm.Summaries] = {}
        due = self._due(now, flush_all)
        folded = self._fold(windows, summaries, skip=due)
        late = self._take_late(windows, summaries, out)
        closing = self._close_windows(due, windows, summaries, out)
        self._judge(windows, summaries)
        self._finish_closing(closing, due, now, out)
        self._finish_late(late, now, out)
        self._checkpoint(folded, now, out, flush_all=flush_all)
        self._expire(now, out)
        self._ticks += 1
        self.hooks.gauge("betrace_live_traces", len(self._all), stage=STEP_ID)
        if self._ticks % 40 == 0 or flush_all:
            self.hooks.gauge("betrace_windows", len(self._all), stage=STEP_ID)
            self.hooks.gauge("betrace_bytes_held", self.held_bytes(), stage=STEP_ID)
        released = sorted(s for s in self._open_seqs if s not in self._refs)
        self._open_seqs.difference_update(released)
        out.released = released
        if not (out.traces or released or out.signals or out.writes or out.dropped or out.spans.num_rows):
            return None
        return out

    def _due(self, now: float, flush_all: bool) -> dict[str, Cause]:  # noqa: PLR0912 - one pass per close cause
        if flush_all:
            return dict.fromkeys(self._all, "idle")
        due: dict[str, Cause] = {t: c for t, c in self._force.items() if t in self._all}
        self._force.clear()
        # The root is in: a shorter idle time; first, so that a late tick still names the cause.
        self._idle_due(due, self._rooted, now, "root")
        self._idle_due(due, self._idle, now, "idle")
        self._hold_for_deadlines(due, now)
        if self._all and now - self._min_age >= next(iter(self._all.values())).first_seen:
            for trace_id, trace in self._all.items():
                if trace.first_seen > now - self._min_age:
                    break
                if trace.first_seen <= now - self.policy(trace.tenant).max_trace_age_s:
                    due.setdefault(trace_id, "max_age")
        for tenant, traces in self._idle.items():
            excess = len(traces) - sum(1 for t in due if self._all[t].tenant == tenant)
            excess -= self.policy(tenant).max_live_traces
            if excess > 0:
                # _all keeps first-seen order: the oldest traces of the tenant go first.
                for trace_id, trace in self._all.items():
                    if excess <= 0:
                        break
                    if trace.tenant == tenant and trace_id not in due:
                        due[trace_id] = "tenant_live_limit"
                        excess -= 1
        excess = len(self._all) - len(due) - self.max_live_traces
        if excess > 0:
            for trace_id in self._all:
                if excess <= 0:
                    break
                if trace_id not in due:
                    due[trace_id] = "live_limit"
                    excess -= 1
        return due

    def _idle_due(
        self, due: dict[str, Cause], index: dict[str, dict[str, OpenTrace]], now: float, cause: Cause
    ) -> None:
        """Add the traces of ``index`` (per tenant, last-touch order) idle for their time."""
        for tenant, traces in index.items():
            policy = self.policy(tenant)
            idle_before = now - (policy.root_close_delay_s if cause == "root" else policy.idle_timeout_s)
            for trace_id, trace in traces.items():
                if trace.last_seen > idle_before:
                    break
                if trace.hold_until <= now:
                    due.setdefault(trace_id, cause)

    def _hold_for_deadlines(self, due: dict[str, Cause], now: float) -> None:
        """Keep idle traces open while a ``followed_by`` verdict still depends on spans to come.

        A trace waits, per rule, until its earliest unmatched A span's deadline: from then
        on that violation is certain. Its folded windows count (their summary) as well as
        the rows held. Limits and the maximum age still close it.
        """
        rules: dict[str, list[CompiledSequenceRule]] = {}
        traces: list[OpenTrace] = []
        for trace_id, cause in due.items():
            if cause in {"idle", "root"}:
                trace = self._all[trace_id]
                if trace.tenant not in rules:
                    rules[trace.tenant] = [
                        c for c in self._rules(trace.tenant) if isinstance(c, CompiledSequenceRule)
                    ]
                if rules[trace.tenant]:
                    traces.append(trace)
        now_ns = int(now * 1e9)
        for trace_id, at in sequence_deadlines(rules, traces).items():
            if at > now_ns:
                self._all[trace_id].hold_until = at / 1e9
                del due[trace_id]
                self.hooks.count("betrace_traces_held_total", stage=STEP_ID)

    def _fold(
        self, windows: list[_Window], summaries: dict[str, sm.Summaries], skip: dict[str, Cause]
    ) -> list[str]:
        """Cut every full window of traces that are not closing now; keep overlap + rest."""
        folded = []
        for trace_id in self._fold_due:
            trace = self._all.get(trace_id)
            if trace is None or trace_id in skip:
                continue
            policy = self.policy(trace.tenant)
            size, carry = policy.window_spans, policy.overlap_spans
            rows = trace.pending()
            total, counted, start = rows.num_rows, trace.overlap.num_rows, 0
            if total < size:
                continue
            while start + size <= total:
                end = start + size
                self._window(trace, rows.slice(start, size), end - counted, windows)
                counted, start = end, end - carry
            # Copy what is kept so that dropped rows free their message buffers.
            trace.overlap = _compact(rows.slice(start, counted - start))
            rest = _compact(rows.slice(counted))
            trace.chunks = [piece(rest)] if rest.num_rows else []
            trace.rows = rest.num_rows
            summaries.setdefault(trace_id, trace.summaries)
            folded.append(trace_id)
        self._fold_due.clear()
        return folded

    def _window(self, trace: OpenTrace, rows: pa.Table, new_rows: int, windows: list[_Window]) -> None:
        trace.windows += 1
        self.hooks.count("betrace_windows_evaluated_total", stage=STEP_ID)
        if not self._rules(trace.tenant):
            return  # nothing to judge: the rows only had to be bounded
        window_id = f"{trace.trace_id}{sm.WINDOW_SEP}{trace.windows}"
        old = rows.num_rows - new_rows
        new = pa.concat_arrays([pa.repeat(pa.scalar(False), old), pa.repeat(pa.scalar(True), new_rows)])
        windows.append(_Window(trace.tenant, sm.window_table(rows, window_id), new))

    def _take_late(
        self, windows: list[_Window], summaries: dict[str, sm.Summaries], out: ClosedTraces
    ) -> list[tuple[str, Decision, dict[str, bool], int, list[int]]]:
        """Late rows of decided traces become one window each; capped traces drop them."""
        late: list[tuple[str, Decision, dict[str, bool], int, list[int]]] = []
        for trace_id, parts in self._late.items():
            decision = self._decisions.get(trace_id)
            seqs = [seq for _, seq, _ in parts]
            if decision is None:  # forgotten meanwhile: nothing to compare with
                self._unhold(seqs)
                continue
            rows = pa.concat_tables([r for r, _, _ in parts])
            decision.hw = max([decision.hw, *(o for _, _, o in parts)])
            if decision.capped:
                out.dropped.append(
                    Dropped(
                        "trace_bytes_limit", decision.tenant, trace_id, rows, "trace over max_trace_bytes"
                    )
                )
                self.hooks.count(
                    "betrace_spans_dropped_total", rows.num_rows, stage=STEP_ID, reason="bytes_limit"
                )
                late.append((trace_id, decision, {}, 0, seqs))
                continue
            compiled = self._rules(decision.tenant)
            before = {
                sm.rule_key(c): sm.violated(c, decision.summaries.get(sm.rule_key(c))) for c in compiled
            }
            decision.windows += 1
            if compiled:
                window_id = f"{trace_id}{sm.WINDOW_SEP}late{decision.windows}"
                new = pa.repeat(pa.scalar(True), rows.num_rows)
                windows.append(_Window(decision.tenant, sm.window_table(rows, window_id), new))
                summaries[trace_id] = decision.summaries_to_change()
            late.append((trace_id, decision, before, rows.num_rows, seqs))
        self._late.clear()
        return late

    def _close_windows(
        self,
        due: dict[str, Cause],
        windows: list[_Window],
        summaries: dict[str, sm.Summaries],
        out: ClosedTraces,
    ) -> list[OpenTrace]:
        """The last window of every closing trace that needed windows (or is remembered).

        Also sets ``out.spans``: the closing traces that are forwarded whole.
        """
        closing = []
        forwarded: list[OpenTrace] = []
        # Most traces close whole, never windowed: judge them as one batch per tenant
        # (vectorised window ids) instead of building a window table per trace.
        whole_batch: dict[str, list[OpenTrace]] = {}
        for trace_id, cause in due.items():
            trace = self._all[trace_id]
            closing.append(trace)
            policy = self.policy(trace.tenant)
            whole = trace.spans == trace.rows + trace.overlap.num_rows
            if whole and cause != "bytes_limit":
                forwarded.append(trace)  # nothing was dropped: the evaluate stage judges it exactly
            remember = policy.decision_cache_s > 0 and self.decision_cache_max > 0
            if whole and not remember and cause != "bytes_limit":
                continue  # forwarded whole, nothing to remember
            if (
                whole
                and trace.windows == 0
                and cause != "bytes_limit"
                and trace.rows + trace.overlap.num_rows <= policy.window_spans
                and self._rules(trace.tenant)
            ):
                trace.windows = 1
                whole_batch.setdefault(trace.tenant, []).append(trace)
                summaries[trace_id] = trace.summaries
                continue
            rows = trace.pending()
            counted, start = trace.overlap.num_rows, 0
            # A trace may close holding more than a window (one big message): cut it too.
            while rows.num_rows - start > policy.window_spans:
                end = start + policy.window_spans
                self._window(trace, rows.slice(start, policy.window_spans), end - counted, windows)
                counted, start = end, end - policy.overlap_spans
            if rows.num_rows > counted or trace.windows == 0:
                self._window(trace, rows.slice(start), rows.num_rows - counted, windows)
            summaries[trace_id] = trace.summaries
        if forwarded:
            # One contiguous table: thousands of per-trace slices would make every
            # later filter, IPC write and rule evaluation pay per chunk.
            out.spans = _rows_of(forwarded)
        for tenant, batch in whole_batch.items():
            # The whole batch is a subset of the forwarded traces, in the same order:
            # usually all of them, and then their rows are already gathered.
            table = out.spans if len(batch) == len(forwarded) else _rows_of(batch)
            col = table.schema.get_field_index("trace_id")
            ids = pc.binary_join_element_wise(table.column(col), f"{sm.WINDOW_SEP}1", "")
            windows.append(
                _Window(
                    tenant, table.set_column(col, "trace_id", ids), pa.repeat(pa.scalar(True), table.num_rows)
                )
            )
            chunks = sum(len(t.chunks) for t in batch)
            self.hooks.count("betrace_windows_evaluated_total", chunks, stage=STEP_ID)
        return closing

    def _judge(self, windows: list[_Window], summaries: dict[str, sm.Summaries]) -> None:
        """Fold every window of the tick at once: each distinct rule program runs once."""
        if not windows:
            return
        table = windows[0].table if len(windows) == 1 else pa.concat_tables([w.table for w in windows])
        if any(c.num_chunks > 1 for c in table.columns):
            table = table.combine_chunks()
        new = windows[0].new if len(windows) == 1 else pa.concat_arrays([w.new for w in windows])
        fold_tenants(self._rules, table, new, summaries)

    def _finish_closing(
        self, closing: list[OpenTrace], due: dict[str, Cause], now: float, out: ClosedTraces
    ) -> None:
        closed_by: dict[Cause, int] = {}
        for trace in closing:
            cause = due[trace.trace_id]
            self._forget(trace)
            closed_by[cause] = closed_by.get(cause, 0) + 1
            if cause not in {"idle", "root", "max_age"}:
                self._anomaly(cause, trace, "closed and evaluated early")
            out.traces += 1
            whole = trace.spans == trace.rows + trace.overlap.num_rows
            if not whole or cause == "bytes_limit":  # else forwarded by _close_windows
                out.signals.extend(self._verdicts(trace))
            policy = self.policy(trace.tenant)
            if trace.checkpointed:
                out.writes.append(StateWrite(TRACES_TABLE, trace.partition, trace.trace_id, None))
            if policy.decision_cache_s > 0 and self.decision_cache_max > 0 and trace.hw >= 0:
                decision = Decision(
                    tenant=trace.tenant,
                    partition=trace.partition,
                    closed_at=now,
                    hw=trace.hw,
                    windows=trace.windows,
                    summaries=trace.summaries,
                    capped=cause == "bytes_limit",
                )
                self._decisions[trace.trace_id] = decision
                self._to_compact.append(decision)
                out.writes.append(
                    StateWrite(
                        DECISIONS_TABLE, trace.partition, trace.trace_id, encode_decision(decision), decision
                    )
                )
            self._unhold(trace.held)
        for cause, n in closed_by.items():
            self.hooks.count("betrace_traces_closed_total", n, stage=STEP_ID, cause=cause)

    def _verdicts(self, trace: OpenTrace) -> list[dict[str, Any]]:
        docs = []
        produced = 0
        rows = trace.pending()
        if rows.num_rows:
            produced = int(pc.max(rows.column("produced_ms")).as_py() or 0)
        for compiled in self._rules(trace.tenant):
            s = trace.summaries.get(sm.rule_key(compiled))
            if sm.violated(compiled, s):
                assert s is not None
                docs.append(
                    self._signal(
                        trace.tenant, compiled, trace.trace_id, s, windows=trace.windows, produced=produced
                    )
                )
        return docs

    def _signal(
        self, tenant: str, compiled: Any, trace_id: str, s: sm.RuleSummary, *, windows: int, produced: int
    ) -> dict[str, Any]:
        rule = compiled.rule
        self.hooks.count("betrace_signals_total", stage=STEP_ID, rule=rule.id, severity=rule.severity)
        return {
            "schema_version": SIGNAL_SCHEMA_VERSION,
            "signal_id": signal_id(tenant, rule, trace_id),
            "tenant": tenant,
            "rule_id": rule.id,
            "rule_version": rule.version,
            "rule_name": rule.name,
            "trace_id": trace_id,
            "span_ids": list(s.evidence),
            "severity": rule.severity,
            "message": sm.message(compiled, windows, s),
            "detected_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "source_produced_ms": produced,
        }

    def _finish_late(
        self, late: list[tuple[str, Decision, dict[str, bool], int, list[int]]], now: float, out: ClosedTraces
    ) -> None:
        for trace_id, decision, before, n, seqs in late:
            if n:
                self.hooks.count("betrace_late_spans_total", n, stage=STEP_ID)
                self.hooks.observe(
                    "betrace_late_span_age_seconds", max(0.0, now - decision.closed_at), stage=STEP_ID
                )
            for compiled in self._rules(decision.tenant):
                key = sm.rule_key(compiled)
                s = decision.summaries.get(key)
                # Only a change from pass to violation is news; a violation stays one.
                if n and not before.get(key, False) and sm.violated(compiled, s):
                    assert s is not None
                    out.signals.append(
                        self._signal(
                            decision.tenant, compiled, trace_id, s, windows=decision.windows, produced=0
                        )
                    )
                    self.hooks.count("betrace_late_verdict_changes_total", stage=STEP_ID)
            out.writes.append(
                StateWrite(DECISIONS_TABLE, decision.partition, trace_id, encode_decision(decision), decision)
            )
            self._to_compact.append(decision)
            self._unhold(seqs)

    def _checkpoint(self, folded: list[str], now: float, out: ClosedTraces, *, flush_all: bool) -> None:
        """Save open traces whose rows would otherwise keep messages un-acknowledged too long."""
        if self.checkpoint_interval_s is None or flush_all:
            return
        before = now - self.checkpoint_interval_s
        due = [t for t in folded if t in self._all]
        for trace in self._all.values():
            if trace.dirty_since is not None and trace.dirty_since <= before and trace.trace_id not in folded:
                due.append(trace.trace_id)
        for trace_id in due:
            trace = self._all[trace_id]
            out.writes.append(StateWrite(TRACES_TABLE, trace.partition, trace_id, encode_open(trace)))
            trace.checkpointed = True
            trace.dirty_since = None
            self._unhold(trace.held)
            trace.held.clear()
            self.hooks.count("betrace_checkpoints_total", stage=STEP_ID)

    def _expire(self, now: float, out: ClosedTraces) -> None:
        over = len(self._decisions) - self.decision_cache_max
        while self._decisions:
            trace_id, decision = next(iter(self._decisions.items()))
            expired = decision.closed_at <= now - self.policy(decision.tenant).decision_cache_s
            if not expired and over <= 0:
                break
            if not expired:
                self.hooks.count("betrace_decisions_evicted_total", stage=STEP_ID)
                self.evicted_at = now
                over -= 1
            del self._decisions[trace_id]
            out.writes.append(StateWrite(DECISIONS_TABLE, decision.partition, trace_id, None))

    def _anomaly(self, reason: str, trace: OpenTrace, what: str) -> None:
        self.hooks.count("betrace_assembly_limit_total", stage=STEP_ID, reason=reason)
        anomaly_log.warning(
            "assembly anomaly reason=%s tenant=%s trace_id=%s spans=%d bytes=%d windows=%d: %s",
            reason,
            trace.tenant,
            trace.trace_id,
            trace.spans,
            trace.bytes,
            trace.windows,
            what,
        )

    def unknown_traces(self, tables: list[pa.Table]) -> list[str]:
        """Distinct trace ids in ``tables`` that are neither open nor decided here."""
        seen: set[str] = set()
        for table in tables:
            if table.num_rows:
                seen.update(pc.unique(table.column("trace_id")).to_pylist())
        return [t for t in seen if t not in self._all and t not in self._decisions]

    # -- recovery ----------------------------------------------------------------

    def restore(self, table: str, key: str, value: bytes) -> None:
        """Load one recovered changelog entry (after a restart or a rebalance)."""
        partition = partition_of([key], self.partitions)[0]
        if table == TRACES_TABLE:
            if key in self._all:
                return
            trace = decode_open(key, partition, value)
            # Replayed input may still hold rows of it: give them an idle timeout to arrive.
            trace.last_seen = max(trace.last_seen, self.clock())
            self._all[key] = trace
            self._idle.setdefault(trace.tenant, {})[key] = trace
            if trace.rows + trace.overlap.num_rows >= self.policy(trace.tenant).window_spans:
                self._fold_due.add(key)
        elif key not in self._decisions:
            self._decisions[key] = decode_decision(partition, value)

    def drop_partitions(self, partitions: set[int]) -> list[int]:
        """Forget everything of revoked partitions; return the seqs that must not be acked."""
        forgotten: set[int] = set()
        for trace in list(self._all.values()):
            if trace.partition in partitions:
                self._forget(trace)
                forgotten |= trace.held
                self._unhold(trace.held)
        for trace_id, decision in list(self._decisions.items()):
            if decision.partition in partitions:
                del self._decisions[trace_id]
        for trace_id, parts in list(self._late.items()):
            if trace_id not in self._decisions:
                del self._late[trace_id]
                seqs = [seq for _, seq, _ in parts]
                forgotten.update(seqs)
                self._unhold(seqs)
        return sorted(forgotten)


def _compact(table: pa.Table) -> pa.Table:
    """A copy that owns its buffers (a slice would pin the whole message)."""
    if table.num_rows == 0:
        return EMPTY
    return table.take(pa.array(range(table.num_rows), pa.int32())).combine_chunks()


def _rows_of(traces: list[OpenTrace]) -> pa.Table:
    """The new rows of ``traces``, trace after trace, as one contiguous table."""
    return gather([c for trace in traces for c in trace.chunks])


def _root_traces(table: pa.Table) -> set[str]:
    """Trace ids of ``table`` that have a root span (no parent span id)."""
    parent = table.column("parent_span_id")
    is_root = pc.or_kleene(pc.is_null(parent), pc.equal(pc.binary_length(parent), 0))
    if not pc.any(is_root).as_py():
        return set()
    return set(pc.unique(pc.filter(table.column("trace_id"), is_root)).to_pylist())


def _split_by_trace(spans: pa.Table) -> tuple[pa.Table, list[tuple[str, str, int, int]]]:
    """(trace id, tenant, start, size) per trace in a message, in trace id order.

    Each trace's rows are ``start : start + size`` of the returned table, in
    arrival order: the message itself when its rows are already grouped by trace.
    """
    trace_ids = spans.column("trace_id")
    if trace_ids.null_count == 0:
        ids = trace_ids.chunk(0) if trace_ids.num_chunks == 1 else trace_ids.combine_chunks()
        bounds = pc.indices_nonzero(pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1)))
        if len(bounds) == 0:
            return spans, [(ids[0].as_py(), spans.column("tenant")[0].as_py(), 0, spans.num_rows)]
        starts = [0, *(b + 1 for b in bounds.to_pylist())]
        at = pa.array(starts, pa.int64())
        firsts = pc.take(ids, at)
        if pc.count_distinct(firsts).as_py() == len(firsts):
            # Already one run per trace: no copy, only the traces visited in id order.
            ends = [*starts[1:], spans.num_rows]
            order = pc.sort_indices(firsts).to_pylist()
            tenants = pc.take(spans.column("tenant"), at).to_pylist()
            names = firsts.to_pylist()
            return spans, [(names[i], tenants[i], starts[i], ends[i] - starts[i]) for i in order]
    elif len(unique := pc.unique(trace_ids)) == 1:
        return spans, [(unique[0].as_py(), spans.column("tenant")[0].as_py(), 0, spans.num_rows)]
    # A stable sort keeps each trace's rows in arrival order; one contiguous batch
    # makes the per-trace pieces cheap (the hot path of assembly).
    ordered = spans.take(pc.sort_indices(trace_ids)).combine_chunks()
    counts = pc.value_counts(ordered.column("trace_id"))
    names = counts.field(0).to_pylist()
    sizes = counts.field(1).to_pylist()
    starts = [0, *itertools.accumulate(sizes)][:-1]
    tenants = pc.take(ordered.column("tenant"), pa.array(starts, pa.int64())).to_pylist()
    return ordered, list(zip(names, tenants, starts, sizes, strict=True))
