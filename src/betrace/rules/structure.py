"""Vectorised tree relations between two span masks of one batch.

Each function takes the masks of the left (``a``) and right (``b``) operand
and returns the spans of ``b`` standing in the relation to some span of
``a`` in the same trace, as TraceQL's structural operators define it. Parent
links come from :meth:`BatchContext.parent_index`, which only links spans of
the same trace, so relations never cross traces of one batch. Walks up the
tree take one vectorised step per tree level, bounded by
:data:`~betrace.rules.batch.MAX_TREE_DEPTH`.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from betrace.rules.batch import MAX_TREE_DEPTH, BatchContext, members

Relation = Callable[[BatchContext, pa.Array, pa.Array], pa.Array]


def child(ctx: BatchContext, a: pa.Array, b: pa.Array) -> pa.Array:
    """``a > b``: spans of ``b`` whose parent is in ``a``."""
    parent_in_a = pc.take(a, ctx.parent_index()).fill_null(False)
    return pc.and_(b, parent_in_a)


def parent(ctx: BatchContext, a: pa.Array, b: pa.Array) -> pa.Array:
    """``a < b``: spans of ``b`` that are the parent of a span in ``a``."""
    parents = pc.filter(ctx.parent_index(), a).drop_null()
    return pc.and_(b, members(parents, ctx.n))


def descendant(ctx: BatchContext, a: pa.Array, b: pa.Array) -> pa.Array:
    """``a >> b``: spans of ``b`` with an ancestor in ``a``."""
    parents = ctx.parent_index()
    rows = pc.indices_nonzero(b)
    cursor = pc.take(parents, rows)
    found = pa.repeat(pa.scalar(False), len(rows))
    for _ in range(MAX_TREE_DEPTH):
        if cursor.null_count == len(cursor):
            break
        found = pc.or_(found, pc.take(a, cursor).fill_null(False))
        cursor = pc.take(parents, cursor)
    return ctx.rows_mask(pc.filter(rows, found))


def ancestor(ctx: BatchContext, a: pa.Array, b: pa.Array) -> pa.Array:
    """``a << b``: spans of ``b`` that are an ancestor of a span in ``a``."""
    parents = ctx.parent_index()
    frontier = pc.unique(pc.filter(parents, a).drop_null())
    seen: list[pa.Array] = []
    for _ in range(MAX_TREE_DEPTH):
        if len(frontier) == 0:
            break
        seen.append(frontier)
        frontier = pc.unique(pc.take(parents, frontier).drop_null())
    if not seen:
        return ctx.all_false
    ancestors = pa.concat_arrays(seen)
    return pc.and_(b, members(ancestors, ctx.n))


def sibling(ctx: BatchContext, a: pa.Array, b: pa.Array) -> pa.Array:
    """``a ~ b``: spans of ``b`` sharing a parent with a different span of ``a``."""
    parents = ctx.parent_index()
    counts = pc.value_counts(pc.filter(parents, a).drop_null())
    # Per span: how many a-spans share its parent (a-children per row, looked up by parent).
    a_children = ctx.scatter(counts.field(0), counts.field(1), ctx.n, 0)
    a_siblings = pc.take(a_children, parents).fill_null(0)
    others = pc.subtract(a_siblings, pc.cast(a, pa.int64()))
    return pc.and_(b, pc.greater(others, 0))


def _negated(relation: Relation) -> Relation:
    def apply(ctx: BatchContext, a: pa.Array, b: pa.Array) -> pa.Array:
        return pc.and_(b, pc.invert(relation(ctx, a, ctx.all_true)))

    return apply


def _union(relation: Relation, converse: Relation) -> Relation:
    # ``a &>> b`` keeps both ends: b-spans below an a-span and a-spans above a b-span.
    def apply(ctx: BatchContext, a: pa.Array, b: pa.Array) -> pa.Array:
        return pc.or_(relation(ctx, a, b), converse(ctx, b, a))

    return apply


RELATIONS: dict[str, Relation] = {
    ">": child,
    "<": parent,
    ">>": descendant,
    "<<": ancestor,
    "~": sibling,
}
RELATIONS |= {"!" + op: _negated(rel) for op, rel in list(RELATIONS.items())}
RELATIONS |= {
    "&>": _union(child, parent),
    "&<": _union(parent, child),
    "&>>": _union(descendant, ancestor),
    "&<<": _union(ancestor, descendant),
    "&~": _union(sibling, sibling),
}
