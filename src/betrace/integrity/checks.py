"""Structural integrity checks over spans, as one vectorised DuckDB query.

The same query runs on a batch of closed traces of any number of tenants (an
Arrow table registered on a scratch in-memory connection; only what it finds is
written to each tenant's file) and on the stored ``spans`` of a tenant
(``betrace integrity check`` and the worker's periodic recheck). Kinds:

``orphan_span``
    the parent span id never arrived: it is neither in the span's trace nor,
    as far as the check can see, in any other trace;
``parent_in_other_trace``
    the parent span id names a span of another trace;
``child_before_parent``
    the child starts earlier than its parent by more than the clock-skew
    allowance (``BETRACE_INTEGRITY__CLOCK_SKEW_MS``);
``missing_root``
    no span of the trace lacks a parent;
``conflicting_duplicate``
    one span id arrived more than once in a trace with another parent, name
    or start time (a later end time or another status is an *update*, not a
    conflict). Only the close-time check sees these: the store keeps one row
    per span id.
"""

from __future__ import annotations

import hashlib

KINDS = (
    "orphan_span",
    "parent_in_other_trace",
    "child_before_parent",
    "missing_root",
    "conflicting_duplicate",
)
#: Kinds a check over stored spans decides (and so may resolve).
STORED_KINDS = KINDS[:4]

#: ``{src}``: the spans to check; ``{universe}``: where a missing parent is looked for in
#: other traces. Parameters: the clock-skew allowance in nanoseconds. Every key includes the
#: tenant, so one query checks a batch of many tenants as it would check each alone.
CHECK_SQL = """
WITH s AS (
    SELECT tenant, trace_id, span_id, nullif(parent_span_id, '') AS parent_span_id, name, start_ns
    FROM {src}
),
own AS (
    SELECT tenant, trace_id, span_id, min(start_ns) AS start_ns FROM s GROUP BY tenant, trace_id, span_id
),
kids AS (
    SELECT DISTINCT c.tenant, c.trace_id, c.span_id, c.parent_span_id, c.start_ns,
           p.span_id IS NOT NULL AS found, p.start_ns AS parent_start
    FROM s c LEFT JOIN own p
      ON p.tenant = c.tenant AND p.trace_id = c.trace_id AND p.span_id = c.parent_span_id
    WHERE c.parent_span_id IS NOT NULL
),
missing AS (SELECT DISTINCT tenant, trace_id, span_id, parent_span_id FROM kids WHERE NOT found),
elsewhere AS (
    SELECT m.tenant, m.trace_id, m.span_id, m.parent_span_id, min(u.trace_id) AS parent_trace_id
    FROM missing m JOIN {universe} u
      ON u.tenant = m.tenant AND u.span_id = m.parent_span_id AND u.trace_id <> m.trace_id
    GROUP BY ALL
)
SELECT 'orphan_span' AS kind, m.tenant, m.trace_id, m.span_id,
       json_object('parent_span_id', m.parent_span_id) AS details
FROM missing m ANTI JOIN elsewhere e USING (tenant, trace_id, span_id)
UNION ALL
SELECT 'parent_in_other_trace', tenant, trace_id, span_id,
       json_object('parent_span_id', parent_span_id, 'parent_trace_id', parent_trace_id)
FROM elsewhere
UNION ALL
SELECT 'child_before_parent', tenant, trace_id, span_id,
       json_object('parent_span_id', parent_span_id,
                   'early_by_ms', round((parent_start - min(start_ns)) / 1e6, 3),
                   'allowance_ms', round(? / 1e6, 3))
FROM kids WHERE found GROUP BY tenant, trace_id, span_id, parent_span_id, parent_start
HAVING min(start_ns) < parent_start - ?
UNION ALL
SELECT 'missing_root', tenant, trace_id, '',
       json_object('spans', count(DISTINCT span_id))
FROM s GROUP BY tenant, trace_id HAVING count(*) FILTER (WHERE parent_span_id IS NULL) = 0
UNION ALL
SELECT 'conflicting_duplicate', tenant, trace_id, span_id,
       json_object('versions', count(DISTINCT (parent_span_id, name, start_ns)))
FROM s GROUP BY tenant, trace_id, span_id
HAVING count(DISTINCT (coalesce(parent_span_id, ''), name, start_ns)) > 1
"""


def check_sql(src: str, universe: str) -> str:
    """The check over relation ``src``, resolving foreign parents in ``universe``."""
    return CHECK_SQL.format(src=src, universe=universe)


def anomaly_id(tenant: str, kind: str, trace_id: str, span_id: str) -> str:
    """Deterministic: re-checking the same data finds the same ids, so nothing doubles."""
    key = f"{tenant}\x1f{kind}\x1f{trace_id}\x1f{span_id}".encode()
    return hashlib.sha256(key).hexdigest()[:32]
