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
        for key in keys:  # each version's tree may hold more than this tick
            sm.settle_trees(structural, key, found, into)


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
        for key in keys[tenant_of[trace_id]]:
            _merge(target, key, s)


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
