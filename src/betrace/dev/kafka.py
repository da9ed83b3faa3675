"""Local Apache Kafka (KRaft) cluster for developers, tests and CI.

Needs only Java 17+ and Maven on the machine: the official Apache Kafka jars
are fetched once from Maven Central with ``scripts/kafka/pom.xml`` into
``<root>/.cache/kafka/<version>/libs`` and the nodes are started straight from
that class path (``java -cp 'libs/*' kafka.Kafka server.properties``).

Layout (``root`` is the project root)::

    .cache/kafka/<version>/libs/        jar cache (safe to keep across cleans)
    .dev/kafka/cluster.json             cluster id + topology, reused on restart
    .dev/kafka/node-<id>/server.properties
    .dev/kafka/node-<id>/data/          log.dirs (KRaft metadata + topic data)
    .dev/kafka/node-<id>/logs/server.log  broker log (log4j2)
    .dev/kafka/node-<id>/kafka.out      JVM stdout/stderr
    .dev/kafka/node-<id>/kafka.pid
    .dev/kafka/tools/tools.log          log of Kafka CLI tools run from here
    .dev/kafka.lock                     serialises up/down between processes

Each node runs in KRaft combined mode (``process.roles=broker,controller``)
with a static controller quorum, so ``brokers=3`` gives a 3-voter quorum of 3
brokers on consecutive ports. Client ports are ``port .. port+brokers-1``;
controller ports are ``controller_port ..`` (default ``port + 1000``).

From a shell: ``scripts/dev-kafka.sh up|down|status|clean [--brokers N]``.
From Python::

    kafka = LocalKafka(Path("."))
    kafka.up()
    ...  # use kafka.bootstrap_servers
    kafka.down()

All methods are synchronous and block; from async code call them through
``asyncio.to_thread``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

from betrace.errors import BetraceError

__all__ = [
    "DEFAULT_HEAP_OPTS",
    "DEFAULT_PORT",
    "ENV_HEAP_OPTS",
    "ENV_PORT",
    "KAFKA_VERSION",
    "KafkaDevError",
    "LocalKafka",
    "MissingToolError",
    "NodeStatus",
    "main",
]

logger = logging.getLogger(__name__)

#: Apache Kafka version; must match ``kafka.version`` in scripts/kafka/pom.xml
#: (it is also passed to Maven as ``-Dkafka.version``).
KAFKA_VERSION = "4.1.1"
DEFAULT_PORT = 19092
#: Controller (KRaft quorum) ports start this far above the client port.
CONTROLLER_PORT_OFFSET = 1000
DEFAULT_HEAP_OPTS = "-Xms256m -Xmx512m"
#: Seconds ``down()`` lets nodes that lost the controller quorum try to finish
#: before it SIGKILLs them.
QUORUM_LOSS_GRACE = 5.0
ENV_PORT = "BETRACE_DEV_KAFKA_PORT"
ENV_HEAP_OPTS = "BETRACE_KAFKA_HEAP_OPTS"
MIN_JAVA_MAJOR = 17

_KAFKA_MAIN = "kafka.Kafka"
_STORAGE_TOOL = "kafka.tools.StorageTool"
_CONSUMER_GROUP_COMMAND = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"
_FETCH_MARKER = ".betrace-fetch.json"
_REPO_ROOT = Path(__file__).resolve().parents[3]
_KAFKA_SCRIPTS = Path("scripts") / "kafka"
_BROKER_JVM_OPTS = (
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)
# Short-lived CLI tools: start fast, small heap.
_TOOL_JVM_OPTS = (
    "-Xms32m",
    "-Xmx256m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
)

# Starts the JVM as a grandchild in its own session and exits at once, so the
# broker is never our child: no zombie when it dies, no ResourceWarning for a
# still-running Popen, and it outlives the calling process (CLI use).
_LAUNCHER = r"""
import os, subprocess, sys
log_path, cwd, *cmd = sys.argv[1:]
with open(log_path, "ab", buffering=0) as log:
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
    )
sys.stdout.write(str(proc.pid))
sys.stdout.flush()
os._exit(0)
"""


class KafkaDevError(BetraceError):
    """The local Kafka could not be fetched, started, stopped or queried."""


class MissingToolError(KafkaDevError):
    """A required external program (java, mvn) is not installed."""


@dataclasses.dataclass(frozen=True)
class NodeStatus:
    """State of one local Kafka node (combined broker + controller)."""

    node_id: int
    pid: int | None
    running: bool
    port: int
    controller_port: int
    data_dir: Path
    log_file: Path


@dataclasses.dataclass(frozen=True)
class _Metadata:
    cluster_id: str | None
    controller_id: int
    broker_ids: frozenset[int]


class LocalKafka:
    """A local Apache Kafka cluster (KRaft, combined broker+controller nodes).

    ``root`` is the project root: data and logs go to ``root/.dev/kafka``, the
    jar cache to ``cache_dir/<version>/libs`` (default ``root/.cache/kafka``).
    ``port`` is node 1's client port (default: env ``BETRACE_DEV_KAFKA_PORT``,
    else 19092); node *i* listens on ``port + i - 1`` for clients and
    ``controller_port + i - 1`` for the KRaft quorum (default
    ``port + 1000``). JVM heap: ``heap_opts``, else env
    ``BETRACE_KAFKA_HEAP_OPTS``, else ``-Xms256m -Xmx512m``.
    """

    def __init__(
        self,
        root: Path,
        brokers: int = 1,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        cache_dir: Path | None = None,
        controller_port: int | None = None,
        heap_opts: str | None = None,
        version: str = KAFKA_VERSION,
        pom: Path | None = None,
    ) -> None:
        if brokers < 1:
            msg = f"brokers must be >= 1, got {brokers}"
            raise ValueError(msg)
        self.root = Path(root).resolve()
        self.brokers = brokers
        self.port = port if port is not None else _env_port()
        self.host = host
        self.controller_port = (
            controller_port if controller_port is not None else self.port + CONTROLLER_PORT_OFFSET
        )
        for first in (self.port, self.controller_port):
            if not 0 < first <= 65535 - brokers:
                msg = f"port {first} out of range for {brokers} nodes"
                raise ValueError(msg)
        client = set(range(self.port, self.port + brokers))
        quorum = set(range(self.controller_port, self.controller_port + brokers))
        if client & quorum:
            msg = f"client ports {sorted(client)} overlap controller ports {sorted(quorum)}"
            raise ValueError(msg)
        self.version = version
        self.cache_dir = (
            Path(cache_dir).resolve() if cache_dir is not None else self.root / ".cache" / "kafka"
        )
        env_heap = os.environ.get(ENV_HEAP_OPTS, "").strip()
        self.heap_opts = heap_opts if heap_opts is not None else (env_heap or DEFAULT_HEAP_OPTS)
        self._pom = pom.resolve() if pom is not None else None
        self._java_checked: str | None = None

    def __repr__(self) -> str:
        return (
            f"LocalKafka(root={str(self.root)!r}, brokers={self.brokers}, "
            f"bootstrap_servers={self.bootstrap_servers!r}, version={self.version!r})"
        )

    # ------------------------------------------------------------------ paths

    @property
    def bootstrap_servers(self) -> str:
        """Comma-separated ``host:port`` of every node, e.g. ``127.0.0.1:19092``."""
        return ",".join(f"{self.host}:{self.node_port(n)}" for n in self.node_ids)

    @property
    def node_ids(self) -> list[int]:
        return list(range(1, self.brokers + 1))

    @property
    def state_dir(self) -> Path:
        """``root/.dev/kafka``: configs, data, logs and pid files."""
        return self.root / ".dev" / "kafka"

    @property
    def libs_dir(self) -> Path:
        """``cache_dir/<version>/libs``: the Kafka jars (class path ``libs/*``)."""
        return self.cache_dir / self.version / "libs"

    def node_port(self, node_id: int) -> int:
        self._check_node(node_id)
        return self.port + node_id - 1

    def node_controller_port(self, node_id: int) -> int:
        self._check_node(node_id)
        return self.controller_port + node_id - 1

    def node_dir(self, node_id: int) -> Path:
        self._check_node(node_id)
        return self.state_dir / f"node-{node_id}"

    def log_file(self, node_id: int) -> Path:
        """The node's broker log (log4j2)."""
        return self.node_dir(node_id) / "logs" / "server.log"

    def _data_dir(self, node_id: int) -> Path:
        return self.node_dir(node_id) / "data"

    def _props_file(self, node_id: int) -> Path:
        return self.node_dir(node_id) / "server.properties"

    def _pid_file(self, node_id: int) -> Path:
        return self.node_dir(node_id) / "kafka.pid"

    def _out_file(self, node_id: int) -> Path:
        return self.node_dir(node_id) / "kafka.out"

    def _cluster_file(self) -> Path:
        return self.state_dir / "cluster.json"

    def _check_node(self, node_id: int) -> None:
        if not 1 <= node_id <= self.brokers:
            msg = f"node_id must be in 1..{self.brokers}, got {node_id}"
            raise ValueError(msg)

    # ------------------------------------------------------------------ fetch

    def is_fetched(self) -> bool:
        """True if the jar cache for this version is complete (and up to date
        with scripts/kafka/pom.xml, when that file can be found)."""
        marker = self.libs_dir / _FETCH_MARKER
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(info, dict) or info.get("version") != self.version:
            return False
        pom = self._find_pom()
        if pom is not None and info.get("pom_sha256") != _sha256(pom):
            logger.debug("%s changed since the last fetch", pom)
            return False
        return (self.libs_dir / f"kafka_2.13-{self.version}.jar").is_file()

    def fetch(self, timeout: float = 900.0) -> Path:
        """Download the Kafka jars with Maven unless already cached.

        Idempotent and fast when cached. Returns the libs directory.
        """
        if self.is_fetched():
            return self.libs_dir
        self._java()  # Maven needs it too; fail with the clearer message first
        version_dir = self.libs_dir.parent
        version_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(version_dir / ".fetch.lock"):
            if self.is_fetched():  # another process fetched while we waited
                return self.libs_dir
            pom = self._find_pom()
            if pom is None:
                msg = (
                    f"cannot fetch Kafka jars: {_KAFKA_SCRIPTS / 'pom.xml'} not found "
                    f"under {self.root} or {_REPO_ROOT}; pass LocalKafka(pom=...)"
                )
                raise KafkaDevError(msg)
            mvn = shutil.which("mvn")
            if mvn is None:
                msg = (
                    "Apache Maven (`mvn`) is needed once to download the Kafka "
                    f"{self.version} jars into {self.libs_dir} but was not found on "
                    "PATH. Install Maven 3.6+ (Debian/Ubuntu: `apt-get install maven`, "
                    "macOS: `brew install maven`)."
                )
                raise MissingToolError(msg)
            partial = version_dir / f"libs.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            cmd = [
                mvn,
                "-B",
                "-ntp",
                "-Dstyle.color=never",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={partial}",
                f"-Dkafka.version={self.version}",
            ]
            logger.info("fetching Apache Kafka %s jars with Maven into %s", self.version, self.libs_dir)
            started = time.monotonic()
            try:
                rc, tail = _run_streaming(cmd, cwd=pom.parent, timeout=timeout)
                if rc != 0:
                    msg = (
                        f"mvn failed with exit code {rc} fetching Kafka {self.version} "
                        f"jars ({' '.join(cmd)}):\n{tail}"
                    )
                    raise KafkaDevError(msg)
                jars = sorted(p.name for p in partial.glob("*.jar"))
                if f"kafka_2.13-{self.version}.jar" not in jars:
                    msg = (
                        f"mvn succeeded but kafka_2.13-{self.version}.jar is missing from "
                        f"{partial}; check {pom}"
                    )
                    raise KafkaDevError(msg)
                marker = {
                    "version": self.version,
                    "pom": str(pom),
                    "pom_sha256": _sha256(pom),
                    "fetched_at": dt.datetime.now(dt.UTC).isoformat(),
                    "jars": jars,
                }
                (partial / _FETCH_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
                if self.libs_dir.exists():
                    shutil.rmtree(self.libs_dir)
                os.replace(partial, self.libs_dir)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            logger.info(
                "fetched %d jars for Kafka %s in %.1fs",
                len(jars),
                self.version,
                time.monotonic() - started,
            )
        return self.libs_dir

    # ------------------------------------------------------------ up / down

    def up(self, timeout: float = 90.0) -> None:
        """Fetch if needed, then start every node that is not running and
        wait until the cluster serves metadata with all brokers registered.

        A no-op (a quick check) when the cluster is already up and healthy.
        """
        deadline = time.monotonic() + timeout
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            running = {s.node_id for s in self.status() if s.running}
            if len(running) == self.brokers and self._all_ready(timeout=2.0):
                logger.info("local Kafka already up at %s", self.bootstrap_servers)
                return
            self.fetch()
            self._java()
            started_at = time.monotonic()
            cluster_id = self._prepare(format_nodes=[n for n in self.node_ids if n not in running])
            started: list[int] = []
            try:
                for node_id in self.node_ids:
                    if node_id not in running:
                        self._launch(node_id)
                        started.append(node_id)
                self._wait_ready(self.node_ids, cluster_id, deadline)
            except BaseException:
                for node_id in started:
                    self._terminate(node_id, timeout=10.0)
                raise
            logger.info(
                "local Kafka up at %s (%d node(s), cluster id %s) in %.1fs",
                self.bootstrap_servers,
                self.brokers,
                cluster_id,
                time.monotonic() - started_at,
            )

    def down(self, clean: bool = False, timeout: float = 30.0) -> None:
        """Stop all nodes (SIGTERM, then SIGKILL after ``timeout`` seconds) and
        remove their pid files; ``clean=True`` also deletes ``.dev/kafka``
        (data, configs, logs, cluster id). The jar cache is kept.

        In a multi-node cluster the last nodes to go lose the controller
        quorum and could wait minutes for a controlled-shutdown grant that can
        no longer come; such nodes are SIGKILLed after ``QUORUM_LOSS_GRACE``
        seconds (page-cache data survives SIGKILL; restart runs log recovery).
        """
        with self._lock():
            node_ids = self._known_node_ids()
            alive = {}
            for node_id in node_ids:
                pid = self._running_pid(node_id)
                if pid is not None:
                    logger.info("stopping Kafka node %d (pid %d)", node_id, pid)
                    _signal(pid, signal.SIGTERM)
                    alive[node_id] = pid
            majority = len(node_ids) // 2 + 1
            deadline = time.monotonic() + timeout
            quorum_lost_at: float | None = None
            while alive:
                alive = {n: pid for n, pid in alive.items() if _pid_alive(pid)}
                now = time.monotonic()
                if alive and quorum_lost_at is None and len(alive) < majority:
                    quorum_lost_at = now
                stuck = quorum_lost_at is not None and now - quorum_lost_at > QUORUM_LOSS_GRACE
                if alive and (now >= deadline or stuck):
                    for node_id, pid in alive.items():
                        logger.warning(
                            "Kafka node %d (pid %d) still running %s; sending SIGKILL",
                            node_id,
                            pid,
                            "without a controller quorum" if stuck else f"after {timeout:.0f}s",
                        )
                        _signal(pid, signal.SIGKILL)
                    kill_deadline = now + 10.0
                    for node_id, pid in alive.items():
                        _wait_dead_or_kill(pid, kill_deadline, f"node {node_id}")
                    break
                time.sleep(0.1)
            for node_id in node_ids:
                self._pid_file_for(node_id).unlink(missing_ok=True)
            if clean and self.state_dir.exists():
                logger.info("removing %s", self.state_dir)
                shutil.rmtree(self.state_dir)

    def status(self) -> list[NodeStatus]:
        """One entry per node of this cluster."""
        result = []
        for node_id in self.node_ids:
            pid = self._running_pid(node_id)
            result.append(
                NodeStatus(
                    node_id=node_id,
                    pid=pid,
                    running=pid is not None,
                    port=self.node_port(node_id),
                    controller_port=self.node_controller_port(node_id),
                    data_dir=self._data_dir(node_id),
                    log_file=self.log_file(node_id),
                )
            )
        return result

    def is_ready(self, timeout: float = 5.0) -> bool:
        """True if every node is running and answers a metadata request
        listing all brokers of the cluster."""
        if not all(s.running for s in self.status()):
            return False
        return self._all_ready(timeout)

    # --------------------------------------------------------- single nodes

    def start_node(self, node_id: int, timeout: float = 90.0) -> None:
        """Start one node (no-op if running) and wait until it is serving as
        an unfenced broker. Other nodes may be down (enough voters for a
        quorum majority must be up for it to become ready)."""
        self._check_node(node_id)
        deadline = time.monotonic() + timeout
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if self._running_pid(node_id) is not None:
                logger.info("Kafka node %d already running", node_id)
                return
            self.fetch()
            cluster_id = self._prepare(format_nodes=[node_id])
            self._launch(node_id)
            try:
                self._wait_ready([node_id], cluster_id, deadline, require_all_brokers=False)
            except BaseException:
                self._terminate(node_id, timeout=10.0)
                raise

    def stop_node(self, node_id: int, timeout: float = 30.0) -> None:
        """Gracefully stop one node (SIGTERM, SIGKILL after ``timeout``)."""
        self._check_node(node_id)
        with self._lock():
            self._terminate(node_id, timeout)

    def kill_node(self, node_id: int) -> None:
        """SIGKILL one node (crash simulation) and wait until it is gone."""
        self._check_node(node_id)
        with self._lock():
            pid = self._running_pid(node_id)
            if pid is not None:
                logger.info("killing Kafka node %d (pid %d)", node_id, pid)
                _signal(pid, signal.SIGKILL)
                _wait_dead_or_kill(pid, time.monotonic() + 10.0, f"node {node_id}")
            self._pid_file(node_id).unlink(missing_ok=True)

    # ----------------------------------------------------------------- tools

    def consumer_groups_describe(self, group: str, timeout: float = 60.0) -> str:
        """Run Kafka's own ``kafka-consumer-groups --describe --group GROUP``
        (ConsumerGroupCommand) against this cluster and return its stdout."""
        proc = self.run_tool(
            _CONSUMER_GROUP_COMMAND,
            ["--bootstrap-server", self.bootstrap_servers, "--describe", "--group", group],
            timeout=timeout,
        )
        # It exits 0 even on failures (e.g. an unknown group) and prints
        # "Error: ..." on stdout (stack trace on stderr).
        errors = [line for line in proc.stdout.splitlines() if line.startswith("Error:")]
        if proc.returncode != 0 or errors:
            detail = "\n".join(errors) or (proc.stdout + proc.stderr).strip()
            msg = (
                f"ConsumerGroupCommand --describe --group {group} failed "
                f"(exit code {proc.returncode}): {detail}"
            )
            raise KafkaDevError(msg)
        return proc.stdout

    def run_tool(
        self, main_class: str, args: Sequence[str], timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a Kafka CLI main class (e.g. ``kafka.tools.StorageTool``,
        ``org.apache.kafka.tools.TopicCommand``) from the cached jars; returns
        the completed process (text stdout/stderr, not checked)."""
        self.fetch()
        tools_dir = self.state_dir / "tools"
        tools_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self._java(),
            *_TOOL_JVM_OPTS,
            *self._log_opts(tools_dir, "tools.log"),
            "-cp",
            self._classpath(),
            main_class,
            *args,
        ]
        logger.debug("running %s", " ".join(cmd))
        try:
            return subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            msg = f"{main_class} timed out after {timeout:.0f}s"
            raise KafkaDevError(msg) from exc

    def log_tail(self, node_id: int, lines: int = 40) -> str:
        """Last lines of the node's broker log and JVM output, for diagnostics."""
        parts = []
        for path in (self.log_file(node_id), self._out_file(node_id)):
            tail = _tail(path, lines)
            if tail:
                parts.append(f"--- {path} (last {lines} lines) ---\n{tail}")
        return "\n".join(parts) or f"(no log output under {self.node_dir(node_id)})"

    # -------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        lock_path = self.state_dir.parent / "kafka.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(lock_path):
            yield

    def _find_pom(self) -> Path | None:
        if self._pom is not None:
            return self._pom if self._pom.is_file() else None
        for base in (self.root, _REPO_ROOT):
            candidate = base / _KAFKA_SCRIPTS / "pom.xml"
            if candidate.is_file():
                return candidate
        return None

    def _log4j_config(self) -> Path | None:
        pom = self._find_pom()
        candidates = [pom.parent] if pom is not None else []
        candidates += [self.root / _KAFKA_SCRIPTS, _REPO_ROOT / _KAFKA_SCRIPTS]
        for base in candidates:
            if (base / "log4j2.properties").is_file():
                return base / "log4j2.properties"
        return None

    def _log_opts(self, log_dir: Path, log_file: str) -> list[str]:
        opts = [f"-Dkafka.logs.dir={log_dir}", f"-Dbetrace.kafka.logfile={log_file}"]
        config = self._log4j_config()
        if config is not None:
            opts.append(f"-Dlog4j2.configurationFile={config}")
        else:
            logger.warning("scripts/kafka/log4j2.properties not found; Kafka logs to its stdout")
        return opts

    def _classpath(self) -> str:
        return str(self.libs_dir / "*")

    def _java(self) -> str:
        if self._java_checked is not None:
            return self._java_checked
        java: str | None = None
        java_home = os.environ.get("JAVA_HOME")
        if java_home and (Path(java_home) / "bin" / "java").is_file():
            java = str(Path(java_home) / "bin" / "java")
        else:
            java = shutil.which("java")
        if java is None:
            msg = (
                f"Java {MIN_JAVA_MAJOR}+ is required to run the local Kafka but `java` was "
                "not found on PATH (and JAVA_HOME is not set). Install a JDK or JRE "
                f"{MIN_JAVA_MAJOR}+ (Debian/Ubuntu: `apt-get install "
                f"openjdk-{MIN_JAVA_MAJOR}-jdk-headless`, macOS: "
                f"`brew install openjdk@{MIN_JAVA_MAJOR}`)."
            )
            raise MissingToolError(msg)
        try:
            proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            msg = f"cannot run {java} -version: {exc}"
            raise MissingToolError(msg) from exc
        match = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
        if match is None:
            logger.warning("could not parse `%s -version` output; assuming Java 17+", java)
        else:
            major = int(match.group(1))
            if major == 1 and match.group(2):  # "1.8.0_392" style
                major = int(match.group(2))
            if major < MIN_JAVA_MAJOR:
                msg = (
                    f"Kafka {self.version} needs Java {MIN_JAVA_MAJOR}+ but {java} is Java "
                    f"{major}. Install Java {MIN_JAVA_MAJOR}+ and put it on PATH or set "
                    "JAVA_HOME."
                )
                raise MissingToolError(msg)
        self._java_checked = java
        return java

    def _known_node_ids(self) -> list[int]:
        """Node ids of this config plus any other node dirs found on disk (so
        ``down`` also stops nodes of a cluster started with more brokers)."""
        ids = set(self.node_ids)
        if self.state_dir.is_dir():
            for path in self.state_dir.glob("node-*"):
                suffix = path.name.removeprefix("node-")
                if suffix.isdigit():
                    ids.add(int(suffix))
        return sorted(ids)

    def _pid_file_for(self, node_id: int) -> Path:
        return self.state_dir / f"node-{node_id}" / "kafka.pid"

    def _running_pid(self, node_id: int) -> int | None:
        """Pid of the node's JVM if it is alive; removes stale pid files."""
        pid_file = self._pid_file_for(node_id)
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        props = self.state_dir / f"node-{node_id}" / "server.properties"
        if _pid_alive(pid) and _is_kafka_process(pid, props):
            return pid
        logger.debug("removing stale pid file %s (pid %d)", pid_file, pid)
        pid_file.unlink(missing_ok=True)
        return None

    def _load_cluster(self) -> dict[str, object]:
        try:
            data = json.loads(self._cluster_file().read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            msg = f"corrupt {self._cluster_file()}: {exc}"
            raise KafkaDevError(msg) from exc
        return data if isinstance(data, dict) else {}

    def _prepare(self, format_nodes: Sequence[int]) -> str:
        """Write cluster.json and server.properties, format new node dirs."""
        info = self._load_cluster()
        cluster_id = info.get("cluster_id")
        if info and info.get("brokers") != self.brokers:
            msg = (
                f"{self.state_dir} holds a cluster of {info.get('brokers')} node(s) but "
                f"{self.brokers} were asked for; run `down(clean=True)` "
                "(scripts/dev-kafka.sh clean) first"
            )
            raise KafkaDevError(msg)
        if not isinstance(cluster_id, str) or not cluster_id:
            cluster_id = _random_cluster_id()
            logger.info("new local Kafka cluster id %s", cluster_id)
        info.update(
            cluster_id=cluster_id,
            brokers=self.brokers,
            version=self.version,
            port=self.port,
            controller_port=self.controller_port,
            host=self.host,
        )
        _atomic_write(self._cluster_file(), json.dumps(info, indent=2) + "\n")
        for node_id in self.node_ids:
            for sub in ("data", "logs"):
                (self.node_dir(node_id) / sub).mkdir(parents=True, exist_ok=True)
            _atomic_write(self._props_file(node_id), self._server_properties(node_id))
        to_format = [n for n in format_nodes if not (self._data_dir(n) / "meta.properties").exists()]
        if to_format:
            self._format(to_format, cluster_id)
        return cluster_id

    def _server_properties(self, node_id: int) -> str:
        rf = min(3, self.brokers)
        min_isr = min(2, self.brokers)
        voters = ",".join(f"{n}@{self.host}:{self.node_controller_port(n)}" for n in self.node_ids)
        port = self.node_port(node_id)
        cport = self.node_controller_port(node_id)
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node_id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{self.host}:{port},CONTROLLER://{self.host}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self._data_dir(node_id)),
            "num.partitions": "1",
            "default.replication.factor": str(rf),
            "offsets.topic.replication.factor": str(rf),
            "transaction.state.log.replication.factor": str(rf),
            "transaction.state.log.min.isr": str(min_isr),
            "share.coordinator.state.topic.replication.factor": str(rf),
            "share.coordinator.state.topic.min.isr": str(min_isr),
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            # Small machines (2 cores): fewer threads than the defaults.
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "4",
        }
        lines = [
            f"# Generated by betrace.dev.kafka for node {node_id}; rewritten on every start.",
            *(f"{key}={value}" for key, value in props.items()),
        ]
        return "\n".join(lines) + "\n"

    def _format(self, node_ids: Sequence[int], cluster_id: str) -> None:
        # Static quorum (controller.quorum.voters): Kafka 4.x formats it without
        # --standalone / --initial-controllers (those are for dynamic quorums).
        procs: list[tuple[int, subprocess.Popen[str]]] = []
        tools_dir = self.state_dir / "tools"
        tools_dir.mkdir(parents=True, exist_ok=True)
        for node_id in node_ids:
            cmd = [
                self._java(),
                *_TOOL_JVM_OPTS,
                *self._log_opts(tools_dir, "tools.log"),
                "-cp",
                self._classpath(),
                _STORAGE_TOOL,
                "format",
                "--config",
                str(self._props_file(node_id)),
                "--cluster-id",
                cluster_id,
                "--ignore-formatted",
            ]
            logger.info("formatting storage of Kafka node %d", node_id)
            procs.append(
                (
                    node_id,
                    subprocess.Popen(
                        cmd,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    ),
                )
            )
        errors = []
        for node_id, proc in procs:
            try:
                out, _ = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                errors.append(f"node {node_id}: StorageTool format timed out\n{out}")
                continue
            logger.debug("StorageTool format node %d: %s", node_id, out.strip())
            if proc.returncode != 0:
                errors.append(f"node {node_id}: exit code {proc.returncode}\n{out}")
        if errors:
            raise KafkaDevError("formatting Kafka storage failed:\n" + "\n".join(errors))

    def _launch(self, node_id: int) -> int:
        for what, port in (
            ("client", self.node_port(node_id)),
            ("controller", self.node_controller_port(node_id)),
        ):
            if _port_listening(self.host, port, wait=5.0):
                msg = (
                    f"cannot start Kafka node {node_id}: {what} port {self.host}:{port} is "
                    f"already in use (another Kafka? choose another port, e.g. "
                    f"{ENV_PORT}=<port>)"
                )
                raise KafkaDevError(msg)
        logs_dir = self.node_dir(node_id) / "logs"
        cmd = [
            self._java(),
            *self.heap_opts.split(),
            *_BROKER_JVM_OPTS,
            *self._log_opts(logs_dir, "server.log"),
            "-cp",
            self._classpath(),
            _KAFKA_MAIN,
            str(self._props_file(node_id)),
        ]
        out_file = self._out_file(node_id)
        with out_file.open("ab") as out:
            stamp = dt.datetime.now().isoformat(timespec="seconds")
            out.write(f"\n=== {stamp} starting: {' '.join(cmd)}\n".encode())
        proc = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(out_file), str(self.node_dir(node_id)), *cmd],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0 or not proc.stdout.strip().isdigit():
            msg = f"could not launch Kafka node {node_id}: {proc.stdout}{proc.stderr}"
            raise KafkaDevError(msg)
        pid = int(proc.stdout.strip())
        _atomic_write(self._pid_file(node_id), f"{pid}\n")
        logger.info(
            "started Kafka node %d (pid %d) on %s:%d, log %s",
            node_id,
            pid,
            self.host,
            self.node_port(node_id),
            self.log_file(node_id),
        )
        return pid

    def _terminate(self, node_id: int, timeout: float) -> None:
        pid = self._running_pid(node_id)
        if pid is not None:
            logger.info("stopping Kafka node %d (pid %d)", node_id, pid)
            _signal(pid, signal.SIGTERM)
            _wait_dead_or_kill(pid, time.monotonic() + timeout, f"node {node_id}")
        self._pid_file(node_id).unlink(missing_ok=True)

    def _all_ready(self, timeout: float) -> bool:
        expected = set(self.node_ids)
        cluster_id = self._load_cluster().get("cluster_id")
        for node_id in self.node_ids:
            try:
                md = _fetch_metadata(self.host, self.node_port(node_id), timeout)
            except OSError:
                return False
            if md.broker_ids != expected or md.cluster_id != cluster_id:
                return False
        return True

    def _wait_ready(
        self,
        node_ids: Sequence[int],
        cluster_id: str,
        deadline: float,
        require_all_brokers: bool = True,
    ) -> None:
        expected = set(self.node_ids)
        pending = list(node_ids)
        last_problem = "not probed yet"
        while True:
            for node_id in list(pending):
                if self._running_pid(node_id) is None:
                    raise KafkaDevError(
                        f"Kafka node {node_id} exited during startup.\n" + self.log_tail(node_id)
                    )
                port = self.node_port(node_id)
                try:
                    md = _fetch_metadata(self.host, port, timeout=2.0)
                except OSError as exc:
                    last_problem = f"node {node_id} ({self.host}:{port}): {exc}"
                    continue
                if md.cluster_id != cluster_id:
                    msg = (
                        f"{self.host}:{port} answers with cluster id {md.cluster_id!r}, "
                        f"expected {cluster_id!r}: another Kafka is using this port"
                    )
                    raise KafkaDevError(msg)
                ok = md.broker_ids >= expected if require_all_brokers else node_id in md.broker_ids
                if ok:
                    pending.remove(node_id)
                else:
                    last_problem = (
                        f"node {node_id} sees brokers {sorted(md.broker_ids)}, waiting for {sorted(expected)}"
                    )
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise KafkaDevError(
                    f"timed out waiting for Kafka node(s) {pending} to become ready "
                    f"({last_problem}).\n" + "\n".join(self.log_tail(n) for n in pending)
                )
            time.sleep(0.25)


# ---------------------------------------------------------------- helpers


def _env_port() -> int:
    raw = os.environ.get(ENV_PORT, "").strip()
    if not raw:
        return DEFAULT_PORT
    try:
        return int(raw)
    except ValueError:
        msg = f"{ENV_PORT} must be an integer port, got {raw!r}"
        raise ValueError(msg) from None


def _random_cluster_id() -> str:
    """Like Kafka's ``Uuid.randomUuid().toString()`` (22-char base64url)."""
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not value.startswith("-"):  # Kafka avoids ids that look like CLI flags
            return value


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("r", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip()
    except OSError:
        return ""


def _run_streaming(cmd: Sequence[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run ``cmd``, logging each output line at DEBUG; returns (exit code,
    last 60 lines)."""
    tail: deque[str] = deque(maxlen=60)
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for raw_line in proc.stdout:
            line = raw_line.rstrip()
            if line:
                tail.append(line)
                logger.debug("mvn: %s", line)
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc < 0:
        tail.append(f"(killed after {timeout:.0f}s timeout)")
    return rc, "\n".join(tail)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (dead, not yet reaped by its parent) still accepts signal 0.
    # But the thread-group leader of a SIGKILLed JVM turns zombie while its
    # other threads are still exiting (and still hold the listening sockets):
    # dead only once no other thread is left.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[:1] != ["Z"]:
            return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return Path(f"/proc/{pid}").exists() or not Path("/proc/self").exists()


def _is_kafka_process(pid: int, props: Path) -> bool:
    """Guards against pid reuse: is ``pid`` a kafka.Kafka JVM for ``props``?"""
    args: list[str]
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False  # Linux: the process is gone
        try:  # macOS / BSD
            out = subprocess.run(
                ["ps", "-p", str(pid), "-o", "command="],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return True
        return _KAFKA_MAIN in out and str(props) in out
    except OSError:
        return True
    return _KAFKA_MAIN in args and str(props) in args


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_dead_or_kill(pid: int, deadline: float, what: str) -> None:
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            logger.warning("%s (pid %d) did not stop in time; sending SIGKILL", what, pid)
            _signal(pid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 10.0
            while _pid_alive(pid):
                if time.monotonic() >= kill_deadline:
                    msg = f"{what} (pid {pid}) survived SIGKILL"
                    raise KafkaDevError(msg)
                time.sleep(0.1)
            return
        time.sleep(0.1)


def _port_listening(host: str, port: int, wait: float = 0.0) -> bool:
    """True if something still accepts TCP connections on host:port after
    up to ``wait`` seconds (a node that just died may take a moment to let go).

    (A bind() test would also trip over the lingering FIN_WAIT/TIME_WAIT
    sockets a just-killed node leaves behind, which Kafka's own bind ignores.)
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                pass
        except OSError:
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.2)


# Minimal Kafka wire protocol: one MetadataRequest v7 (empty topic list), enough
# to prove the node serves requests and to see which brokers are registered.
_METADATA_API_KEY = 3
_METADATA_VERSION = 7
_PROBE_CLIENT_ID = b"betrace-dev-kafka-probe"


def _fetch_metadata(host: str, port: int, timeout: float) -> _Metadata:
    """Raises OSError (incl. timeouts and protocol errors) if not answered."""
    correlation_id = 1
    request = (
        struct.pack(
            ">hhih",
            _METADATA_API_KEY,
            _METADATA_VERSION,
            correlation_id,
            len(_PROBE_CLIENT_ID),
        )
        + _PROBE_CLIENT_ID
        + struct.pack(">ib", 0, 0)  # topics: [], allow_auto_topic_creation: false
    )
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        if not 0 < size < 10_000_000:
            msg = f"bad Kafka response size {size}"
            raise OSError(msg)
        payload = _recv_exact(sock, size)
    try:
        return _parse_metadata(payload, correlation_id)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        msg = f"unparsable Kafka metadata response: {exc}"
        raise OSError(msg) from exc


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            msg = "connection closed by the Kafka node"
            raise ConnectionError(msg)
        buf += chunk
    return bytes(buf)


def _parse_metadata(payload: bytes, correlation_id: int) -> _Metadata:
    offset = 0

    def read(fmt: str) -> int:
        nonlocal offset
        (value,) = struct.unpack_from(fmt, payload, offset)
        offset += struct.calcsize(fmt)
        return int(value)

    def read_string() -> str | None:
        nonlocal offset
        length = read(">h")
        if length < 0:
            return None
        value = payload[offset : offset + length].decode()
        offset += length
        return value

    if read(">i") != correlation_id:
        msg = "Kafka response has an unexpected correlation id"
        raise OSError(msg)
    read(">i")  # throttle_time_ms
    broker_ids = set()
    for _ in range(read(">i")):
        broker_ids.add(read(">i"))  # node_id
        read_string()  # host
        read(">i")  # port
        read_string()  # rack
    cluster_id = read_string()
    controller_id = read(">i")
    return _Metadata(cluster_id=cluster_id, controller_id=controller_id, broker_ids=frozenset(broker_ids))


# -------------------------------------------------------------------- CLI


def _default_root() -> Path:
    """The enclosing project (a parent with scripts/kafka/pom.xml), else cwd."""
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents):
        if (candidate / _KAFKA_SCRIPTS / "pom.xml").is_file():
            return candidate
    return cwd


def _recorded_cluster(root: Path) -> dict[str, int]:
    """Topology of the cluster last started under ``root`` (CLI defaults)."""
    try:
        data = json.loads((root / ".dev" / "kafka" / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k in ("brokers", "port") and isinstance(v, int)}


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--brokers",
        type=int,
        default=None,
        metavar="N",
        help="number of nodes, each a combined KRaft broker+controller; 1 or 3 "
        "(default: as recorded in .dev/kafka/cluster.json, else 1)",
    )
    common.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"client port of node 1; node i uses PORT+i-1, controllers PORT+"
        f"{CONTROLLER_PORT_OFFSET}+i-1 (default: ${ENV_PORT}, else as recorded in "
        f".dev/kafka/cluster.json, else {DEFAULT_PORT})",
    )
    common.add_argument(
        "--root",
        type=Path,
        default=None,
        help="project root holding .dev/ and .cache/ (default: the enclosing checkout)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    parser = argparse.ArgumentParser(
        prog="dev-kafka",
        description=(
            f"Local Apache Kafka {KAFKA_VERSION} (KRaft) for development, tests and CI. "
            "Needs Java 17+ and, once, Maven (the jars are cached under "
            ".cache/kafka/). Data and logs live under .dev/kafka/. "
            "Run 'COMMAND --help' for a command's options."
        ),
        epilog=(
            f"Environment: {ENV_PORT} (client port), {ENV_HEAP_OPTS} (JVM heap, default "
            f"'{DEFAULT_HEAP_OPTS}'), JAVA_HOME. Example: scripts/dev-kafka.sh up "
            "--brokers 3"
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser(
        "up", parents=[common], help="fetch jars if needed, start the cluster, wait until ready"
    )
    up.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for readiness (default: 90)")
    sub.add_parser("down", parents=[common], help="stop the cluster (data is kept)")
    sub.add_parser("clean", parents=[common], help="stop the cluster and delete .dev/kafka")
    sub.add_parser("status", parents=[common], help="show nodes, pids, ports")
    sub.add_parser("fetch", parents=[common], help="only download the Kafka jars (once)")
    describe = sub.add_parser(
        "describe-group",
        parents=[common],
        help="kafka-consumer-groups --describe --group GROUP (Kafka's own tool)",
    )
    describe.add_argument("group")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (``python -m betrace.dev.kafka --help``)."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    root = args.root if args.root is not None else _default_root()
    recorded = _recorded_cluster(root)
    brokers: int = args.brokers if args.brokers is not None else recorded.get("brokers", 1)
    port: int | None = args.port
    if port is None and not os.environ.get(ENV_PORT) and "port" in recorded:
        port = recorded["port"]
    error: KafkaDevError | None = None
    try:
        kafka = LocalKafka(root, brokers=brokers, port=port)
        command: str = args.command
        if command == "up":
            kafka.up(timeout=args.timeout)
            sys.stdout.write(f"{kafka.bootstrap_servers}\n")
        elif command == "down":
            kafka.down()
        elif command == "clean":
            kafka.down(clean=True)
        elif command == "fetch":
            sys.stdout.write(f"{kafka.fetch()}\n")
        elif command == "describe-group":
            sys.stdout.write(kafka.consumer_groups_describe(args.group))
        elif command == "status":
            rows = kafka.status()
            ready = kafka.is_ready(timeout=2.0) if all(r.running for r in rows) else False
            sys.stdout.write(f"bootstrap_servers={kafka.bootstrap_servers} ready={ready}\n")
            sys.stdout.write("node  pid      running  port   controller  data_dir\n")
            for row in rows:
                sys.stdout.write(
                    f"{row.node_id:<5} {row.pid or '-'!s:<8} {row.running!s:<8} {row.port:<6} "
                    f"{row.controller_port:<11} {row.data_dir}\n"
                )
            return 0 if ready else 3
    except KafkaDevError as exc:
        error = exc
    if error is not None:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
