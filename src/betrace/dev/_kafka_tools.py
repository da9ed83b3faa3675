"""External tools the local Kafka needs: finding Java 17+ and fetching the Kafka jars with Maven."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from betrace.dev._kafka_config import FETCH_MARKER, MIN_JAVA_MAJOR, KafkaDevError, MissingToolError

# Deliberately the historical name (not __name__): log configuration and the
# "%(name)s" in log lines stay as they were before kafka.py was split up.
logger = logging.getLogger("betrace.dev.kafka")


def find_java(kafka_version: str) -> str:
    """Path of a Java 17+ ``java`` (``JAVA_HOME``, else ``PATH``); raises MissingToolError."""
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
                f"Kafka {kafka_version} needs Java {MIN_JAVA_MAJOR}+ but {java} is Java "
                f"{major}. Install Java {MIN_JAVA_MAJOR}+ and put it on PATH or set "
                "JAVA_HOME."
            )
            raise MissingToolError(msg)
    return java


def download_jars(pom: Path, libs_dir: Path, version: str, timeout: float) -> None:
    """Run Maven on ``pom`` to copy the Kafka ``version`` jars into ``libs_dir``
    (replaced atomically, with a fetch marker). The caller holds the fetch lock."""
    version_dir = libs_dir.parent
    mvn = shutil.which("mvn")
    if mvn is None:
        msg = (
            "Apache Maven (`mvn`) is needed once to download the Kafka "
            f"{version} jars into {libs_dir} but was not found on "
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
        f"-Dkafka.version={version}",
    ]
    logger.info("fetching Apache Kafka %s jars with Maven into %s", version, libs_dir)
    started = time.monotonic()
    try:
        rc, tail = run_streaming(cmd, cwd=pom.parent, timeout=timeout)
        if rc != 0:
            msg = f"mvn failed with exit code {rc} fetching Kafka {version} jars ({' '.join(cmd)}):\n{tail}"
            raise KafkaDevError(msg)
        jars = sorted(p.name for p in partial.glob("*.jar"))
        if f"kafka_2.13-{version}.jar" not in jars:
            msg = f"mvn succeeded but kafka_2.13-{version}.jar is missing from {partial}; check {pom}"
            raise KafkaDevError(msg)
        marker = {
            "version": version,
            "pom": str(pom),
            "pom_sha256": sha256(pom),
            "fetched_at": dt.datetime.now(dt.UTC).isoformat(),
            "jars": jars,
        }
        (partial / FETCH_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if libs_dir.exists():
            shutil.rmtree(libs_dir)
        os.replace(partial, libs_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info(
        "fetched %d jars for Kafka %s in %.1fs",
        len(jars),
        version,
        time.monotonic() - started,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_streaming(cmd: Sequence[str], cwd: Path, timeout: float) -> tuple[int, str]:
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
