"""Nested sections of :class:`betrace.config.Settings`, one per subsystem.

Each is frozen and forbids unknown keys; env names use ``__``, e.g.
``BETRACE_ARCHIVE__SCHEDULE=02:00``, and a TOML file uses a ``[archive]`` table.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ColdStorageSettings(_Section):
    """Where archived Parquet files go (issue 6)."""

    backend: Literal["filesystem", "s3"] = Field(
        "filesystem", description="filesystem (a directory) or s3 (any S3-compatible object store)"
    )
    path: Path | None = Field(None, description="filesystem backend: root directory; unset: <data_dir>/cold")
    endpoint: str | None = Field(
        None, description="s3 backend: endpoint URL, e.g. http://127.0.0.1:9000; unset: AWS"
    )
    bucket: str = Field("betrace-archive", min_length=3, max_length=63, description="s3 backend: bucket")
    prefix: str = Field("", max_length=200, description="s3 backend: key prefix inside the bucket")
    region: str = Field("us-east-1", min_length=1, description="s3 backend: region")
    access_key: SecretStr | None = Field(None, description="s3 backend: access key id (never logged)")
    secret_key: SecretStr | None = Field(None, description="s3 backend: secret access key (never logged)")
    timeout_s: float = Field(10.0, gt=0, le=600, description="s3 backend: connect and request timeout")


class ArchiveSettings(_Section):
    """The daily archival job and the cleanup policies (issue 6)."""

    enabled: bool = Field(True, description="run the daily archival job in the worker that owns the files")
    schedule: str = Field("02:00", description="time of day (UTC, HH:MM) the job runs")
    hot_days: int = Field(7, ge=0, le=3650, description="whole days kept hot before a day is archived")
    retries: int = Field(5, ge=1, le=50, description="attempts per cold-storage step before a day is failed")
    backoff_base_s: float = Field(0.5, gt=0, le=60, description="first retry delay (doubles, with jitter)")
    backoff_max_s: float = Field(30.0, gt=0, le=3600, description="longest retry delay")
    spans_ttl_days: int = Field(
        365, ge=0, description="archived spans kept this long in cold storage; 0: forever"
    )
    signals_ttl_days: int = Field(730, ge=0, description="archived signals kept this long; 0: forever")
    tenant_quota_bytes: int = Field(
        0, ge=0, description="cold bytes per tenant; past it the oldest archived days go first; 0: no quota"
    )

    @field_validator("schedule")
    @classmethod
    def _hh_mm(cls, value: str) -> str:
        match = re.fullmatch(r"(\d{1,2}):(\d{2})", value.strip())
        if not match or int(match[1]) > 23 or int(match[2]) > 59:
            msg = f"expected a UTC time of day HH:MM (e.g. 02:00), got {value!r}"
            raise ValueError(msg)
        return f"{int(match[1]):02d}:{match[2]}"


class ResilienceSettings(_Section):
    """Circuit breakers, the durable spool and backpressure (issue 7)."""

    breaker_failure_ratio: float = Field(
        0.5, gt=0, le=1, description="share of failed calls in the window that opens a breaker"
    )
    breaker_window_seconds: float = Field(
        30.0, gt=0, description="rolling window over which a breaker counts calls and failures"
    )
    breaker_min_calls: int = Field(
        5, ge=1, description="calls needed in the window before the failure ratio can open a breaker"
    )
    breaker_reset_timeout_seconds: float = Field(
        30.0, gt=0, description="how long an open breaker waits before letting a trial call through"
    )
    spool_dir: str = Field(
        "", description="where sinks spool writes they cannot make; empty means <data_dir>/spool"
    )
    spool_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="spool size per sink above which it signals backpressure"
    )
    spool_segment_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="size at which the spool starts a new segment file"
    )
    spool_ready_max_items: int = Field(
        100_000, ge=0, description="readiness fails while a spool holds more than this many items"
    )
    pause_high_watermark: float = Field(
        0.9, gt=0, le=1, description="fill level of a bounded buffer or spool that pauses consumption"
    )
    resume_low_watermark: float = Field(
        0.5, ge=0, lt=1, description="fill level below which paused partitions resume"
    )
    quarantine_failures: int = Field(
        5, ge=1, description="evaluation failures of one rule within the window that quarantine it"
    )
    quarantine_window_seconds: float = Field(
        300.0, gt=0, description="window over which a rule's evaluation failures are counted"
    )


class CacheSettings(_Section):
    """The Redis cache tier and its in-process fallback (issue 7, docs/cache.md)."""

    enabled: bool = Field(True, description="use Redis; off, only the in-process LRU caches answer")
    url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:16379/0"),
        description="Redis URL, redis://[:password@]host:port/db; may hold a password, never logged",
    )
    key_prefix: str = Field(
        "betrace", pattern=r"^[A-Za-z0-9_.\-]{1,64}$", description="prefix of every Redis key BeTrace writes"
    )
    socket_timeout_s: float = Field(
        0.25, gt=0, le=30, description="connect and read timeout of one Redis call: a dead Redis never stalls"
    )
    compress_min_bytes: int = Field(1024, ge=1, description="values larger than this are zlib-compressed")
    local_max_entries: int = Field(
        50_000, ge=1, description="entries per in-process LRU cache, which answers while Redis is down"
    )
    rules_ttl_s: float = Field(86_400.0, gt=0, description="TTL of rule-set definitions in Redis")
    api_keys_ttl_s: float = Field(300.0, gt=0, description="TTL of cached API key lookups")
    trace_meta_ttl_s: float = Field(
        600.0, gt=0, description="TTL of trace metadata (tenant, state, verdict) for late spans"
    )
    warm_on_start: bool = Field(True, description="load the rule-set definitions from Redis at start-up")


class ReceiverSettings(_Section):
    """The OTLP/HTTP receiver, ``POST /v1/traces`` (issue 7)."""

    enabled: bool = Field(
        True, description="serve POST /v1/traces on the worker's web port (BETRACE_WEB_PORT)"
    )
    port: int = Field(4318, ge=1, le=65535, description="port of the standalone 'betrace receive' server")
    bind: str = Field("127.0.0.1", min_length=1, description="address 'betrace receive' binds")
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="largest body, compressed or inflated; larger gets 413"
    )
    queue_size: int = Field(
        1000, ge=1, description="Kafka records in flight (sent, not yet acknowledged); above 90% full is 503"
    )
    max_input_lag: int = Field(
        100_000, ge=0, description="consumer lag on the input topic above which requests get 503"
    )
    lag_interval_s: float = Field(
        2.0, ge=0.0, description="how long a lag reading is reused; 0 turns the lag check off"
    )
    lag_group: str = Field(
        "", description="consumer group whose input lag counts; empty means the group that runs ingest"
    )
    retry_after_s: int = Field(5, ge=1, le=3600, description="Retry-After seconds of a 503")


class AuditSettings(_Section):
    """The audit trail (issue 9): ``<data_dir>/audit.duckdb``, append-only."""

    enabled: bool = Field(True, description="record audit events; false: nothing is written")
    flush_events: int = Field(500, ge=1, le=100_000, description="write as soon as this many events wait")
    flush_interval_s: float = Field(1.0, gt=0, le=60, description="write buffered events at least this often")
    max_buffered: int = Field(
        100_000, ge=100, le=10_000_000, description="events held while the file is unwritable, then dropped"
    )
    lock_timeout_s: float = Field(
        10.0, gt=0, le=600, description="how long a write or read waits for another process's hold"
    )
    chain_max_depth: int = Field(32, ge=1, le=1000, description="levels a chain query follows each way")
    chain_max_events: int = Field(1000, ge=1, le=100_000, description="events returned by one chain query")
    page_size: int = Field(100, ge=1, le=10_000, description="default page size of event lists")
    page_max: int = Field(1000, ge=1, le=10_000, description="largest page a client may ask for")


class IntegritySettings(_Section):
    """Ingestion runs and trace integrity checks (issue 9)."""

    enabled_at_close: bool = Field(
        True, description="check every trace the evaluate stage receives for structural anomalies"
    )
    clock_skew_ms: float = Field(
        100.0, ge=0, le=3_600_000, description="a child may start this much before its parent unflagged"
    )
    max_buffered_spans: int = Field(
        200_000, ge=1, description="spans awaiting the close-time check; past it a batch goes unchecked"
    )
    recheck_interval_s: float = Field(
        300.0, ge=0, description="the worker rechecks stored spans this often (resolves anomalies); 0: never"
    )
    recheck_lookback_s: float = Field(
        3600.0, gt=0, description="the worker's periodic recheck covers traces ending this recently"
    )
    run_checkpoint_s: float = Field(
        5.0, gt=0, le=3600, description="a worker saves its ingestion run's counters this often"
    )
    import_rate: float = Field(
        0.0, ge=0, description="default 'betrace import' rate limit in spans/s; 0: unlimited"
    )
    import_retries: int = Field(
        8, ge=0, le=100, description="'betrace import' retries of a transient broker error, with backoff"
    )
