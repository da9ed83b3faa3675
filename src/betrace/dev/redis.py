"""Local Redis (Debian's ``redis-server``) for developers, tests and CI.

Started on 127.0.0.1 with no persistence (``save ""``, no AOF): it is a cache,
losing it costs hit rate, never data. Layout (``root`` is the project root)::

    .dev/redis/redis.pid      pidfile written by redis-server
    .dev/redis/redis.log      its log
    .dev/redis/               its working directory

``betrace dev up`` / ``down`` / ``status`` manage it next to the Kafka broker
(port ``BETRACE_DEV_REDIS_PORT``, default 16379); the test suite's
``local_redis`` fixture runs its own on ``BETRACE_TEST_REDIS_PORT``. From
Python::

    server = LocalRedis(Path(".dev/redis"), port=16379)
    server.start()      # waits until PING answers
    ...                 # server.url
    server.stop()       # SHUTDOWN NOSAVE, SIGKILL if it does not go
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from betrace.errors import DevEnvironmentError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 16379
ENV_PORT = "BETRACE_DEV_REDIS_PORT"
ENV_BINARY = "BETRACE_REDIS_SERVER"
HOST = "127.0.0.1"


def default_port() -> int:
    raw = os.environ.get(ENV_PORT, str(DEFAULT_PORT))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        msg = f"{ENV_PORT}={raw!r} is not a port number"
        raise DevEnvironmentError(msg)
    return int(raw)


def find_binary() -> str:
    """``$BETRACE_REDIS_SERVER``, else ``redis-server`` on PATH, else /usr/bin/redis-server."""
    candidates = [os.environ.get(ENV_BINARY), shutil.which("redis-server"), "/usr/bin/redis-server"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    msg = "redis-server not found: run scripts/setup.sh (apt-get install redis-server) or set " + ENV_BINARY
    raise DevEnvironmentError(msg)


@dataclass(frozen=True, slots=True)
class RedisStatus:
    pid: int | None
    running: bool
    port: int
    data_dir: Path


class LocalRedis:
    """One redis-server process, owned through its pidfile (so another command can stop it)."""

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = default_port() if port is None else port
        self.pidfile = data_dir / "redis.pid"
        self.logfile = data_dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _client(self, timeout: float = 0.5) -> redis.Redis:
        return redis.Redis(
            host=HOST,
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def ping(self, timeout: float = 0.5) -> bool:
        client = self._client(timeout)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def pid(self) -> int | None:
        """The pid in the pidfile if that process is still a redis-server."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"redis-server" in cmdline else None

    def status(self) -> RedisStatus:
        pid = self.pid()
        return RedisStatus(pid, pid is not None and self.ping(), self.port, self.data_dir)

    def start(self, timeout: float = 10.0) -> None:
        """Start redis-server (daemonized) unless ours already runs; wait for PING."""
        if self.pid() is not None and self.ping():
            return
        if self.ping():
            msg = (
                f"port {self.port} serves a Redis that is not ours (not in {self.pidfile}): stop it "
                f"(redis-cli -p {self.port} shutdown nosave) or pick another port "
                f"({ENV_PORT}, or BETRACE_TEST_REDIS_PORT for the tests)"
            )
            raise DevEnvironmentError(msg)
        binary = find_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.pidfile.unlink(missing_ok=True)
        cmd = [
            binary,
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--daemonize", "yes",
            "--pidfile", str(self.pidfile.resolve()),
            "--logfile", str(self.logfile.resolve()),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode != 0:
            msg = f"redis-server did not start: {proc.stdout}{proc.stderr}{self._log_tail()}"
            raise DevEnvironmentError(msg)
        deadline = time.monotonic() + timeout
        while not self.ping(0.2):
            if time.monotonic() > deadline:
                msg = f"redis-server on {self.port} did not answer PING in {timeout:.0f}s{self._log_tail()}"
                raise DevEnvironmentError(msg)
            time.sleep(0.05)
        logger.info("redis-server up on %s (pid %s)", self.url, self.pid())

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop our redis-server: SHUTDOWN NOSAVE (or SIGKILL with ``kill``), then wait until gone."""
        pid = self.pid()
        if pid is None:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        else:
            client = self._client()
            try:
                client.shutdown(nosave=True)
            except (redis.RedisError, OSError):
                pass  # the connection drops as the server exits
            finally:
                client.close()
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
            time.sleep(0.05)
        self.pidfile.unlink(missing_ok=True)
        logger.info("redis-server on port %d stopped", self.port)

    def restart(self) -> None:
        self.stop()
        self.start()

    def clean(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()[-10:]
        except OSError:
            return ""
        return "\n" + "\n".join(lines) if lines else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a daemonized redis-server is reparented to init, which reaps it; a zombie is dead
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:1]
    except OSError:
        return False
    return state != ["Z"]


def project_redis(root: Path, port: int | None = None) -> LocalRedis:
    """The dev Redis of the checkout at ``root`` (data in ``root/.dev/redis``)."""
    return LocalRedis(root / ".dev" / "redis", port=port)
