"""Durable file store for received instances, SR objects and quarantined data.

Every write goes to a temp file under ``root/tmp`` (same filesystem), is flushed and fsynced,
renamed into place with ``os.replace`` and the parent directory is fsynced: after a write
returns, a power cut cannot leave a truncated or missing file behind. Readers never see a
partial file, and temp files live only under ``tmp/`` with their own suffix, so they can
never be mistaken for data.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".partial"
MAX_UID_LENGTH = 64
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_HINT_UNSAFE_RE = re.compile(r"[^A-Za-z0-9.\-]+")
_MAX_HINT_LENGTH = 64


def validate_uid(uid: str) -> str:
    """A DICOM UID: digit groups joined by dots, at most 64 chars.

    Paths are built from UIDs sent by the network; anything else (``..``, ``/``, empty)
    could escape the store, so it is refused.
    """
    if not isinstance(uid, str) or len(uid) > MAX_UID_LENGTH or not _UID_RE.fullmatch(uid):
        raise ValueError(f"not a valid DICOM UID: {uid!r:.80}")
    return uid


def sanitise_hint(hint: str) -> str:
    """A file-name-safe fragment of a free-text hint (may come from the network)."""
    cleaned = _HINT_UNSAFE_RE.sub("_", hint).strip("._")[:_MAX_HINT_LENGTH]
    return cleaned or "unknown"


def fsync_dir(path: Path) -> None:
    """Make a directory entry change (create, rename) durable."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # platforms that cannot open directories (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """Files under one root: ``studies/``, ``sr/``, ``quarantine/`` and ``tmp/``."""

    def __init__(self, root: Path) -> None:
        """Create the layout; the root must be on one filesystem so renames are atomic."""
        self.root = Path(root)
        self.studies = self.root / "studies"
        self.sr = self.root / "sr"
        self.quarantine_dir = self.root / "quarantine"
        self.tmp = self.root / "tmp"
        for d in (self.studies, self.quarantine_dir, self.tmp, self.sr):
            self._ensure_dir(d)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance lives; UIDs are validated so nothing escapes the store."""
        return (self.studies / validate_uid(study_uid) / validate_uid(series_uid)
                / f"{validate_uid(sop_uid)}.dcm")

    def sr_path(self, study_uid: str, sop_uid: str) -> Path:
        """Where an SR object we produced lives."""
        return self.sr / validate_uid(study_uid) / f"{validate_uid(sop_uid)}.dcm"

    def write_instance(self, study_uid: str, series_uid: str, sop_uid: str,
                       data: bytes) -> Path:
        """Durably store received bytes; a re-sent SOP UID atomically replaces the old file."""
        path = self.instance_path(study_uid, series_uid, sop_uid)
        self._write_durable(path, data)
        return path

    def write_sr(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Durably store an encoded SR before its export is queued."""
        path = self.sr_path(study_uid, sop_uid)
        self._write_durable(path, data)
        return path

    def quarantine(self, data: bytes, reason: str, hint: str) -> Path:
        """Keep refused bytes with a sibling ``.reason.txt`` so an admin can see why."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        stem = f"{stamp}_{sanitise_hint(hint)}_{secrets.token_hex(4)}"
        path = self.quarantine_dir / f"{stem}.dcm"
        self._write_durable(path, data)
        self._write_durable(self.quarantine_dir / f"{stem}.reason.txt",
                            reason.encode("utf-8", errors="replace") + b"\n")
        log.info("quarantined %d bytes as %s", len(data), path.name)
        return path

    def sweep_temp(self, older_than_seconds: float = 0.0) -> int:
        """Delete temp files left by a crash; only ``tmp/*.partial`` is ever touched.

        ``older_than_seconds`` lets a running node sweep without racing its own writes.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        for p in self.tmp.glob(f"*{TEMP_SUFFIX}"):
            try:
                if p.is_file() and not p.is_symlink() and p.stat().st_mtime <= cutoff:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:  # finished or swept by someone else meanwhile
                continue
        if removed:
            log.warning("removed %d leftover temp file(s) from %s", removed, self.tmp)
        return removed

    def free_bytes(self) -> int:
        """Free space on the store's filesystem (for the low-disk watermark)."""
        return shutil.disk_usage(self.root).free

    def _write_durable(self, path: Path, data: bytes) -> None:
        """Temp file, fsync, atomic rename, fsync of the directory."""
        self._ensure_dir(path.parent)
        tmp_path = self.tmp / f"{secrets.token_hex(12)}{TEMP_SUFFIX}"
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_path, path)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    def _ensure_dir(self, path: Path) -> None:
        """Create missing directories and fsync each new entry's parent."""
        missing: list[Path] = []
        p = path
        while not p.is_dir():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            fsync_dir(d.parent)
