"""The archival job (PRD-002d): per tenant, day and data kind, export -> upload -> verify -> cleanup.

Phase (a) copies a unit's hot rows to Parquet, uploads the files and the day's
manifest, then downloads every file again and compares size, SHA-256 and row
count. Phase (b) deletes exactly those rows from the hot store in the same
DuckDB transaction that marks the unit ``cleaned``. Each phase's outcome is
committed to ``archive_days`` before the next starts, so a killed run resumes
where it stopped: file names are deterministic and uploads replace atomically,
nothing is deleted before verification, and nothing is deleted twice.

Cold-storage and disk failures are retried with exponential backoff and
jitter (:mod:`betrace.archive.retry`), optionally through an injected
``guard`` (a circuit breaker). When the attempts run out the unit is marked
``failed`` with the reason, its data stays hot, the tenant's remaining units
wait for the next run, and the next run resumes from the last good state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from betrace.archive import hot, state
from betrace.archive.layout import FILES, KINDS, Manifest, ManifestFile, file_key, manifest_key, today
from betrace.archive.retry import Backoff, Guard, failpoint, retrying, transient
from betrace.archive.state import ORDER, Unit
from betrace.audit.events import AuditEventType, AuditRecorder, EventRef, NullAuditRecorder
from betrace.config.sections import ArchiveSettings
from betrace.errors import BetraceError
from betrace.metrics import InMemoryHooks, StageHooks
from betrace.sinks.cold.base import ColdObjectMissingError, ColdStorage, sha256_file
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.ledger.archival import ArchivalEvent, ArchivalLedger

logger = logging.getLogger(__name__)

STEP_ID = "archive"
PHASES = ("export", "upload", "verify", "cleanup")
_REACHED = {"export": "exported", "upload": "uploaded", "verify": "verified", "cleanup": "cleaned"}


class ArchiveError(BetraceError):
    """An archival step failed for a reason retrying will not fix (e.g. a checksum mismatch)."""


class VerificationError(ArchiveError):
    """A file read back from cold storage differs from what was exported."""

    def __init__(self, msg: str, *, resume_from: str | None = None) -> None:
        super().__init__(msg)
        #: The state the next run resumes from (``exported``: upload again from the staged copy).
        self.resume_from = resume_from


@dataclass(frozen=True, slots=True)
class UnitReport:
    tenant: str
    day: dt.date
    kind: str
    part: int
    state: str
    rows: int
    bytes: int
    seconds: float
    reason: str | None = None
    resumed_from: str = "pending"


@dataclass(slots=True)
class RunReport:
    units: list[UnitReport] = field(default_factory=list)
    #: Tenants whose remaining units were postponed after a failure.
    postponed: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> list[UnitReport]:
        return [u for u in self.units if u.state == "failed"]

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units if u.state == "cleaned")


async def _to_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


class ArchiveJob:
    """Archive due days of every (or one) tenant; safe to run again at any time."""

    def __init__(
        self,
        store: TenantStore,
        cold: ColdStorage,
        settings: ArchiveSettings,
        *,
        audit: AuditRecorder | None = None,
        ledger: ArchivalLedger | None = None,
        ledger_run: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
        guard: Guard[Any] | None = None,
        hooks: StageHooks | None = None,
        clock: Callable[[], dt.date] = today,
    ) -> None:
        self.store = store
        self.cold = cold
        self.settings = settings
        self.audit = audit or NullAuditRecorder()
        self.ledger = ledger
        self._ledger_run = ledger_run or _to_thread
        self.guard = guard
        self.hooks = hooks or InMemoryHooks()
        self.clock = clock
        self.backoff = Backoff(settings.retries, settings.backoff_base_s, settings.backoff_max_s)

    # -- helpers ---------------------------------------------------------------------------

    async def _db(self, tenant: str, fn: Callable[..., Any], *args: Any) -> Any:
        def call() -> Any:
            with self.store.cursor(tenant) as con:
                state.ensure_schema(con)
                return fn(con, *args)

        return await self.store.run(call, lane="spans")

    async def _io(self, what: str, fn: Callable[[], Any]) -> Any:
        return await retrying(what, fn, self.backoff, self.guard)

    async def _record(self, event: AuditEventType, **kwargs: Any) -> EventRef:
        ref: EventRef = await asyncio.to_thread(functools.partial(self.audit.record, event, **kwargs))
        return ref

    def _staging(self, tenant: str, unit: Unit) -> Path:
        return hot.staging_dir(self.store.data_dir, tenant, unit)

    # -- planning --------------------------------------------------------------------------

    def last_day(self) -> dt.date:
        """The newest day that is due: older than ``hot_days`` whole days, never today."""
        return self.clock() - dt.timedelta(days=max(self.settings.hot_days, 0) + 1)

    async def plan(self, tenant: str, day: dt.date | None = None) -> list[Unit]:
        """Units to work on: unfinished ones first (resume), then due days with hot rows."""
        if day is not None and day >= self.clock():
            msg = f"cannot archive {day}: only days before today (UTC) are archived, their data is complete"
            raise ArchiveError(msg)
        before = (day + dt.timedelta(days=1)) if day else self.last_day() + dt.timedelta(days=1)

        def plan_sync(con: Any) -> list[Unit]:
            known = state.units(con)
            todo = [u for u in known if u.progress not in ("cleaned", "purged")]
            if day is not None:
                todo = [u for u in todo if u.day == day]
            busy = {(u.day, u.kind) for u in todo}
            for kind in KINDS:
                for d in hot.due_days(con, kind, before):
                    if (day is not None and d != day) or (d, kind) in busy:
                        continue
                    parts = [u.part for u in known if u.day == d and u.kind == kind]
                    unit = state.new_unit(d, kind, max(parts) + 1 if parts else 0)
                    state.upsert(con, unit)
                    todo.append(unit)
            return sorted(todo, key=lambda u: (u.day, KINDS.index(u.kind), u.part))

        units: list[Unit] = await self._db(tenant, plan_sync)
        return units

    # -- the run ---------------------------------------------------------------------------

    async def run(
        self,
        tenants: list[str] | None = None,
        day: dt.date | None = None,
        *,
        on_plan: Callable[[int], None] | None = None,
        on_unit: Callable[[UnitReport], None] | None = None,
    ) -> RunReport:
        report = RunReport()
        names = tenants if tenants is not None else self.store.tenants()
        plans = {t: await self.plan(t, day) for t in names}
        if on_plan:
            on_plan(sum(len(p) for p in plans.values()))
        run_ref = await self._record(
            AuditEventType.ARCHIVAL_RUN,
            actor=STEP_ID,
            subject=f"day {day}" if day else f"days before {self.last_day() + dt.timedelta(days=1)}",
            outcome="started",
            payload={"tenants": names, "units": sum(len(p) for p in plans.values())},
        )
        for tenant, units in plans.items():
            await self._post_pending_ledger(tenant)
            for i, unit in enumerate(units):
                result = await self._unit(tenant, unit, run_ref)
                report.units.append(result)
                if on_unit:
                    on_unit(result)
                if result.state == "failed" and result.reason and result.reason.startswith("transient:"):
                    report.postponed[tenant] = len(units) - i - 1
                    logger.warning(
                        "archive: tenant %r: cold storage failing, %d units wait for the next run",
                        tenant,
                        len(units) - i - 1,
                    )
                    break
        await self._record(
            AuditEventType.ARCHIVAL_RUN,
            actor=STEP_ID,
            subject="run finished",
            outcome="failed" if report.failed else "ok",
            parent=run_ref,
            payload={"units": len(report.units), "failed": len(report.failed), "rows": report.rows},
        )
        return report

    async def _unit(self, tenant: str, unit: Unit, run_ref: EventRef) -> UnitReport:
        started, resumed = time.monotonic(), unit.progress
        subject = f"{tenant}/{unit.day}/{unit.kind}-{unit.part:04d}"
        phase = "export"
        try:
            while unit.progress != "cleaned":
                phase = {
                    "pending": "export",
                    "exported": "upload",
                    "uploaded": "verify",
                    "verified": "cleanup",
                }[unit.progress]
                t0 = time.monotonic()
                unit = await getattr(self, f"_{phase}")(tenant, unit)
                self.hooks.observe("betrace_archive_phase_seconds", time.monotonic() - t0, phase=phase)
                await self._record(
                    AuditEventType.ARCHIVAL_PHASE,
                    actor=STEP_ID,
                    subject=subject,
                    tenant=tenant,
                    parent=run_ref,
                    payload={
                        "phase": phase,
                        "state": unit.state,
                        "rows": unit.rows,
                        "bytes": unit.bytes,
                        "keys": list(unit.keys),
                        "seconds": round(time.monotonic() - t0, 3),
                    },
                )
                failpoint(f"archive.after_{phase}")
        except Exception as exc:  # noqa: BLE001 - any failure: the unit stays hot and is marked failed
            kind = "transient" if transient(exc) else "permanent"
            reason = f"{kind}: {phase} failed: {exc}"[:500]
            resume = getattr(exc, "resume_from", None) or unit.progress
            failed = dataclasses.replace(
                unit, state="failed", last_good=resume, reason=reason, attempts=unit.attempts + 1
            )
            await self._db(tenant, state.upsert, failed)
            logger.warning("archive: %s: %s (stays hot, retried next run)", subject, reason)
            await self._record(
                AuditEventType.ARCHIVAL_PHASE,
                actor=STEP_ID,
                subject=subject,
                tenant=tenant,
                parent=run_ref,
                outcome="failed",
                payload={"phase": phase, "reason": reason},
            )
            self.hooks.count("betrace_archive_units_total", tenant=tenant, outcome="failed")
            await self._post_ledger(tenant, failed)
            return UnitReport(
                tenant,
                unit.day,
                unit.kind,
                unit.part,
                "failed",
                unit.rows,
                unit.bytes,
                time.monotonic() - started,
                reason,
                resumed,
            )
        await self._post_ledger(tenant, unit)
        shutil.rmtree(self._staging(tenant, unit), ignore_errors=True)
        self.hooks.count("betrace_archive_units_total", tenant=tenant, outcome="cleaned")
        self.hooks.count("betrace_archive_rows_total", unit.rows, tenant=tenant, kind=unit.kind)
        return UnitReport(
            tenant,
            unit.day,
            unit.kind,
            unit.part,
            "cleaned",
            unit.rows,
            unit.bytes,
            time.monotonic() - started,
            None,
            resumed,
        )

    # -- phases ----------------------------------------------------------------------------

    async def _export(self, tenant: str, unit: Unit) -> Unit:
        keys = [file_key(tenant, unit.day, name, unit.part) for name in FILES[unit.kind]]
        out_dir = self._staging(tenant, unit)

        def export_sync(con: Any) -> Unit:
            done = hot.export(con, unit, keys, out_dir)
            stats = [sha256_file(out_dir / k.rpartition("/")[2]) for k in keys]
            done = dataclasses.replace(
                done,
                state="exported",
                last_good="exported",
                reason=None,
                bytes=sum(s[0] for s in stats),
                checksums=tuple(s[1] for s in stats),
            )
            state.upsert(con, done)
            return done

        attempt = 0
        while True:  # a full disk or a busy file: retried like any transient step
            try:
                done: Unit = await self._db(tenant, export_sync)
            except Exception as exc:
                attempt += 1
                if not transient(exc) or attempt >= self.backoff.attempts:
                    raise
                logger.warning(
                    "archive: export of %s failed (attempt %d), retrying: %s", keys[0], attempt, exc
                )
                await asyncio.sleep(self.backoff.delay(attempt))
            else:
                return done

    def _staged_ok(self, tenant: str, unit: Unit) -> list[Path] | None:
        files = [self._staging(tenant, unit) / k.rpartition("/")[2] for k in unit.keys]
        for path, checksum in zip(files, unit.checksums, strict=True):
            if not path.is_file() or sha256_file(path)[1] != checksum:
                return None
        return files

    async def _upload(self, tenant: str, unit: Unit) -> Unit:
        files = await asyncio.to_thread(self._staged_ok, tenant, unit)
        if files is None:  # the staging copy is gone: export again (nothing was deleted yet)
            logger.info("archive: %s/%s: staged files missing, exporting again", tenant, unit.day)
            return await self._export(tenant, unit)
        for key, path, checksum in zip(unit.keys, files, unit.checksums, strict=True):
            stat = await self._io(f"upload of {key}", functools.partial(self.cold.put_file, key, path))
            if stat.sha256 != checksum:
                msg = f"{key}: uploaded bytes hash to {stat.sha256[:12]}, expected {checksum[:12]}"
                raise VerificationError(msg)
        entries = [
            ManifestFile(
                key=key,
                kind=key.rpartition("/")[2].partition("-")[0],
                part=unit.part,
                rows=rows,
                bytes=path.stat().st_size,
                sha256=checksum,
                min_ns=unit.min_ns,
                max_ns=unit.max_ns,
            )
            for key, path, checksum, rows in zip(
                unit.keys, files, unit.checksums, unit.file_rows, strict=True
            )
        ]
        await self._io(
            f"manifest of {tenant}/{unit.day}",
            functools.partial(self._update_manifest, tenant, unit.day, entries, set()),
        )
        done = dataclasses.replace(unit, state="uploaded", last_good="uploaded", reason=None)
        await self._db(tenant, state.upsert, done)
        return done

    def _update_manifest(
        self, tenant: str, day: dt.date, entries: list[ManifestFile], remove: set[str]
    ) -> None:
        key = manifest_key(tenant, day)
        try:
            manifest = Manifest.from_json(self.cold.get(key))
        except ColdObjectMissingError:
            manifest = Manifest(tenant=tenant, day=day.isoformat())
        manifest.upsert(entries)
        manifest.remove(remove)
        if manifest.files:
            self.cold.put(key, manifest.to_json())
        else:
            self.cold.delete(key)

    def _verify_sync(self, tenant: str, unit: Unit) -> None:
        scratch = self._staging(tenant, unit) / "verify"
        try:
            for key, checksum, rows in zip(unit.keys, unit.checksums, unit.file_rows, strict=True):
                path = scratch / key.rpartition("/")[2]
                stat = self.cold.get_file(key, path)
                if stat.sha256 != checksum:
                    msg = f"{key}: cold copy hashes to {stat.sha256[:12]}, exported {checksum[:12]}"
                    raise VerificationError(msg)
                found = pq.read_metadata(path).num_rows
                if found != rows:
                    msg = f"{key}: cold copy has {found} rows, exported {rows}"
                    raise VerificationError(msg)
                path.unlink()
            manifest = Manifest.from_json(self.cold.get(manifest_key(tenant, unit.day)))
            listed = {f.key: f.sha256 for f in manifest.files}
            for key, checksum in zip(unit.keys, unit.checksums, strict=True):
                if listed.get(key) != checksum:
                    msg = f"{key}: the day's manifest does not list it with checksum {checksum[:12]}"
                    raise VerificationError(msg)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def _verify(self, tenant: str, unit: Unit) -> Unit:
        try:
            await self._io(
                f"verification of {unit.keys[0]}", functools.partial(self._verify_sync, tenant, unit)
            )
        except (VerificationError, ColdObjectMissingError) as exc:
            # Upload again from the staged copy on the next run; nothing was deleted.
            raise VerificationError(str(exc), resume_from="exported") from exc
        done = dataclasses.replace(unit, state="verified", last_good="verified", reason=None)
        await self._db(tenant, state.upsert, done)
        return done

    async def _cleanup(self, tenant: str, unit: Unit) -> Unit:
        files = await asyncio.to_thread(self._staged_ok, tenant, unit)
        if files is None:  # the staged copy is gone: the verified cold copy is the reference
            out_dir = self._staging(tenant, unit)
            for key, checksum in zip(unit.keys, unit.checksums, strict=True):
                stat = await self._io(
                    f"download of {key}",
                    functools.partial(self.cold.get_file, key, out_dir / key.rpartition("/")[2]),
                )
                if stat.sha256 != checksum:
                    msg = f"{key}: cold copy changed since verification"
                    raise VerificationError(msg)
            files = [out_dir / k.rpartition("/")[2] for k in unit.keys]
        done, deleted = await self._db(tenant, hot.cleanup, tenant, unit, files)
        if deleted != unit.rows:
            logger.warning(
                "archive: %s/%s %s: %d rows archived, %d deleted from hot (the rest were already gone)",
                tenant,
                unit.day,
                unit.kind,
                unit.rows,
                deleted,
            )
        cleaned: Unit = done
        return cleaned

    # -- ledger ----------------------------------------------------------------------------

    def _events(self, tenant: str, unit: Unit) -> list[ArchivalEvent]:
        reached = ORDER.get(unit.progress, 0)
        return [
            ArchivalEvent(tenant, unit.day, unit.kind, unit.part, phase, unit.rows)
            for phase in PHASES
            if ORDER[_REACHED[phase]] <= reached and unit.rows
        ]

    async def _post_ledger(self, tenant: str, unit: Unit) -> None:
        if self.ledger is None:
            return
        events = self._events(tenant, unit)
        try:
            await self._ledger_run(functools.partial(self.ledger.post, events))
        except BetraceError as exc:
            logger.warning(
                "archive: ledger events of %s/%s not recorded (retried next run): %s", tenant, unit.day, exc
            )
            return
        if unit.progress == "cleaned":
            posted = dataclasses.replace(unit, ledger_posted=True)
            await self._db(tenant, state.upsert, posted)

    async def _post_pending_ledger(self, tenant: str) -> None:
        """Units cleaned by an earlier run that crashed before its ledger events were written."""
        if self.ledger is None:
            return
        pending = await self._db(tenant, state.units, "state = 'cleaned' AND NOT ledger_posted")
        for unit in pending:
            await self._post_ledger(tenant, unit)
