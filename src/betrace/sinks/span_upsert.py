"""The update half of the span store's upsert (see :mod:`betrace.sinks.duckdb_store`).

A span is keyed by ``(trace_id, span_id)``; of two versions the one with the
later ``end_ns`` wins, and at the same end the higher-ranked status
(unset < error < ok: OpenTelemetry treats OK as final). The order is total, so
replays in any order converge on the same stored row.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Second pass, only when the first stored fewer rows than the batch held: the
#: newest version of each key in the batch replaces an older stored one. Within
#: a batch a key may repeat (DO UPDATE may touch a row once), hence the QUALIFY.
_RANK = "CASE {t}.status_code WHEN 1 THEN 2 WHEN 2 THEN 1 ELSE 0 END"
SPANS_UPDATE_SQL = f"""
INSERT INTO spans
SELECT * FROM _batch
QUALIFY row_number() OVER (
    PARTITION BY trace_id, span_id ORDER BY end_ns DESC, {_RANK.format(t="_batch")} DESC
) = 1
ON CONFLICT (trace_id, span_id) DO UPDATE SET
    parent_span_id = excluded.parent_span_id, name = excluded.name, service = excluded.service,
    kind = excluded.kind, status_code = excluded.status_code, start_ns = excluded.start_ns,
    end_ns = excluded.end_ns, attributes = excluded.attributes,
    resource_attributes = excluded.resource_attributes, produced_ms = excluded.produced_ms
WHERE excluded.end_ns > spans.end_ns
   OR (excluded.end_ns = spans.end_ns
       AND {_RANK.format(t="excluded")} > {_RANK.format(t="spans")})
RETURNING trace_id
"""  # noqa: S608 - fixed expressions
#: Rebuild the summary of traces whose spans were updated, keeping their first ``ingested_ns``.
SUMMARY_REBUILD_SQL = """
CREATE OR REPLACE TEMP TABLE _rebuilt AS
SELECT s.trace_id, ? AS tenant, min(s.start_ns) AS start_ns, max(s.end_ns) AS end_ns,
       count(*) AS span_count, count(*) FILTER (WHERE s.status_code = 2) AS error_count,
       arg_min(s.name, s.start_ns) FILTER (WHERE s.parent_span_id IS NULL OR s.parent_span_id = '')
           AS root_name,
       arg_min(s.service, s.start_ns) FILTER (WHERE s.parent_span_id IS NULL OR s.parent_span_id = '')
           AS root_service,
       coalesce(list_distinct(list(s.service) FILTER (WHERE s.service IS NOT NULL)), []) AS services,
       any_value(k.ingested_ns) AS ingested_ns
FROM spans s
JOIN (SELECT trace_id, min(ingested_ns) AS ingested_ns FROM trace_summaries
      WHERE trace_id IN (SELECT trace_id FROM _touched) GROUP BY trace_id) k USING (trace_id)
GROUP BY s.trace_id
"""
SUMMARY_REPLACE_SQL = """
DELETE FROM trace_summaries WHERE trace_id IN (SELECT trace_id FROM _touched);
INSERT INTO trace_summaries SELECT * FROM _rebuilt;
DROP TABLE _rebuilt;
"""


@dataclass(frozen=True, slots=True)
class UpsertResult:
    #: Keys stored for the first time.
    inserted: int
    #: Stored spans replaced by a newer version (later end, or a higher-ranked status).
    updated: int
