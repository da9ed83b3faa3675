"""What the harness samples every second: /proc figures, consumer lag, worker histograms."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int | None:
    """Resident set size from /proc/<pid>/status (VmRSS), None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of the process (all its threads) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    fields = data[data.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, PermissionError):
        return None


def open_files(pid: int, suffix: str) -> int | None:
    """How many of the process's file descriptors point at files ending in ``suffix``."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, PermissionError):
        return None
    count = 0
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").endswith(suffix):
                count += 1
        except OSError:
            continue
    return count


@dataclass
class CpuMeter:
    """CPU use of one process between two samples, in percent of one core."""

    pid: int
    last_cpu: float | None = None
    last_wall: float | None = None

    def sample(self, wall: float) -> float | None:
        cpu = cpu_seconds(self.pid)
        if cpu is None:
            return None
        pct = None
        if self.last_cpu is not None and self.last_wall is not None and wall > self.last_wall:
            pct = 100.0 * (cpu - self.last_cpu) / (wall - self.last_wall)
        self.last_cpu, self.last_wall = cpu, wall
        return pct


_BUCKET = re.compile(r"^(?P<name>[a-z_]+)_bucket\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+Inf-]+)$")
_LE = re.compile(r'le="([^"]+)"')


def parse_histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of histogram ``name`` (summed over label sets) from /metrics text."""
    out: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "_bucket"):
            continue
        m = _BUCKET.match(line)
        if m is None or m.group("name") != name:
            continue
        le = _LE.search(m.group("labels"))
        if le is None:
            continue
        bound = float("inf") if le.group(1) == "+Inf" else float(le.group(1))
        out[bound] = out.get(bound, 0.0) + float(m.group("value"))
    return out


def add_histograms(histograms: Iterable[dict[float, float]]) -> dict[float, float]:
    total: dict[float, float] = {}
    for hist in histograms:
        for bound, count in hist.items():
            total[bound] = total.get(bound, 0.0) + count
    return total


def diff_histogram(new: dict[float, float], old: dict[float, float]) -> dict[float, float]:
    return {b: new[b] - old.get(b, 0.0) for b in new}


def histogram_quantile(hist: dict[float, float], q: float) -> float | None:
    """Prometheus-style quantile from cumulative buckets (linear within a bucket), None if empty."""
    bounds = sorted(hist)
    if not bounds or hist[bounds[-1]] <= 0:
        return None
    total = hist[bounds[-1]]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = hist[bound]
        if count >= rank:
            if bound == float("inf"):
                return prev_bound  # above the highest finite bucket: its bound is the best known
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def parse_counter(text: str, name: str, label: str = "") -> float:
    """Sum of counter ``name`` over the samples whose labels contain ``label`` (e.g. ``sink="duckdb"``)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric = head.split("{", 1)[0]
        if metric != name or (label and label not in head):
            continue
        try:
            total += float(value)
        except ValueError:
            continue
    return total
