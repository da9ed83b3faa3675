"""Shared fixtures: one real Kafka broker per test session, unique topics per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from betrace.cli.demo import demo_settings
from betrace.config import Settings, load_settings
from betrace.dev.kafka import LocalKafka
from betrace.dev.redis import LocalRedis
from betrace.streams.admin import ensure_topics

ROOT = Path(__file__).resolve().parents[1]
TEST_KAFKA_PORT = int(os.environ.get("BETRACE_TEST_KAFKA_PORT", "19392"))


@pytest.fixture(scope="session")
def local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka | None]:
    """The repo's own Apache Kafka broker, or None when ``BETRACE_TEST_BROKERS`` is set.

    ``BETRACE_TEST_BROKERS`` points the suite at an existing cluster (for
    example one started by testcontainers where Docker exists); otherwise
    LocalKafka starts Apache Kafka from the Maven jars.
    """
    if os.environ.get("BETRACE_TEST_BROKERS"):
        yield None
        return
    kafka = LocalKafka(
        tmp_path_factory.mktemp("kafka"),
        port=TEST_KAFKA_PORT,
        cache_dir=ROOT / ".cache" / "kafka",
        pom=ROOT / "scripts" / "kafka" / "pom.xml",
    )
    kafka.up()
    try:
        yield kafka
    finally:
        kafka.down(clean=True)


@pytest.fixture(scope="session")
def kafka_brokers(local_kafka: LocalKafka | None) -> str:
    """Bootstrap servers of the real broker the integration tests use."""
    if local_kafka is None:
        return os.environ["BETRACE_TEST_BROKERS"]
    return local_kafka.bootstrap_servers


@pytest.fixture
def pipeline_settings(kafka_brokers: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings with this test's own topics, consumer group and data directory."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40]
    run_id = f"{name}-{uuid.uuid4().hex[:8]}"
    base = load_settings(brokers=kafka_brokers, rules_dir=ROOT / "config" / "rules")
    cfg = demo_settings(base, run_id, tmp_path / "data", idle_timeout_s=1.0)
    asyncio.run(ensure_topics(cfg))
    return cfg


TEST_REDIS_PORT = int(os.environ.get("BETRACE_TEST_REDIS_PORT", "16479"))


@pytest.fixture(scope="session")
def local_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A real redis-server (Debian's) on ``BETRACE_TEST_REDIS_PORT``, started here, stopped at the end.

    Tests may stop and start it (``local_redis.stop()`` / ``.stop(kill=True)`` /
    ``.start()``) to fake an outage; whoever stops it starts it again.
    """
    server = LocalRedis(tmp_path_factory.mktemp("redis"), port=TEST_REDIS_PORT)
    server.stop()  # a leftover of an interrupted run on this port and data dir
    server.start()
    try:
        yield server
    finally:
        server.clean()


@pytest.fixture
def redis_url(local_redis: LocalRedis) -> str:
    """The URL of the running test Redis (started again if a test left it stopped)."""
    if not local_redis.ping():
        local_redis.start()
    return local_redis.url


class MotoS3:
    """A real moto S3 server process on 127.0.0.1 (stop()/start() fake an outage)."""

    def __init__(self, log: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import socket
        import sys
        import time

        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        msg = f"moto server did not listen on {self.port}: {self.log.read_text()[-2000:]}"
        raise RuntimeError(msg)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """A moto S3-compatible server for the cold storage contract tests (in-memory buckets)."""
    server = MotoS3(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_s3: MotoS3) -> str:
    """A fresh bucket on the moto server (started again if a test left it stopped)."""
    if not moto_s3.running():
        moto_s3.start()
    import pyarrow.fs as pafs

    name = f"betrace-{uuid.uuid4().hex[:12]}"
    fs = pafs.S3FileSystem(
        access_key="test",
        secret_key="test",
        region="us-east-1",
        scheme="http",
        endpoint_override=f"127.0.0.1:{moto_s3.port}",
        allow_bucket_creation=True,
    )
    fs.create_dir(name)
    return name


@contextlib.contextmanager
def refuse_writes(path: Path) -> Iterator[None]:
    """Make ``path`` (a directory) refuse new files: chmod 0500, or ``chattr +i`` for root."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        return
    path.chmod(0o500)
    try:
        yield
    finally:
        path.chmod(0o700)
