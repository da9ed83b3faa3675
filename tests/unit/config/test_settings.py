"""Settings: BETRACE_* environment, TOML files, validation messages and export."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from betrace.config import Settings, TopicSettings, load_settings, settings_env
from betrace.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No BETRACE_* variable from the outside; undo what load_settings exports."""
    for name in list(os.environ):
        if name.startswith("BETRACE_"):
            monkeypatch.delenv(name)
    yield
    # load_settings(config_file=...) exports BETRACE_CONFIG; monkeypatch then restores any original.
    os.environ.pop("BETRACE_CONFIG", None)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    cfg = load_settings()
    assert cfg.app_id == "betrace"
    assert cfg.brokers == "127.0.0.1:19092"
    assert cfg.topics == TopicSettings()
    assert cfg.topics.partitions == 4
    assert cfg.topics.input_encoding == "otlp_proto"
    assert cfg.tenant_header == "X-Scope-OrgID"
    assert cfg.rules_dir == Path("config/rules")


def test_env_values_are_parsed_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BETRACE_APP_ID", "prod")
    monkeypatch.setenv("BETRACE_IDLE_TIMEOUT_S", "2.5")
    monkeypatch.setenv("BETRACE_DEDUPE_CACHE_SIZE", "0")
    monkeypatch.setenv("BETRACE_DATA_DIR", "/var/lib/betrace")
    monkeypatch.setenv("APP_ID", "ignored-without-prefix")
    cfg = load_settings()
    assert cfg.app_id == "prod"
    assert cfg.idle_timeout_s == 2.5
    assert cfg.dedupe_cache_size == 0
    assert cfg.data_dir == Path("/var/lib/betrace")


def test_nested_topic_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BETRACE_TOPICS__PARTITIONS", "12")
    monkeypatch.setenv("BETRACE_TOPICS__INPUT_ENCODING", "otlp_json")
    cfg = load_settings()
    assert cfg.topics.partitions == 12
    assert cfg.topics.input_encoding == "otlp_json"
    assert cfg.topics.input == "otlp_spans"  # the other nested fields keep their defaults


def test_overrides_beat_env_which_beats_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = write(
        tmp_path / "betrace.toml",
        'app_id = "file"\nidle_timeout_s = 2.0\nbrokers = "k1:9092,k2:9092"\n\n'
        '[topics]\npartitions = 8\ninput = "file-input"\n',
    )
    monkeypatch.setenv("BETRACE_CONFIG", str(config))
    monkeypatch.setenv("BETRACE_APP_ID", "env")
    monkeypatch.setenv("BETRACE_TOPICS__INPUT", "env-input")
    cfg = load_settings(idle_timeout_s=3)
    assert (cfg.app_id, cfg.idle_timeout_s, cfg.brokers) == ("env", 3.0, "k1:9092,k2:9092")
    assert (cfg.topics.partitions, cfg.topics.input) == (8, "env-input")  # deep merge


def test_config_file_argument(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", 'default_tenant = "acme"\n')
    assert load_settings(config).default_tenant == "acme"


def test_missing_config_files_are_config_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml does not exist"):
        load_settings(tmp_path / "nope.toml")
    monkeypatch.setenv("BETRACE_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"BETRACE_CONFIG=.*gone\.toml does not exist"):
        load_settings()


def test_invalid_toml_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BETRACE_CONFIG", str(write(tmp_path / "bad.toml", "app_id = \n")))
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings()


def test_unknown_toml_key_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BETRACE_CONFIG", str(write(tmp_path / "x.toml", "idle_timeout = 3\n")))
    with pytest.raises(ConfigError) as info:
        load_settings()
    [problem] = str(info.value).splitlines()[1:]
    assert problem.split()[0].rstrip(":") == "BETRACE_IDLE_TIMEOUT"
    assert "Extra inputs are not permitted" in problem


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("BETRACE_TOPICS__PARTITIONS", "0", "greater than or equal to 1"),
        ("BETRACE_TOPICS__PARTITIONS", "four", "valid integer"),
        ("BETRACE_TOPICS__INPUT_ENCODING", "otlp_avro", "'otlp_proto' or 'otlp_json'"),
        ("BETRACE_TOPICS__BOGUS", "1", "Extra inputs are not permitted"),
        ("BETRACE_IDLE_TIMEOUT_S", "-1", "greater than 0"),
        ("BETRACE_STORE_CHECKPOINT_MIB", "0", "greater than or equal to 1"),
        ("BETRACE_STORE_MEMORY_MIB", "64", "greater than or equal to 128"),
        ("BETRACE_LOG_LEVEL", "LOUD", "DEBUG"),
        ("BETRACE_WEB_PORT", "70000", "less than or equal to 65535"),
        ("BETRACE_BROKERS", "nohost", "expected host:port"),
        ("BETRACE_BROKERS", "a:9092,b:0", "expected host:port"),
        ("BETRACE_BROKERS", ":9092", "expected host:port"),
        ("BETRACE_DEFAULT_TENANT", "no spaces", "should match pattern"),
    ],
)
def test_errors_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid BeTrace settings (1 problem(s)):"
    assert lines[1].split()[0].rstrip(":") == name
    assert fragment in lines[1]
    assert repr(value) in lines[1]


def test_every_problem_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BETRACE_TOPICS__PARTITIONS", "0")
    monkeypatch.setenv("BETRACE_BATCH_MAX_MESSAGES", "0")
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = str(info.value)
    assert "(2 problem(s))" in text
    assert "BETRACE_TOPICS__PARTITIONS" in text
    assert "BETRACE_BATCH_MAX_MESSAGES" in text


def test_non_json_nested_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BETRACE_TOPICS", "partitions=4")
    with pytest.raises(ConfigError, match="BETRACE_TOPICS"):
        load_settings()


def test_json_nested_value_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BETRACE_TOPICS", '{"partitions": 3, "dlq": "dead"}')
    cfg = load_settings()
    assert (cfg.topics.partitions, cfg.topics.dlq, cfg.topics.input) == (3, "dead", "otlp_spans")


def test_brokers_accept_lists() -> None:
    cfg = Settings(brokers="k1:9092, k2:9093")
    assert cfg.broker_url == "kafka://k1:9092;kafka://k2:9093"


def test_settings_are_frozen() -> None:
    cfg = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.app_id = "changed"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.topics.partitions = 9  # type: ignore[misc]
    assert hash(cfg.topics) == hash(TopicSettings())


def test_tenant_db_path() -> None:
    cfg = Settings(data_dir=Path("/d"))
    assert cfg.tenant_db_path("acme") == Path("/d/tenant=acme.duckdb")


def _from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_settings_env_round_trips_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    original = load_settings()
    env = settings_env(original)
    assert all(k.startswith("BETRACE_") for k in env)
    assert env["BETRACE_TOPICS__PARTITIONS"] == "4"
    assert _from_env(monkeypatch, env) == original


def test_settings_env_round_trips_custom_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    original = Settings(
        app_id="run-42",
        brokers="10.0.0.1:9092,10.0.0.2:9092",
        tenant_header="x-tenant",
        default_tenant="shared.tenant-1",
        rules_dir=Path("/etc/betrace rules"),
        topics=TopicSettings(input="in", input_encoding="otlp_json", partitions=16, dlq="dead"),
        data_dir=tmp_path / "data dir",
        idle_timeout_s=0.25,
        max_trace_age_s=1e-3,
        dedupe_cache_size=0,
        log_format="json",
        web_port=0,
    )
    env = settings_env(original)
    assert env["BETRACE_TOPICS__INPUT_ENCODING"] == "otlp_json"
    assert env["BETRACE_IDLE_TIMEOUT_S"] == "0.25"
    assert _from_env(monkeypatch, env) == original
