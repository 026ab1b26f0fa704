"""Housekeeping: purge delivered studies after the retention period, quarantined files past
their own age limit or the quarantine's quota, and leftover temp files. The node's scheduler
runs `run_housekeeping`; every function takes `now=` so the rules can be tested without waiting
days.

The quarantine's bounds do not depend on retention: `[storage].quarantine_days` (0 = no age
limit) and `[storage].quarantine_quota_mb`, oldest first. The receiver enforces the quota on each
refusal too; housekeeping's pass keeps it when several processes or machines share the folder.

What may go: only a study that is classified, has at least one SR export and every export
acknowledged by PACS, once the newest of its last instance and its last acknowledgement is older
than `[storage].retention_days`. A study still receiving, classifying, failed, or with an export
pending, sending or dead is never touched: undelivered data is never deleted.

What goes: the study's instance files and SR files, and its instance rows. The study, results
and exports stay (what was reported, when) and a `purges` row records the purge. A file is only
unlinked when it is itself older than the cutoff, so an instance re-sent meanwhile (a fresh
file, a fresh row) survives. Files go before rows: a crash in between leaves rows pointing at
missing files and the next run finishes the job (unlinks are idempotent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from node.config import StorageSection
from storage.db import Database
from storage.filestore import FileStore
from storage.retention import purge_candidates, purgeable_studies, record_purge

log = logging.getLogger(__name__)

TEMP_GRACE_SECONDS = 3600.0  # temp files younger than this may belong to a write in progress
BATCH = 200  # studies per run: a long backlog is worked off over several runs


@dataclass(frozen=True)
class PurgeReport:
    """What one housekeeping run removed."""

    studies: int = 0
    files: int = 0
    size_bytes: int = 0
    quarantined: int = 0
    temp: int = 0


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now


def _inside(root: Path, path: Path) -> bool:
    """Never delete outside the store, whatever a row says."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _unlink_old(root: Path, path: Path, cutoff_ts: float) -> int:
    """Delete one file if it is inside the store and older than the cutoff; its size."""
    if not _inside(root, path):
        log.error("housekeeping: refusing to delete %s outside the store", path)
        return -1
    try:
        st = path.stat()
        if st.st_mtime >= cutoff_ts:  # re-sent after the cutoff: keep it
            return -1
        path.unlink()
    except FileNotFoundError:
        return 0
    return st.st_size


def _remove_empty_dirs(root: Path, start: Path) -> None:
    """Drop directories the purge emptied, up to (not including) the store's top folders."""
    d = start
    while d != root and _inside(root, d) and d.parent != root:
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): stop here
            return
        d = d.parent


def purge_study(db: Database, files: FileStore, study_uid: str, cutoff: datetime,
                now: datetime | None = None) -> tuple[int, int]:
    """Delete one delivered study's files and instance rows; (files, bytes) removed."""
    candidates = purge_candidates(db, study_uid, cutoff)
    cutoff_ts = cutoff.timestamp()
    removed: list[str] = []
    n_files = n_bytes = 0
    for sop_uid, path in candidates.instances:
        size = _unlink_old(files.root, Path(path), cutoff_ts)
        if size >= 0:
            removed.append(sop_uid)
            n_files, n_bytes = n_files + (size > 0), n_bytes + size
            _remove_empty_dirs(files.root, Path(path).parent)
    for path in candidates.sr_paths:
        size = _unlink_old(files.root, Path(path), cutoff_ts)
        if size > 0:
            n_files, n_bytes = n_files + 1, n_bytes + size
            _remove_empty_dirs(files.root, Path(path).parent)
    record_purge(db, study_uid, removed, cutoff, n_files, n_bytes, _now(now))
    return n_files, n_bytes


def purge_quarantine(files: FileStore, cutoff: datetime) -> int:
    """Quarantined copies (and their reasons) older than the cutoff; how many files."""
    cutoff_ts, n = cutoff.timestamp(), 0
    for p in files.quarantine_dir.iterdir():
        if p.is_file() and not p.is_symlink() and _unlink_old(files.root, p, cutoff_ts) >= 0:
            n += 1
    return n


def bound_quarantine(files: FileStore, storage: StorageSection,
                     now: datetime | None = None) -> int:
    """The quarantine's age limit, then its quota (oldest first); how many files went."""
    removed = 0
    if storage.quarantine_days > 0:
        removed = purge_quarantine(files, _now(now) - timedelta(days=storage.quarantine_days))
    return removed + files.trim_quarantine(storage.quarantine_quota_mb * 1024 * 1024)


def housekeeping(db: Database, files: FileStore, storage: StorageSection,
                 now: datetime | None = None) -> PurgeReport:
    """One run: leftover temp files and the quarantine's bounds always; delivered studies only
    when retention_days > 0."""
    temp = files.sweep_temp(older_than_seconds=TEMP_GRACE_SECONDS)
    quarantined = bound_quarantine(files, storage, now)
    if quarantined:
        log.info("housekeeping: removed %d quarantined file(s) (older than %g day(s) or over "
                 "the %d MiB quota)", quarantined, storage.quarantine_days,
                 storage.quarantine_quota_mb)
    if storage.retention_days <= 0:
        return PurgeReport(quarantined=quarantined, temp=temp)
    cutoff = _now(now) - timedelta(days=storage.retention_days)
    studies = n_files = n_bytes = 0
    for uid in purgeable_studies(db, cutoff, BATCH):
        f, b = purge_study(db, files, uid, cutoff, now=now)
        studies, n_files, n_bytes = studies + 1, n_files + f, n_bytes + b
    if studies:
        log.info("housekeeping: purged %d delivered study(ies) older than %g day(s) (%d files, "
                 "%.1f MiB)", studies, storage.retention_days, n_files, n_bytes / 2**20)
    return PurgeReport(studies, n_files, n_bytes, quarantined, temp)


def run_housekeeping(db: Database, files: FileStore, storage: StorageSection) -> None:
    """Scheduler entry point: never raises (the scheduler must keep running)."""
    try:
        housekeeping(db, files, storage)
    except Exception:
        log.exception("housekeeping failed")

