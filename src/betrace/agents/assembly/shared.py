"""Judge the windows of many tenants at once, each distinct rule program once.

The evaluate stage shares rule programs across tenants (:mod:`betrace.rules.plan`);
this is the same idea for the assembler's windows. With the decision cache on,
every closing trace is judged here, and judging per tenant cost one pass of
every rule per tenant per close tick: with 500 tenants of 20 rules the close
tick took seconds and the worker fell behind (``benchmarks/bench_tenants.py``).

A program's summaries are folded once over the windows of every tenant that
runs it, then copied to each of those tenants' rule versions (summaries are
keyed per rule version, :func:`.summary.rule_key`). The copy is attributed
through the trace id, so it is exact only while no trace id appears under two
tenants in the tick; otherwise the tick is judged per tenant, as before.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from betrace.agents.assembly import summary as sm
from betrace.agents.assembly.sequence import window_states
from betrace.agents.assembly.state import OpenTrace, gather, piece
from betrace.rules.engine import CompiledSequenceRule
from betrace.rules.model import CompiledRule
from betrace.rules.plan import program_key, trace_ids_unique_per_tenant


def fold_tenants(
    rules_for: sm.RulesFor, windows: pa.Table, new: pa.Array, into: dict[str, sm.Summaries]
) -> None:
    """Like :func:`.summary.fold_windows`, for windows of any number of tenants."""
    if windows.num_rows == 0:
        return
    tenant_col = windows.column("tenant")
    tenants = pc.unique(tenant_col).to_pylist()
    if len(tenants) == 1:
        sm.fold_windows(rules_for(tenants[0]), windows, new, into)
        return
    if not trace_ids_unique_per_tenant(windows):
        for tenant in tenants:
            mask = pc.equal(tenant_col, tenant)
            sm.fold_windows(rules_for(tenant), windows.filter(mask), pc.filter(new, mask), into)
        return
    programs: dict[tuple[str, str], list[CompiledRule]] = defaultdict(list)
    for tenant in tenants:
        for compiled in rules_for(tenant):
            programs[program_key(compiled.rule)].append(compiled)
    if not programs:
        return
    subsets: dict[frozenset[str], tuple[pa.Table, pa.Array]] = {frozenset(tenants): (windows, new)}
    tenant_of: dict[str, str] | None = None
    for members in programs.values():
        owners = frozenset(c.rule.tenant for c in members)
        part = subsets.get(owners)
        if part is None:
            mask = pc.is_in(tenant_col, pa.array(sorted(owners), tenant_col.type))
            part = subsets[owners] = (windows.filter(mask), pc.filter(new, mask))
        if len(members) == 1:
            sm.fold_windows(members, part[0], part[1], into)
            continue
        if tenant_of is None:
            tenant_of = _tenant_of_traces(windows)
        _fold_shared(members, part, tenant_of, into)


def _fold_shared(
    members: list[CompiledRule],
    part: tuple[pa.Table, pa.Array],
    tenant_of: dict[str, str],
    into: dict[str, sm.Summaries],
) -> None:
    """Fold one program once for all ``members``, then give each its share."""
    keys = [sm.rule_key(c) for c in members]

    def full(trace_id: str) -> bool:  # a member's tree of the trace is at its cap
        per_rule = into.get(trace_id, {})
        return any(
            (s := per_rule.get(k)) is not None and s.tree is not None and s.tree.lost > 0 for k in keys
        )

    found: dict[str, sm.Summaries] = {}
    sm.fold_windows(members[:1], part[0], part[1], found, settle=False, full=full)
    _share(members, found, tenant_of, into)
    structural = sm.tree_query(members[0])
    if structural is not None:
        traces_of: dict[str, list[str]] = defaultdict(list)
        for trace_id in found:
            traces_of[tenant_of[trace_id]].append(trace_id)
        for compiled in members:  # each version's tree may hold more than this tick
            sm.settle_trees(structural, sm.rule_key(compiled), traces_of[compiled.rule.tenant], into)


def _tenant_of_traces(windows: pa.Table) -> dict[str, str]:
    pairs = windows.select(["trace_id", "tenant"]).group_by(["trace_id", "tenant"]).aggregate([])
    ids = pairs.column("trace_id").to_pylist()
    return dict(zip(map(sm.trace_of, ids), pairs.column("tenant").to_pylist(), strict=True))


def _share(
    members: list[CompiledRule],
    found: dict[str, sm.Summaries],
    tenant_of: dict[str, str],
    into: dict[str, sm.Summaries],
) -> None:
    """Add what the shared program found to every owning rule version's summaries."""
    source = sm.rule_key(members[0])
    keys: dict[str, list[str]] = defaultdict(list)
    for compiled in members:
        keys[compiled.rule.tenant].append(sm.rule_key(compiled))
    for trace_id, per_rule in found.items():
        s = per_rule[source]
        target = into.get(trace_id)
        if target is None:
            target = into[trace_id] = {}
        owned = keys[tenant_of[trace_id]]
        for key in owned[:-1]:
            _merge(target, key, s)
        if owned[-1] in target:
            _merge(target, owned[-1], s)
        else:  # the pass itself, not a copy: ``found`` is dropped after this
            target[owned[-1]] = s


def _merge(target: sm.Summaries, key: str, s: sm.RuleSummary) -> None:
    """Fold one window pass into a summary, as :func:`.summary.fold_windows` does in place."""
    cur = target.get(key)
    if cur is None:
        target[key] = sm.RuleSummary(
            counts=None if s.counts is None else list(s.counts),
            violated=s.violated,
            evidence=list(s.evidence),
            agg=None if s.agg is None else list(s.agg),
            seq=None if s.seq is None else s.seq.copy(),
            tree=None if s.tree is None else s.tree.copy(),
        )
        return
    if s.counts is not None:
        if cur.counts is None:
            cur.counts = list(s.counts)
        else:
            cur.counts = [a + b for a, b in zip(cur.counts, s.counts, strict=True)]
    if s.agg is not None:
        if cur.agg is None:
            cur.agg = list(s.agg)
        else:
            sm.add_totals(cur.agg, s.agg)
    if s.tree is not None:  # its verdict is settled after the merge
        if cur.tree is None:
            cur.tree = s.tree.copy()
        else:
            cur.tree.merge(s.tree)
        return
    cur.violated = cur.violated or s.violated
    if s.seq is not None:
        sm.add_sequence(cur, s.seq)  # its evidence: the A spans still pending
        return
    room = sm.MAX_EVIDENCE - len(cur.evidence)
    if room > 0:
        cur.evidence.extend(s.evidence[:room])


def sequence_deadlines(
    rules: dict[str, list[CompiledSequenceRule]], traces: list[OpenTrace]
) -> dict[str, int]:
    """Per trace: the latest deadline (ns) of its ``followed_by`` rules' first unmatched A span, or 0.

    ``rules`` are each tenant's sequence rules and ``traces`` the traces (of those
    tenants, ids unique: the assembler keys its traces by id) to look at; a trace's
    folded windows count through its summaries as well as the rows it holds. Each
    distinct program runs once over the rows of every tenant that has it: per tenant,
    the gather and the pass cost 7.5 % of a busy worker with 10 tenants.
    """
    hold = dict.fromkeys((t.trace_id for t in traces), 0)
    if not traces:
        return hold
    programs: dict[tuple[str, str], dict[str, list[CompiledSequenceRule]]] = defaultdict(dict)
    for tenant, compiled_rules in rules.items():
        for compiled in compiled_rules:
            programs[program_key(compiled.rule)].setdefault(tenant, []).append(compiled)
    rows = gather([p for t in traces for p in ([piece(t.overlap)] if t.windows else []) + t.chunks])
    tenants = {t.tenant for t in traces}
    for by_tenant in programs.values():
        part = rows
        if not tenants <= by_tenant.keys():
            tenant_col = rows.column("tenant")
            part = rows.filter(pc.is_in(tenant_col, pa.array(sorted(by_tenant), tenant_col.type)))
        first = next(iter(by_tenant.values()))[0]
        program, ctx = first.program, first.context(part)
        ids = ctx.trace_ids.to_pylist()
        found = {ids[code]: state for code, state in window_states(program, ctx, ctx.all_true).items()}
        within = program.ast.within_ns
        for trace in traces:
            for compiled in by_tenant.get(trace.tenant, ()):
                state = found.get(trace.trace_id)
                summary = trace.summaries.get(sm.rule_key(compiled)) if trace.windows else None
                if summary is not None and summary.seq is not None:
                    earlier = summary.seq.copy()  # what the folded windows left, not changed here
                    if state is not None:
                        earlier.merge(state)
                    state = earlier
                at = state.earliest_deadline(within) if state is not None else None
                if at is not None:
                    hold[trace.trace_id] = max(hold[trace.trace_id], at)
    return hold
