"""Durable file store for received instances, SR objects and quarantined data.

Every write goes to a temp file under ``root/tmp`` (same filesystem), is flushed and fsynced,
renamed into place with ``os.replace`` and the parent directory is fsynced: after a write
returns, a power cut cannot leave a truncated or missing file behind. Readers never see a
partial file, and temp files live only under ``tmp/`` with their own suffix, so they can
never be mistaken for data.

The quarantine is bounded, since whoever sends bad data decides how much of it arrives: a
refused instance larger than `QuarantineLimits.max_copy_bytes` keeps only that prefix (its
header, where what was wrong almost always is; named ``*-truncated.dcm``), and once the folder
passes `quota_bytes` the oldest copies go first. Reasons are redacted like log lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".partial"
COPY_CHUNK = 1024 * 1024  # staging copies a received file in pieces this size
MAX_UID_LENGTH = 64
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_HINT_UNSAFE_RE = re.compile(r"[^A-Za-z0-9.\-]+")
_RECEIVER_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._\-]{0,63}-[0-9]+")  # receiver_name
_MAX_HINT_LENGTH = 64
# quarantine/: <stamp>_<hint>_<token>[-truncated] then .dcm or .reason.txt; the stamp sorts
# by time, so the oldest copies are the first names
_QUARANTINE_NAME_RE = re.compile(
    r"(?P<stem>\d{8}T\d{6}\.\d{6}Z_.*_[0-9a-f]{8}(?:-truncated)?)\.(?:dcm|reason\.txt)")
TRUNCATED_MARK = "-truncated"
_BLOCK = 4096  # quota accounting rounds each file up to a block: tiny files still cost one
_QUOTA_LOW_WATER = 0.9  # a trim frees down to this share of the quota (not one file per write)
MAX_REASON_CHARS = 1000
# a file in another machine's receiving/<name>/ unchanged this long belongs to no transfer
# (pynetdicom writes a dataset as it arrives; an association idles out long before)
RECEIVING_STALE_SECONDS = 3600.0
# node/logs.py's rule for exception messages (storage cannot import node/): quoted values
# blanked; an English possessive ("the request's") is not a quote and stays.
_QUOTED_OR_POSSESSIVE = re.compile(r"""(?P<keep>(?<=[A-Za-z])'s\b)|b?'[^']*'?|b?"[^"]*"?""")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class QuarantineLimits:
    """Bounds of ``quarantine/`` ([storage].quarantine_max_copy_kib, quarantine_quota_mb)."""

    max_copy_bytes: int = 64 * 1024  # a larger refused instance keeps only this prefix
    quota_bytes: int = 1024 * 1024 * 1024  # the folder's total; the oldest copies go first

    def __post_init__(self) -> None:
        if not 1 <= self.max_copy_bytes <= self.quota_bytes:
            raise ValueError("quarantine limits need 1 <= max_copy_bytes <= quota_bytes")


@dataclass(frozen=True)
class QuarantineUsage:
    """What ``quarantine/`` holds (its own copies and reasons; other files are not counted)."""

    files: int
    size_bytes: int  # each file rounded up to a 4 KiB block


def redact_reason(reason: str) -> str:
    """A quarantine reason as a log line would show it: one line, quoted values blanked
    (node.logs.redacted's rule), at most MAX_REASON_CHARS characters."""
    flat = _CONTROL.sub(" ", reason).strip()
    text = _QUOTED_OR_POSSESSIVE.sub(lambda m: m.group("keep") or "<value>", flat)
    return text[:MAX_REASON_CHARS]


def _disk_size(n_bytes: int) -> int:
    return -(-n_bytes // _BLOCK) * _BLOCK


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


def receiver_name(host: str | None = None, pid: int | None = None) -> str:
    """A receiver process's folder under ``receiving/``: ``<host>-<pid>``, unique among the
    receivers that share a store (several machines, several processes on one)."""
    return f"{sanitise_hint(host or socket.gethostname())[:48]}-{pid or os.getpid()}"


def _pid_alive(pid: int) -> bool:
    """Whether a process of this machine with this id exists (signal 0 checks, sends none)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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


def _link_synced(source: Path, target: Path) -> bool:
    """Hard-link `source` as `target` (mode 0640, like a copy) and fsync it; False (nothing
    left at `target`) when the filesystem cannot link them, so the caller copies instead. An
    fsync failure is raised, with the link removed."""
    try:
        os.link(source, target)
    except OSError:  # EXDEV, EPERM, EMLINK, ENOTSUP...: copy instead
        return False
    try:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fchmod(fd, 0o640)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return True


class FileStore:
    """Files under one root: ``studies/``, ``sr/``, ``quarantine/`` and ``tmp/``."""

    def __init__(self, root: Path, quarantine_limits: QuarantineLimits | None = None) -> None:
        """Create the layout; the root must be on one filesystem so renames are atomic."""
        self.root = Path(root)
        self.quarantine_limits = quarantine_limits or QuarantineLimits()
        self._quarantine_lock = threading.Lock()
        self._quarantine_bytes: int | None = None  # running total, scanned at first use
        self.studies = self.root / "studies"
        self.sr = self.root / "sr"
        self.quarantine_dir = self.root / "quarantine"
        self.tmp = self.root / "tmp"
        # where receiver processes' pynetdicom writes datasets as they arrive, each in its
        # own receiving/<host>-<pid>/ (on the store's filesystem, so the free-disk watermark
        # sees them)
        self.receiving = self.root / "receiving"
        for d in (self.studies, self.quarantine_dir, self.tmp, self.sr, self.receiving):
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

    def stage(self, source: Path | bytes) -> Path:
        """A durable copy of a received file or of bytes under ``tmp/``, fsynced. It becomes
        an instance only by `publish`, once its row is committed, or goes by `discard`: a
        refused or unrecorded instance leaves no file, and a re-sent SOP's stored file stays
        as it was until then.

        A received file (``receiving/``, same filesystem) is staged as a second name for the
        same bytes (a hard link), not copied: its pages, written as the PDUs arrived, are
        synced once instead of copied and synced again (issue 18). The caller never writes to
        `source` again (pynetdicom closes and removes its name once the handler returns).
        Where a link cannot be made (another filesystem, a filesystem without hard links)
        the file is copied in chunks."""
        tmp_path = self.tmp / f"{secrets.token_hex(12)}{TEMP_SUFFIX}"
        if isinstance(source, Path) and _link_synced(source, tmp_path):
            return tmp_path
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            with os.fdopen(fd, "wb") as fh:
                if isinstance(source, bytes):
                    fh.write(source)
                else:
                    with source.open("rb") as src:
                        shutil.copyfileobj(src, fh, COPY_CHUNK)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        return tmp_path

    def publish(self, staged: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Rename a staged file to its instance path (atomically replacing a re-sent SOP's
        file) and make the rename durable."""
        path = self.instance_path(study_uid, series_uid, sop_uid)
        self._ensure_dir(path.parent)
        os.replace(staged, path)
        fsync_dir(path.parent)
        return path

    def discard(self, staged: Path) -> None:
        """Remove a staged file that will not be published (never touches anything else)."""
        if staged.parent != self.tmp or staged.suffix != TEMP_SUFFIX:
            raise ValueError(f"not a staged file: {staged.name}")
        staged.unlink(missing_ok=True)

    def write_sr(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Durably store an encoded SR before its export is queued."""
        path = self.sr_path(study_uid, sop_uid)
        self._write_durable(path, data)
        return path

    def quarantine(self, data: bytes, reason: str, hint: str,
                   received_bytes: int | None = None) -> Path:
        """Keep refused bytes with a sibling ``.reason.txt`` so an admin can see why: at most
        `max_copy_bytes` of them (then named ``*-truncated.dcm``), the reason redacted, the
        oldest copies dropped once the quota is passed. `received_bytes`: the instance's whole
        size when `data` is already a prefix of it."""
        limits = self.quarantine_limits
        whole = max(len(data), received_bytes or 0)
        kept = data[:limits.max_copy_bytes]
        truncated = whole > len(kept)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        stem = f"{stamp}_{sanitise_hint(hint)}_{secrets.token_hex(4)}"
        stem += TRUNCATED_MARK if truncated else ""
        text = redact_reason(reason)
        if truncated:
            text += (f"\ntruncated: the first {len(kept)} of {whole} bytes received are kept "
                     "([storage].quarantine_max_copy_kib)")
        note = text.encode("utf-8", errors="replace") + b"\n"
        path = self.quarantine_dir / f"{stem}.dcm"
        self._write_durable(path, kept)
        self._write_durable(self.quarantine_dir / f"{stem}.reason.txt", note)
        log.info("quarantined %d of %d bytes as %s", len(kept), whole, path.name)
        self._charge_quarantine(_disk_size(len(kept)) + _disk_size(len(note)))
        return path

    def quarantine_usage(self) -> QuarantineUsage:
        """Files and bytes the quarantine's own copies and reasons hold now."""
        entries = self._quarantine_entries()
        return QuarantineUsage(len(entries), sum(size for _, _, size in entries))

    def trim_quarantine(self, quota_bytes: int | None = None) -> int:
        """Drop the oldest copies (with their reasons) while the folder is over the quota, down
        to 90 % of it; how many files went. Housekeeping calls it too, so the quota holds
        when another process or machine writes into the same folder."""
        quota = self.quarantine_limits.quota_bytes if quota_bytes is None else quota_bytes
        with self._quarantine_lock:
            removed, self._quarantine_bytes = self._trim(quota)
        return removed

    def _charge_quarantine(self, n_bytes: int) -> None:
        """Add a new copy to the running total; trim when it passes the quota (the total is
        scanned at first use and after each trim, so other writers cannot fool it for long)."""
        with self._quarantine_lock:
            if self._quarantine_bytes is None:
                self._quarantine_bytes = self.quarantine_usage().size_bytes
            else:
                self._quarantine_bytes += n_bytes
            if self._quarantine_bytes > self.quarantine_limits.quota_bytes:
                _, self._quarantine_bytes = self._trim(self.quarantine_limits.quota_bytes)

    def _trim(self, quota: int) -> tuple[int, int]:
        """(files removed, bytes left): oldest copies first down to the low water."""
        entries = self._quarantine_entries()
        total = sum(size for _, _, size in entries)
        if total <= quota:
            return 0, total
        target = int(quota * _QUOTA_LOW_WATER)
        removed = 0
        by_stem: dict[str, list[tuple[Path, int]]] = {}
        for stem, path, size in sorted(entries, key=lambda e: e[0]):
            by_stem.setdefault(stem, []).append((path, size))
        for files in list(by_stem.values())[:-1]:  # the newest copy always stays
            if total <= target:
                break
            for path, size in files:
                path.unlink(missing_ok=True)
                removed, total = removed + 1, total - size
        log.warning("quarantine over its quota of %.1f MiB: removed the oldest %d file(s)",
                    quota / 2**20, removed)
        return removed, total

    def _quarantine_entries(self) -> list[tuple[str, Path, int]]:
        """(stem, path, block-rounded size) of every copy and reason in ``quarantine/``."""
        entries = []
        with os.scandir(self.quarantine_dir) as it:
            for entry in it:
                match = _QUARANTINE_NAME_RE.fullmatch(entry.name)
                if match is None or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:  # removed meanwhile (housekeeping)
                    continue
                entries.append((match["stem"], Path(entry.path), _disk_size(size)))
        return entries

    def sweep_temp(self, older_than_seconds: float = 0.0) -> int:
        """Delete temp files left by a crash or a transfer cut off mid-way; only
        ``tmp/*.partial`` and files in ``receiving/`` and its receivers' folders are ever
        touched.

        ``older_than_seconds`` lets a running node sweep without racing its own writes (and
        those of receivers on other machines sharing the store).
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        for p in [*self.tmp.glob(f"*{TEMP_SUFFIX}"), *self.receiving.glob("*"),
                  *self.receiving.glob("*/*")]:
            removed += self._unlink_file(p, cutoff)
        if removed:
            log.warning("removed %d leftover temp file(s) from %s", removed, self.tmp)
        return removed

    def receiving_dir(self, name: str) -> Path:
        """One receiver process's own folder under ``receiving/`` (created), named by
        `receiver_name`; only its own process writes there."""
        if not _RECEIVER_NAME_RE.fullmatch(name):
            raise ValueError(f"not a receiver folder name: {name!r:.80}")
        path = self.receiving / name
        self._ensure_dir(path)
        return path

    def clear_receiving(self, own: str, stale_seconds: float = RECEIVING_STALE_SECONDS) -> int:
        """Before a receiver listens: what dead receivers left in ``receiving/``, never what a
        live one writes. Its own folder `own` is emptied (a process of the same name is gone);
        another receiver of this machine whose process is gone loses its folder; elsewhere
        (other machines, files of the layout before folders) only files unchanged for
        `stale_seconds` go. How many files went."""
        host = own.rsplit("-", 1)[0]
        cutoff = time.time() - stale_seconds
        removed = 0
        for entry in sorted(self.receiving.iterdir()):
            if not entry.is_dir() or entry.is_symlink():
                removed += self._unlink_file(entry, cutoff)
                continue
            peer_host, _, pid = entry.name.rpartition("-")
            dead = entry.name == own or (
                peer_host == host and pid.isdigit() and not _pid_alive(int(pid)))
            for p in list(entry.iterdir()):
                removed += self._unlink_file(p, time.time() if dead else cutoff)
            if dead and entry.name != own:
                with contextlib.suppress(OSError):  # not empty: a file that is no dataset
                    entry.rmdir()
        if removed:
            log.warning("removed %d dataset(s) left over in %s", removed, self.receiving)
        return removed

    @staticmethod
    def _unlink_file(p: Path, cutoff: float) -> int:
        """Remove a regular file last changed at or before `cutoff`; 1 if it went."""
        try:
            if p.is_file() and not p.is_symlink() and p.stat().st_mtime <= cutoff:
                p.unlink()
                return 1
        except FileNotFoundError:  # finished or swept by someone else meanwhile
            pass
        return 0

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
