"""``betrace dev status``/``down`` manage the local Redis next to Kafka (a real redis-server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from betrace.cli.main import app
from betrace.dev.redis import LocalRedis, project_redis
from betrace.errors import DevEnvironmentError

PORT = int(os.environ.get("BETRACE_TEST_REDIS_PORT", "16479")) + 3


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root of its own (``scripts/kafka/pom.xml`` marks it) with the dev Redis port set."""
    (tmp_path / "scripts" / "kafka").mkdir(parents=True)
    (tmp_path / "scripts" / "kafka" / "pom.xml").write_text("<project/>")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BETRACE_DEV_REDIS_PORT", str(PORT))
    return tmp_path


def test_status_and_down_cover_redis(project: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["dev", "status"])
    assert result.exit_code == 3, result.output
    assert f"redis: stopped pid=- port={PORT}" in result.output

    server = project_redis(project)
    assert server.data_dir == project / ".dev" / "redis"
    server.start()
    try:
        result = runner.invoke(app, ["dev", "status"])
        assert f"redis: running pid={server.pid()} port={PORT}" in result.output
        result = runner.invoke(app, ["dev", "down", "--no-redis"])
        assert result.exit_code == 0, result.output
        assert server.ping()  # --no-redis leaves it alone
        result = runner.invoke(app, ["dev", "down", "--clean"])
        assert result.exit_code == 0, result.output
        assert "Redis stopped" in result.output
        assert not server.ping()
        assert not server.data_dir.exists()
    finally:
        server.stop()


def test_a_foreign_server_on_the_port_is_refused(tmp_path: Path) -> None:
    first = LocalRedis(tmp_path / "a", port=PORT)
    first.start()
    try:
        with pytest.raises(DevEnvironmentError, match="not ours"):
            LocalRedis(tmp_path / "b", port=PORT).start()
        assert first.pid() is not None
    finally:
        first.stop()
    assert first.pid() is None
