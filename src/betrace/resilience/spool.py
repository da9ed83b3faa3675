"""A durable, bounded, append-only local spool of writes a sink could not make.

Layout: one directory per sink, holding numbered segment files
``seg-00000000000000000001.spool``. A segment is a sequence of records::

    u32 length | u32 crc32(items ‖ payload) | u32 items | payload (length bytes)

little-endian, where ``items`` is how many logical items (spans, signals)
the payload carries — the spool's depth is counted in items. Each
:meth:`Spool.append` writes its records with one ``write`` and one
``fsync``; a new segment also fsyncs the directory, so an acknowledged
append survives a crash or power loss.

Reading (:meth:`Spool.replay`) goes through segments in order. A record
whose header runs past the end of the file, whose payload is short, or
whose checksum does not match is a torn write (``kill -9`` mid-append) or
corruption: it is logged, counted and the rest of that segment is skipped —
a replay never crashes on it. A fully replayed segment is deleted.

Bounded: past ``max_bytes`` :meth:`append` raises
:class:`~betrace.errors.BackpressureError` and the caller pauses instead.
Not thread-safe on its own: one owner (the sink's guard) serialises access.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from betrace.errors import BackpressureError

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<III")
_PREFIX = "seg-"
_SUFFIX = ".spool"


def _crc(items: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(items.to_bytes(4, "little")))


def encode_record(payload: bytes, items: int = 1) -> bytes:
    """One framed record (header + payload)."""
    return _HEADER.pack(len(payload), _crc(items, payload), items) + payload


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    segment: int
    offset: int
    items: int
    payload: bytes


@dataclass(slots=True)
class ScanResult:
    records: list[SpoolRecord]
    #: Bytes of the segment that hold valid records (the rest is torn/corrupt).
    valid_bytes: int
    corrupt: bool


def scan_segment(path: Path, seq: int, *, start: int = 0) -> ScanResult:
    """Every valid record of one segment from ``start``; stops at the first bad one."""
    data = path.read_bytes()
    records: list[SpoolRecord] = []
    pos = start
    end = len(data)
    corrupt = False
    while pos < end:
        if end - pos < _HEADER.size:
            corrupt = True
            break
        length, crc, items = _HEADER.unpack_from(data, pos)
        body = pos + _HEADER.size
        if body + length > end:
            corrupt = True
            break
        payload = data[body : body + length]
        if _crc(items, payload) != crc:
            corrupt = True
            break
        records.append(SpoolRecord(seq, pos, items, payload))
        pos = body + length
    return ScanResult(records, pos, corrupt)


class Spool:
    """Append-only segment files for one sink, replayed in order then deleted."""

    def __init__(
        self,
        directory: Path,
        *,
        name: str,
        max_bytes: int = 256 * 1024 * 1024,
        segment_bytes: int = 16 * 1024 * 1024,
        on_corrupt: Callable[[str, int], None] | None = None,
    ) -> None:
        self.directory = directory
        self.name = name
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._on_corrupt = on_corrupt
        directory.mkdir(parents=True, exist_ok=True)
        self._items = 0
        self._bytes = 0
        self._seg_items: dict[int, int] = {}
        self._seg_bytes: dict[int, int] = {}
        self._active: int | None = None
        self._fh: int | None = None
        # In-process replay progress inside the oldest segment (records already
        # written); after a restart replay restarts from the segment's start,
        # which the idempotent sinks absorb.
        self._cursor: tuple[int, int] = (0, 0)
        self._load()

    # -- bookkeeping ---------------------------------------------------------------

    def _segments(self) -> list[int]:
        out = []
        for p in self.directory.glob(f"{_PREFIX}*{_SUFFIX}"):
            try:
                out.append(int(p.name[len(_PREFIX) : -len(_SUFFIX)]))
            except ValueError:
                logger.warning("spool %s: ignoring stray file %s", self.name, p)
        return sorted(out)

    def _path(self, seq: int) -> Path:
        return self.directory / f"{_PREFIX}{seq:020d}{_SUFFIX}"

    def _load(self) -> None:
        """Count what earlier processes left behind; a torn tail is only counted, not trusted."""
        for seq in self._segments():
            scan = scan_segment(self._path(seq), seq)
            items = sum(r.items for r in scan.records)
            if scan.corrupt:
                self._report_corrupt(seq, scan.valid_bytes)
            self._seg_items[seq] = items
            self._seg_bytes[seq] = self._path(seq).stat().st_size
            self._items += items
            self._bytes += self._seg_bytes[seq]
        if self._items:
            logger.warning(
                "spool %s: %d items (%d bytes) left by an earlier run wait for replay",
                self.name,
                self._items,
                self._bytes,
            )

    def _report_corrupt(self, seq: int, offset: int) -> None:
        logger.warning(
            "spool %s: segment %s has a torn or corrupt record at byte %d; the rest of it is skipped",
            self.name,
            self._path(seq).name,
            offset,
        )
        if self._on_corrupt is not None:
            self._on_corrupt(self.name, 1)

    @property
    def items(self) -> int:
        return self._items

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return self._items

    @property
    def fill(self) -> float:
        """0..1: how full the spool is against ``max_bytes``."""
        return min(1.0, self._bytes / self.max_bytes)

    # -- writing -------------------------------------------------------------------

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _open_active(self) -> int:
        if self._fh is not None and self._active is not None:
            if self._seg_bytes.get(self._active, 0) < self.segment_bytes:
                return self._fh
            os.close(self._fh)
            self._fh = None
        segments = self._segments()
        seq = (segments[-1] + 1) if segments else 1
        self._fh = os.open(self._path(seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._active = seq
        self._seg_items[seq] = 0
        self._seg_bytes[seq] = 0
        self._fsync_dir()
        return self._fh

    def append(self, payloads: Iterable[tuple[bytes, int]]) -> int:
        """Durably append ``(payload, items)`` records as one batch; return the items added.

        Raises :class:`BackpressureError` (nothing written) when the batch would
        take the spool past ``max_bytes``.
        """
        records = list(payloads)
        blob = b"".join(encode_record(p, n) for p, n in records)
        if not blob:
            return 0
        items = sum(n for _, n in records)
        if self._bytes + len(blob) > self.max_bytes and self._bytes > 0:
            msg = (
                f"spool {self.name} is full ({self._bytes} of {self.max_bytes} bytes, {self._items} items);"
                " pause until it drains"
            )
            raise BackpressureError(msg)
        fd = self._open_active()
        view = memoryview(blob)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        assert self._active is not None
        self._seg_items[self._active] += items
        self._seg_bytes[self._active] += len(blob)
        self._items += items
        self._bytes += len(blob)
        return items

    # -- reading -------------------------------------------------------------------

    def segment_ids(self) -> list[int]:
        """Segments waiting for replay, oldest first."""
        return self._segments()

    def read(self, seq: int) -> list[SpoolRecord]:
        """The valid records of segment ``seq`` not yet acknowledged, in order."""
        path = self._path(seq)
        if not path.exists():
            return []
        start = self._cursor[1] if self._cursor[0] == seq else 0
        scan = scan_segment(path, seq, start=start)
        if scan.corrupt:
            self._report_corrupt(seq, scan.valid_bytes)
        return scan.records

    def ack_record(self, record: SpoolRecord) -> None:
        """Mark ``record`` (and everything before it) as replayed."""
        self._cursor = (record.segment, record.offset + _HEADER.size + len(record.payload))

    def ack_segment(self, seq: int) -> None:
        """Delete a fully replayed segment."""
        if seq == self._active and self._fh is not None:
            os.close(self._fh)
            self._fh = None
            self._active = None
        self._path(seq).unlink(missing_ok=True)
        self._items -= self._seg_items.pop(seq, 0)
        self._bytes -= self._seg_bytes.pop(seq, 0)
        self._items = max(self._items, 0)
        self._bytes = max(self._bytes, 0)
        if self._cursor[0] == seq:
            self._cursor = (0, 0)
        self._fsync_dir()

    def replay(self, write: Callable[[list[bytes]], None], *, batch_items: int = 10_000) -> int:
        """Synchronously hand every pending payload to ``write`` in order, in batches.

        A segment is deleted only after all its records were written; if ``write``
        raises, the spool keeps everything not yet acknowledged and re-raises.
        """
        done = 0
        for seq in self.segment_ids():
            for chunk in batches(self.read(seq), batch_items):
                write([r.payload for r in chunk])
                self.ack_record(chunk[-1])
                done += sum(r.items for r in chunk)
            self.ack_segment(seq)
        return done

    def close(self) -> None:
        if self._fh is not None:
            os.close(self._fh)
            self._fh = None
            self._active = None


def batches(records: list[SpoolRecord], batch_items: int) -> Iterator[list[SpoolRecord]]:
    """Consecutive runs of records holding about ``batch_items`` items each."""
    chunk: list[SpoolRecord] = []
    size = 0
    for rec in records:
        chunk.append(rec)
        size += rec.items
        if size >= batch_items:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
