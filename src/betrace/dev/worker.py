"""Run a BeTrace worker as a child process (demo, tests, chaos scenarios)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from betrace.config import Settings, settings_env

logger = logging.getLogger(__name__)


class WorkerProcess:
    """``betrace run`` in its own process group, configured through ``BETRACE_*``."""

    def __init__(self, settings: Settings, log_file: Path, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log_file = log_file
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}
        env.update(settings_env(self.settings))
        env.update(self.extra_env)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "betrace", "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        logger.info("started worker pid %d (log %s)", self.proc.pid, self.log_file)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("worker %d ignored SIGTERM for %.0fs; killing it", self.proc.pid, timeout)
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would (``kill -9``)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def wait_for_log(self, text: str, timeout: float = 60.0) -> bool:
        """Wait until ``text`` appears in the worker log, or the worker dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_file.exists() and text in self.log_file.read_text(errors="replace"):
                return True
            if not self.alive:
                return False
            time.sleep(0.2)
        return False

    def dump_state(self, wait_s: float = 2.0) -> str:
        """SIGUSR1: the worker logs where its messages are held; that part of its log."""
        if not self.alive or self.proc is None:
            return ""
        start = self.log_file.stat().st_size if self.log_file.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with self.log_file.open("rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            if "tasks:" in text:
                time.sleep(0.2)  # the task lines follow in the same record
                with self.log_file.open("rb") as f:
                    f.seek(start)
                    return f.read().decode(errors="replace")
            time.sleep(0.1)
        return text

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
