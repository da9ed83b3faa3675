"""Where archived files live and what a day's manifest says.

Layout, per tenant and UTC day (the day a trace *started*, or a signal was detected)::

    {tenant}/{yyyy}/{mm}/{dd}/spans-{part}.parquet     spans of the day's traces, sorted by trace_id
    {tenant}/{yyyy}/{mm}/{dd}/traces-{part}.parquet    one summary row per trace (for trace lists)
    {tenant}/{yyyy}/{mm}/{dd}/signals-{part}.parquet   signals detected that day
    {tenant}/{yyyy}/{mm}/{dd}/manifest.json            files, rows, checksums, time range, created

``part`` is a four-digit number: 0000 for the first archival of a day, the
next for data that arrived for that day after it was archived (late spans).
Names are deterministic, so a re-run after a crash overwrites, never adds.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson

Kind = Literal["spans", "signals"]
KINDS: tuple[Kind, ...] = ("spans", "signals")
#: The files one archival unit (tenant, day, kind, part) consists of.
FILES: dict[str, tuple[str, ...]] = {"spans": ("spans", "traces"), "signals": ("signals",)}
DAY_NS = 86_400 * 10**9
TENANT_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


def day_start_ns(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()) * 10**9


def day_of_ns(ns: int) -> dt.date:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).date()


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def day_prefix(tenant: str, day: dt.date) -> str:
    return f"{tenant}/{day.year:04d}/{day.month:02d}/{day.day:02d}"


def file_key(tenant: str, day: dt.date, name: str, part: int) -> str:
    return f"{day_prefix(tenant, day)}/{name}-{part:04d}.parquet"


def manifest_key(tenant: str, day: dt.date) -> str:
    return f"{day_prefix(tenant, day)}/manifest.json"


@dataclass(frozen=True, slots=True)
class ManifestFile:
    key: str
    kind: str
    part: int
    rows: int
    bytes: int
    sha256: str
    min_ns: int | None
    max_ns: int | None


@dataclass(slots=True)
class Manifest:
    tenant: str
    day: str
    files: list[ManifestFile] = field(default_factory=list)
    created: str = ""
    updated: str = ""
    format_version: int = 1

    def upsert(self, entries: list[ManifestFile]) -> None:
        keys = {e.key for e in entries}
        self.files = sorted([f for f in self.files if f.key not in keys] + entries, key=lambda f: f.key)
        stamp = dt.datetime.fromtimestamp(time.time(), dt.UTC).isoformat()
        self.created = self.created or stamp
        self.updated = stamp

    def remove(self, keys: set[str]) -> None:
        self.files = [f for f in self.files if f.key not in keys]
        self.updated = dt.datetime.fromtimestamp(time.time(), dt.UTC).isoformat()

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @staticmethod
    def from_json(data: bytes) -> Manifest:
        doc: dict[str, Any] = orjson.loads(data)
        files = [ManifestFile(**f) for f in doc.pop("files", [])]
        return Manifest(files=files, **doc)
