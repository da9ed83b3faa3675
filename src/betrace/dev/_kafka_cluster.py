"""LocalKafka: fetches, starts, stops and inspects the nodes of a local Kafka KRaft cluster."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from betrace.dev._kafka_config import (
    BROKER_JVM_OPTS,
    CONSUMER_GROUP_COMMAND,
    CONTROLLER_PORT_OFFSET,
    DEFAULT_HEAP_OPTS,
    ENV_HEAP_OPTS,
    ENV_PORT,
    FETCH_MARKER,
    KAFKA_MAIN,
    KAFKA_SCRIPTS,
    KAFKA_VERSION,
    QUORUM_LOSS_GRACE,
    REPO_ROOT,
    STORAGE_TOOL,
    TOOL_JVM_OPTS,
    KafkaDevError,
    NodeStatus,
    env_port,
    random_cluster_id,
    render_server_properties,
)
from betrace.dev._kafka_probe import fetch_metadata
from betrace.dev._kafka_proc import (
    atomic_write,
    file_lock,
    is_kafka_process,
    launch_detached,
    pid_alive,
    port_listening,
    read_tail,
    send_signal,
    wait_dead_or_kill,
)
from betrace.dev._kafka_tools import download_jars, find_java, sha256

# Deliberately the historical name (not __name__): log configuration and the
# "%(name)s" in log lines stay as they were before kafka.py was split up.
logger = logging.getLogger("betrace.dev.kafka")


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
        self.port = port if port is not None else env_port()
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
        marker = self.libs_dir / FETCH_MARKER
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(info, dict) or info.get("version") != self.version:
            return False
        pom = self._find_pom()
        if pom is not None and info.get("pom_sha256") != sha256(pom):
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
        with file_lock(version_dir / ".fetch.lock"):
            if self.is_fetched():  # another process fetched while we waited
                return self.libs_dir
            pom = self._find_pom()
            if pom is None:
                msg = (
                    f"cannot fetch Kafka jars: {KAFKA_SCRIPTS / 'pom.xml'} not found "
                    f"under {self.root} or {REPO_ROOT}; pass LocalKafka(pom=...)"
                )
                raise KafkaDevError(msg)
            download_jars(pom, self.libs_dir, self.version, timeout)
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
                    send_signal(pid, signal.SIGTERM)
                    alive[node_id] = pid
            majority = len(node_ids) // 2 + 1
            deadline = time.monotonic() + timeout
            quorum_lost_at: float | None = None
            while alive:
                alive = {n: pid for n, pid in alive.items() if pid_alive(pid)}
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
                        send_signal(pid, signal.SIGKILL)
                    kill_deadline = now + 10.0
                    for node_id, pid in alive.items():
                        wait_dead_or_kill(pid, kill_deadline, f"node {node_id}")
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
                send_signal(pid, signal.SIGKILL)
                wait_dead_or_kill(pid, time.monotonic() + 10.0, f"node {node_id}")
            self._pid_file(node_id).unlink(missing_ok=True)

    # ----------------------------------------------------------------- tools

    def consumer_groups_describe(self, group: str, timeout: float = 60.0) -> str:
        """Run Kafka's own ``kafka-consumer-groups --describe --group GROUP``
        (ConsumerGroupCommand) against this cluster and return its stdout."""
        proc = self.run_tool(
            CONSUMER_GROUP_COMMAND,
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
            *TOOL_JVM_OPTS,
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
            tail = read_tail(path, lines)
            if tail:
                parts.append(f"--- {path} (last {lines} lines) ---\n{tail}")
        return "\n".join(parts) or f"(no log output under {self.node_dir(node_id)})"

    # -------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        lock_path = self.state_dir.parent / "kafka.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(lock_path):
            yield

    def _find_pom(self) -> Path | None:
        if self._pom is not None:
            return self._pom if self._pom.is_file() else None
        for base in (self.root, REPO_ROOT):
            candidate = base / KAFKA_SCRIPTS / "pom.xml"
            if candidate.is_file():
                return candidate
        return None

    def _log4j_config(self) -> Path | None:
        pom = self._find_pom()
        candidates = [pom.parent] if pom is not None else []
        candidates += [self.root / KAFKA_SCRIPTS, REPO_ROOT / KAFKA_SCRIPTS]
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
        if self._java_checked is None:
            self._java_checked = find_java(self.version)
        return self._java_checked

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
        if pid_alive(pid) and is_kafka_process(pid, props):
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
            cluster_id = random_cluster_id()
            logger.info("new local Kafka cluster id %s", cluster_id)
        info.update(
            cluster_id=cluster_id,
            brokers=self.brokers,
            version=self.version,
            port=self.port,
            controller_port=self.controller_port,
            host=self.host,
        )
        atomic_write(self._cluster_file(), json.dumps(info, indent=2) + "\n")
        for node_id in self.node_ids:
            for sub in ("data", "logs"):
                (self.node_dir(node_id) / sub).mkdir(parents=True, exist_ok=True)
            atomic_write(self._props_file(node_id), self._server_properties(node_id))
        to_format = [n for n in format_nodes if not (self._data_dir(n) / "meta.properties").exists()]
        if to_format:
            self._format(to_format, cluster_id)
        return cluster_id

    def _server_properties(self, node_id: int) -> str:
        return render_server_properties(
            node_id,
            host=self.host,
            port=self.node_port(node_id),
            controller_ports={n: self.node_controller_port(n) for n in self.node_ids},
            data_dir=self._data_dir(node_id),
        )

    def _format(self, node_ids: Sequence[int], cluster_id: str) -> None:
        # Static quorum (controller.quorum.voters): Kafka 4.x formats it without
        # --standalone / --initial-controllers (those are for dynamic quorums).
        procs: list[tuple[int, subprocess.Popen[str]]] = []
        tools_dir = self.state_dir / "tools"
        tools_dir.mkdir(parents=True, exist_ok=True)
        for node_id in node_ids:
            cmd = [
                self._java(),
                *TOOL_JVM_OPTS,
                *self._log_opts(tools_dir, "tools.log"),
                "-cp",
                self._classpath(),
                STORAGE_TOOL,
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
            if port_listening(self.host, port, wait=5.0):
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
            *BROKER_JVM_OPTS,
            *self._log_opts(logs_dir, "server.log"),
            "-cp",
            self._classpath(),
            KAFKA_MAIN,
            str(self._props_file(node_id)),
        ]
        pid = launch_detached(cmd, self._out_file(node_id), self.node_dir(node_id), f"Kafka node {node_id}")
        atomic_write(self._pid_file(node_id), f"{pid}\n")
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
            send_signal(pid, signal.SIGTERM)
            wait_dead_or_kill(pid, time.monotonic() + timeout, f"node {node_id}")
        self._pid_file(node_id).unlink(missing_ok=True)

    def _all_ready(self, timeout: float) -> bool:
        expected = set(self.node_ids)
        cluster_id = self._load_cluster().get("cluster_id")
        for node_id in self.node_ids:
            try:
                md = fetch_metadata(self.host, self.node_port(node_id), timeout)
            except OSError:
                return False
            if md.broker_ids != expected or md.cluster_id != cluster_id:
                return False
        return True

    def _died_silently(self, node_id: int) -> bool:
        """True if the node's last launch left no output after its banner."""
        if read_tail(self.log_file(node_id), 1):
            return False
        out = read_tail(self._out_file(node_id), 200) or ""
        return not out.rpartition("=== ")[2].partition("\n")[2].strip()

    def _wait_ready(
        self,
        node_ids: Sequence[int],
        cluster_id: str,
        deadline: float,
        require_all_brokers: bool = True,
    ) -> None:
        expected = set(self.node_ids)
        pending = list(node_ids)
        relaunched: set[int] = set()
        last_problem = "not probed yet"
        while True:
            for node_id in list(pending):
                if self._running_pid(node_id) is None:
                    tail = self.log_tail(node_id)
                    if node_id in relaunched or not self._died_silently(node_id):
                        msg = f"Kafka node {node_id} exited during startup.\n{tail}"
                        raise KafkaDevError(msg)
                    # A JVM that dies before printing a line was killed from
                    # outside (e.g. by the OOM killer on a busy host); a
                    # configuration error always leaves output. One retry.
                    logger.warning("Kafka node %d died silently during startup; relaunching once", node_id)
                    relaunched.add(node_id)
                    self._launch(node_id)
                    continue
                port = self.node_port(node_id)
                try:
                    md = fetch_metadata(self.host, port, timeout=2.0)
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
