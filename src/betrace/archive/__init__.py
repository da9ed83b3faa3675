"""Archival (PRD-002d): hot DuckDB days to Parquet in cold storage, verified, then removed from hot.

* :mod:`~betrace.archive.layout` - keys and manifests in cold storage
* :mod:`~betrace.archive.state` - the per-unit state machine in the tenant file
* :mod:`~betrace.archive.hot` - export and cleanup SQL
* :mod:`~betrace.archive.job` - the resumable two-phase job
* :mod:`~betrace.archive.coldread` - hot and cold behind one set of table names for queries
* :mod:`~betrace.archive.storage` - stats, the retention hook, TTL and quota cleanup
* :mod:`~betrace.archive.service` - cleanup runs and the daily schedule
"""
