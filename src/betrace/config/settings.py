"""BeTrace settings: one pydantic-settings model, env prefix ``BETRACE_``.

Values come from, highest first: keyword overrides, ``BETRACE_*`` environment
variables, a TOML file (``BETRACE_CONFIG`` or ``--config``), then defaults.
Nested fields use ``__`` in env names, e.g. ``BETRACE_TOPICS__INPUT=spans``.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from betrace.config.sections import (
    ArchiveSettings,
    AuditSettings,
    CacheSettings,
    ColdStorageSettings,
    IntegritySettings,
    ReceiverSettings,
    ResilienceSettings,
)
from betrace.errors import ConfigError

Encoding = Literal["otlp_proto", "otlp_json"]


class TopicSettings(BaseModel):
    """Names and layout of the Kafka topics (see docs/architecture.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: str = Field("otlp_spans", min_length=1, description="OTLP spans from producers")
    input_encoding: Encoding = Field(
        "otlp_proto", description="otlp_proto or otlp_json, as the Collector's exporter"
    )
    spans: str = Field("betrace.spans", min_length=1, description="ingest -> assemble")
    traces: str = Field("betrace.traces", min_length=1, description="assemble -> evaluate")
    store: str = Field(
        "betrace.store", min_length=1, description="ingest -> span store sink, partitioned by tenant"
    )
    signals: str = Field("betrace.signals", min_length=1, description="signal output")
    dlq: str = Field("betrace.dlq", min_length=1, description="dead letters")
    rules: str = Field(
        "betrace.rules", min_length=1, description="compacted rules topic: every version of every rule"
    )
    partitions: int = Field(4, ge=1, le=1024, description="partitions of the topics BeTrace creates")
    replication_factor: int = Field(1, ge=1, le=5, description="replication of topics BeTrace creates")


class AssemblyOverrides(BaseModel):
    """Per-tenant overrides of the trace-assembly settings; unset fields use the global value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    idle_timeout_s: float | None = Field(None, gt=0, le=3600, description="idle time before close")
    root_close_delay_s: float | None = Field(
        None, ge=0, le=3600, description="idle time before close once the root span arrived; 0 = off"
    )
    max_trace_age_s: float | None = Field(None, gt=0, description="force-close a trace this old")
    window_spans: int | None = Field(None, ge=2, le=1_000_000, description="spans per window")
    window_overlap_pct: float | None = Field(None, ge=0, lt=100, description="window overlap, percent")
    max_live_traces: int | None = Field(None, ge=1, description="live traces of this tenant")
    max_trace_bytes: int | None = Field(None, ge=1024, description="span bytes per trace")
    decision_cache_s: float | None = Field(None, ge=0, description="how long verdicts are remembered")


@dataclass(frozen=True, slots=True)
class AssemblyPolicy:
    """The effective assembly settings of one tenant (globals with its overrides applied)."""

    idle_timeout_s: float
    max_trace_age_s: float
    window_spans: int
    window_overlap_pct: float
    max_live_traces: int
    max_trace_bytes: int
    decision_cache_s: float
    #: Once the root span arrived, this idle time closes the trace; 0: the idle timeout only.
    root_close_delay_s: float = 0.0

    @property
    def overlap_spans(self) -> int:
        """Spans carried into the next window (at most ``window_spans - 1``)."""
        return min(self.window_spans - 1, round(self.window_spans * self.window_overlap_pct / 100))


class Settings(BaseSettings):
    """Every tunable of a BeTrace worker and CLI, validated once at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="BETRACE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        toml_file=None,
    )

    stages: Literal["all", "ingest", "downstream"] = Field(
        "all",
        description="stages this worker runs: all, ingest, or downstream (assemble, evaluate, sinks)",
    )
    app_id: str = Field(
        "betrace", pattern=r"^[A-Za-z0-9_.\-]{1,200}$", description="faust app id = consumer group"
    )
    brokers: str = Field("127.0.0.1:19092", min_length=1, description="Kafka bootstrap servers")
    topics: TopicSettings = TopicSettings()
    tenant_header: str = Field("X-Scope-OrgID", min_length=1, description="Kafka header naming the tenant")
    default_tenant: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9_.\-]{1,64}$",
        description="tenant when neither header nor resource names one",
    )
    data_dir: Path = Field(Path(".dev/data"), description="DuckDB files, one per tenant")
    rules_dir: Path = Field(Path("config/rules"), description="per-tenant rule YAML files")
    idle_timeout_s: float = Field(5.0, gt=0, le=3600, description="close a trace after this idle time")
    root_close_delay_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="once a trace's root span arrived, close it after this idle time instead; 0 = off",
    )
    max_trace_age_s: float = Field(3600.0, gt=0, description="force-close a trace this old")
    max_live_traces: int = Field(200_000, ge=1, description="per worker; oldest closed early past it")
    window_spans: int = Field(
        100, ge=2, le=1_000_000, description="spans per assembly window of a long trace"
    )
    window_overlap_pct: float = Field(
        20.0, ge=0, lt=100, description="percent of a window carried into the next one"
    )
    max_live_traces_per_tenant: int = Field(
        100_000, ge=1, description="live traces per tenant; oldest closed early past it"
    )
    max_trace_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="span bytes per trace; evaluated early, later spans dropped"
    )
    decision_cache_s: float = Field(
        300.0, ge=0, description="how long verdicts of closed traces are kept for late spans; 0 disables"
    )
    decision_cache_max_traces: int = Field(
        500_000, ge=0, description="closed traces remembered at most; oldest forgotten first"
    )
    checkpoint_interval_s: float = Field(
        10.0, gt=0, le=3600, description="max time open-trace spans wait before their state is saved"
    )
    assembly_tenants: dict[str, AssemblyOverrides] = Field(
        default_factory=dict, description='per-tenant assembly overrides, e.g. {"acme": {...}}'
    )
    batch_max_messages: int = Field(500, ge=1, le=100_000, description="records per stage batch")
    batch_max_wait_s: float = Field(0.05, gt=0, le=10, description="max wait to fill a batch")
    store_flush_rows: int = Field(
        250_000,
        ge=1,
        description="span rows the DuckDB sink buffers at most before it must flush; a full buffer "
        "writes each tenant's whole DuckDB row groups (122,880 rows) and keeps the rest",
    )
    store_flush_interval_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="longest time spans wait in the DuckDB sink's buffer; every flush is one "
        "transaction per tenant, so with many tenants a longer wait means fewer, larger ones",
    )
    store_checkpoint_mib: int = Field(
        128,
        ge=1,
        le=65_536,
        description="write-ahead log size (MiB) at which a tenant file is checkpointed; "
        "larger: faster appends, longer log replay after a crash",
    )
    store_memory_mib: int = Field(
        256,
        ge=128,
        le=1_048_576,
        description="block cache (MiB) of the one DuckDB instance holding all of a process's tenant "
        "files, plus 2 MiB per open file; blocks beyond it are evicted or spilled. Queries and "
        "appends need room in it too: 64 MiB for 10 busy tenants failed writes with DuckDB "
        "out-of-memory errors (DuckDB's own default: 80 percent of RAM per file)",
    )
    dedupe_cache_size: int = Field(2_000_000, ge=0, description="recent span keys kept at ingest")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="package log level")
    log_format: Literal["text", "json", "logfmt"] = Field("text", description="log line format on stderr")
    web_port: int = Field(6066, ge=0, le=65535, description="worker HTTP port (metrics, health); 0 disables")
    web_bind: str = Field("127.0.0.1", min_length=1, description="address the worker HTTP server binds")
    tigerbeetle_addresses: str | None = Field(
        None, description="TigerBeetle replica addresses; unset means the embedded ledger in data_dir"
    )
    tigerbeetle_cluster_id: int = Field(0, ge=0, description="TigerBeetle cluster id")
    ledger_flush_items: int = Field(128, ge=1, le=8189, description="ledger writes at this many transfers")
    ledger_flush_interval_s: float = Field(
        0.05, gt=0, le=60, description="or when the oldest buffered transfer is this old"
    )
    retention_days: float = Field(7.0, gt=0, description="hot-store retention; only archived data is removed")
    api_port: int = Field(0, ge=0, le=65535, description="query API served by the worker; 0 disables it")
    api_host: str = Field("127.0.0.1", min_length=1, description="query API bind address")
    api_keys_file: Path | None = Field(None, description="API key file; default <data_dir>/apikeys.json")
    metrics_max_tenants: int = Field(100, ge=0, description="distinct tenant label values exported")
    lag_interval_s: float = Field(5.0, gt=0, le=3600, description="how often the worker measures lag")
    lag_threshold: int = Field(10_000, ge=0, description="total lag above which a group is lagging")
    cold: ColdStorageSettings = ColdStorageSettings()
    archive: ArchiveSettings = ArchiveSettings()
    resilience: ResilienceSettings = ResilienceSettings()
    cache: CacheSettings = CacheSettings()
    receiver: ReceiverSettings = ReceiverSettings()
    audit: AuditSettings = AuditSettings()
    integrity: IntegritySettings = IntegritySettings()

    @field_validator("brokers")
    @classmethod
    def _check_brokers(cls, value: str) -> str:
        for hostport in value.split(","):
            host, sep, port = hostport.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                msg = f"expected host:port[,host:port...], got {hostport.strip()!r}"
                raise ValueError(msg)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("BETRACE_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    def assembly_policy(self, tenant: str) -> AssemblyPolicy:
        """Assembly settings for ``tenant``: its overrides, else the global values."""
        o = self.assembly_tenants.get(tenant) or AssemblyOverrides()

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return AssemblyPolicy(
            idle_timeout_s=pick(o.idle_timeout_s, self.idle_timeout_s),
            max_trace_age_s=pick(o.max_trace_age_s, self.max_trace_age_s),
            window_spans=pick(o.window_spans, self.window_spans),
            window_overlap_pct=pick(o.window_overlap_pct, self.window_overlap_pct),
            max_live_traces=pick(o.max_live_traces, self.max_live_traces_per_tenant),
            max_trace_bytes=pick(o.max_trace_bytes, self.max_trace_bytes),
            decision_cache_s=pick(o.decision_cache_s, self.decision_cache_s),
            root_close_delay_s=pick(o.root_close_delay_s, self.root_close_delay_s),
        )

    @property
    def group_id(self) -> str:
        """Consumer group (and faust app id) of this worker: ingest-only workers get their own."""
        return f"{self.app_id}.ingest" if self.stages == "ingest" else self.app_id

    @property
    def broker_url(self) -> str:
        """The broker list in faust's ``kafka://`` URL form."""
        return ";".join(f"kafka://{b.strip()}" for b in self.brokers.split(","))

    def tenant_db_path(self, tenant: str) -> Path:
        """The DuckDB file that holds ``tenant``'s spans and signals."""
        return self.data_dir / f"tenant={tenant}.duckdb"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read the settings once, failing fast with a readable message."""
    if config_file is not None:
        if not config_file.is_file():
            msg = f"config file {config_file} does not exist"
            raise ConfigError(msg)
        os.environ["BETRACE_CONFIG"] = str(config_file)
    path = os.environ.get("BETRACE_CONFIG")
    if path and not Path(path).is_file():
        msg = f"BETRACE_CONFIG={path} does not exist"
        raise ConfigError(msg)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [f"invalid BeTrace settings ({exc.error_count()} problem(s)):"]
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            env = "BETRACE_" + "__".join(str(p) for p in err["loc"]).upper()
            lines.append(f"  {env} ({key}): {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None
    except SettingsError as exc:
        # e.g. BETRACE_TOPICS='not json': pydantic-settings fails before validation.
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"BETRACE_{field.group(1).upper()}" if field else "a BETRACE_* variable"
        msg = f"invalid BeTrace settings: {name} could not be parsed ({exc}); nested values take JSON"
        raise ConfigError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"config file {path} is not valid TOML: {exc}"
        raise ConfigError(msg) from None


def _env_value(value: Any) -> str:
    if isinstance(value, SecretStr):  # a child process needs the secret itself, not its mask
        return value.get_secret_value()
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """Export ``settings`` as ``BETRACE_*`` variables, to start a worker process with them."""
    env: dict[str, str] = {}
    for name, value in settings:
        if value is None:
            continue
        if isinstance(value, BaseModel):
            for sub, subvalue in value:
                if subvalue is not None:
                    env[f"BETRACE_{name.upper()}__{sub.upper()}"] = _env_value(subvalue)
        elif isinstance(value, dict):  # e.g. assembly_tenants: pydantic-settings reads JSON
            env[f"BETRACE_{name.upper()}"] = json.dumps(
                {
                    k: v.model_dump(exclude_none=True) if isinstance(v, BaseModel) else v
                    for k, v in value.items()
                }
            )
        else:
            env[f"BETRACE_{name.upper()}"] = _env_value(value)
    return env
