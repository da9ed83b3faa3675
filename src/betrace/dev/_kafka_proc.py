"""OS-level helpers of the local Kafka: detached JVM launcher, pid and port checks, signals, file locks."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

from betrace.dev._kafka_config import KAFKA_MAIN, KafkaDevError

# Deliberately the historical name (not __name__): log configuration and the
# "%(name)s" in log lines stay as they were before kafka.py was split up.
logger = logging.getLogger("betrace.dev.kafka")

# Starts the JVM as a grandchild in its own session and exits at once, so the
# broker is never our child: no zombie when it dies, no ResourceWarning for a
# still-running Popen, and it outlives the calling process (CLI use).
LAUNCHER = r"""
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


def launch_detached(cmd: Sequence[str], out_file: Path, cwd: Path, what: str) -> int:
    """Start ``cmd`` in ``cwd`` through ``LAUNCHER`` (a detached grandchild in its
    own session, output appended to ``out_file``) and return its pid."""
    with out_file.open("ab") as out:
        stamp = dt.datetime.now().isoformat(timespec="seconds")
        out.write(f"\n=== {stamp} starting: {' '.join(cmd)}\n".encode())
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(out_file), str(cwd), *cmd],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0 or not proc.stdout.strip().isdigit():
        msg = f"could not launch {what}: {proc.stdout}{proc.stderr}"
        raise KafkaDevError(msg)
    return int(proc.stdout.strip())


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_tail(path: Path, lines: int) -> str:
    try:
        with path.open("r", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
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


def is_kafka_process(pid: int, props: Path) -> bool:
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
        return KAFKA_MAIN in out and str(props) in out
    except OSError:
        return True
    if not args:
        # Empty while the process is between fork and exec (or exiting):
        # not evidence of pid reuse, so the JVM is not declared dead.
        return True
    return KAFKA_MAIN in args and str(props) in args


def send_signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_dead_or_kill(pid: int, deadline: float, what: str) -> None:
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            logger.warning("%s (pid %d) did not stop in time; sending SIGKILL", what, pid)
            send_signal(pid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 10.0
            while pid_alive(pid):
                if time.monotonic() >= kill_deadline:
                    msg = f"{what} (pid {pid}) survived SIGKILL"
                    raise KafkaDevError(msg)
                time.sleep(0.1)
            return
        time.sleep(0.1)


def port_listening(host: str, port: int, wait: float = 0.0) -> bool:
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
