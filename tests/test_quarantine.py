"""The bounded quarantine (storage/filestore.py, node/service/housekeeping.py): a refused
instance over the copy cap keeps only its header, the folder stays under its quota (oldest
first, with the reasons), copies age out on their own clock whatever the retention, and the
reason files are redacted like the log."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from node.config import ConfigError, StorageSection, config_from_dict
from node.logs import redacted
from node.service.housekeeping import bound_quarantine, housekeeping
from storage.db import Database
from storage.filestore import (
    MAX_REASON_CHARS,
    TRUNCATED_MARK,
    FileStore,
    QuarantineLimits,
    redact_reason,
)

KIB = 1024
BLOCK = 4096  # what the quota counts a small file as


def _store(tmp_path: Path, copy: int = 8 * KIB, quota: int = 64 * KIB) -> FileStore:
    return FileStore(tmp_path / "store", QuarantineLimits(copy, quota))


def _reason_of(copy: Path) -> Path:
    stem = copy.name.removesuffix(".dcm")
    return copy.with_name(f"{stem}.reason.txt")


def _pairs(files: FileStore) -> dict[str, set[str]]:
    """Stem -> suffixes present, for every quarantine file."""
    out: dict[str, set[str]] = {}
    for p in files.quarantine_dir.iterdir():
        kind = "dcm" if p.name.endswith(".dcm") else "reason"
        stem = p.name.removesuffix(".dcm").removesuffix(".reason.txt")
        out.setdefault(stem, set()).add(kind)
    return out


def _on_disk(files: FileStore) -> int:
    return sum(p.stat().st_size for p in files.quarantine_dir.iterdir())


# --- header-only copies ------------------------------------------------------------------


def test_an_instance_over_the_cap_keeps_only_its_header(tmp_path: Path) -> None:
    files = _store(tmp_path)
    data = bytes(range(256)) * 100  # 25.6 KB, the cap is 8 KiB
    copy = files.quarantine(data, "pixel data cannot be decoded", "1.2.3")
    assert copy.name.endswith(f"{TRUNCATED_MARK}.dcm") and copy.suffix == ".dcm"
    assert copy.read_bytes() == data[:8 * KIB]
    reason = _reason_of(copy).read_text()
    assert reason.startswith("pixel data cannot be decoded\n")
    assert f"the first {8 * KIB} of {len(data)} bytes received are kept" in reason


def test_a_prefix_handed_in_says_how_much_arrived(tmp_path: Path) -> None:
    """The receiver reads at most a prefix of an oversize instance; the reason still tells the
    whole size, and a prefix within the cap is still marked as truncated."""
    files = _store(tmp_path)
    copy = files.quarantine(b"DICM" * 100, "too large", "1.2.4", received_bytes=70 * 2**20)
    assert copy.name.endswith(f"{TRUNCATED_MARK}.dcm") and copy.stat().st_size == 400
    assert f"the first 400 of {70 * 2**20} bytes" in _reason_of(copy).read_text()


def test_an_instance_within_the_cap_is_kept_whole_under_its_plain_name(tmp_path: Path) -> None:
    files = _store(tmp_path)
    data = b"x" * (8 * KIB)  # exactly the cap
    copy = files.quarantine(data, "refused", "1.2.5", received_bytes=len(data))
    assert TRUNCATED_MARK not in copy.name and copy.read_bytes() == data
    assert _reason_of(copy).read_text() == "refused\n"


# --- quota ----------------------------------------------------------------------------------


def test_the_quota_drops_the_oldest_copies_with_their_reasons(tmp_path: Path) -> None:
    files = _store(tmp_path, copy=8 * KIB, quota=64 * KIB)
    notes = files.quarantine_dir / "admin-notes.txt"  # not ours: never counted or removed
    notes.write_bytes(b"n" * 100 * KIB)
    copies = []
    for i in range(20):  # each copy: 8 KiB + a 4 KiB block for its reason
        copies.append(files.quarantine(b"d" * 8 * KIB, f"reason {i}", f"1.2.{i}"))
        assert files.quarantine_usage().size_bytes <= 64 * KIB
    present = [c.exists() for c in copies]
    assert present[-1] and not present[0]
    assert present == sorted(present), "a newer copy went before an older one"
    assert all(kinds == {"dcm", "reason"} for stem, kinds in _pairs(files).items()
               if stem != "admin-notes.txt"), "a copy without its reason or the reverse"
    assert notes.exists() and files.quarantine_usage().files == 2 * sum(present)
    assert _on_disk(files) - notes.stat().st_size <= 64 * KIB


def test_tiny_copies_count_as_whole_blocks(tmp_path: Path) -> None:
    """A sender of many one-byte instances fills a disk by blocks and inodes, not bytes."""
    files = _store(tmp_path, copy=4 * KIB, quota=40 * KIB)
    for i in range(30):
        files.quarantine(b"x", "r", f"1.3.{i}")
    usage = files.quarantine_usage()
    assert usage.size_bytes == usage.files * BLOCK <= 40 * KIB


def test_the_newest_copy_stays_even_when_it_alone_passes_the_quota(tmp_path: Path) -> None:
    files = _store(tmp_path, copy=8 * KIB, quota=8 * KIB)
    first = files.quarantine(b"a" * 8 * KIB, "r", "1.4.1")
    second = files.quarantine(b"b" * 8 * KIB, "r", "1.4.2")
    assert second.exists() and _reason_of(second).exists() and not first.exists()


def test_concurrent_refusals_stay_under_the_quota(tmp_path: Path) -> None:
    files = _store(tmp_path, copy=8 * KIB, quota=96 * KIB)
    errors: list[BaseException] = []

    def refuse(n: int) -> None:
        try:
            for i in range(15):
                files.quarantine(os.urandom(6 * KIB), "r", f"1.5.{n}.{i}")
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=refuse, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert files.quarantine_usage().size_bytes <= 96 * KIB
    assert all(kinds == {"dcm", "reason"} for kinds in _pairs(files).values())


def test_housekeeping_trims_what_another_writer_left_over_the_quota(tmp_path: Path) -> None:
    """Another process (or machine) with a bigger quota filled the folder: housekeeping's pass
    applies the configured quota, oldest first."""
    other = _store(tmp_path, copy=64 * KIB, quota=2**30)
    copies = [other.quarantine(b"z" * 60 * KIB, "r", f"1.6.{i}") for i in range(40)]
    assert other.quarantine_usage().size_bytes > 2**20
    files = FileStore(tmp_path / "store")
    removed = bound_quarantine(files, StorageSection(quarantine_quota_mb=1, quarantine_days=0))
    usage = files.quarantine_usage()
    assert removed > 0 and usage.size_bytes <= 0.9 * 2**20
    assert copies[-1].exists() and not copies[0].exists()
    assert removed + usage.files == 80


# --- age --------------------------------------------------------------------------------------


def _age(path: Path, days: float) -> None:
    stamp = time.time() - days * 86400
    os.utime(path, (stamp, stamp))


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'q.db'}")
    database.create_all()
    yield database  # type: ignore[misc]
    database.dispose()


def test_age_limit_applies_whatever_the_retention(tmp_path: Path, db: Database) -> None:
    files = _store(tmp_path)
    old = files.quarantine(b"old", "r", "1.7.1")
    fresh = files.quarantine(b"fresh", "r", "1.7.2")
    for p in (old, _reason_of(old)):
        _age(p, 8)
    report = housekeeping(db, files, StorageSection(retention_days=0.0, quarantine_days=7.0))
    assert report.quarantined == 2 and report.studies == 0
    assert not old.exists() and not _reason_of(old).exists()
    assert fresh.exists() and _reason_of(fresh).exists()
    # a retention far longer than the quarantine's age limit does not keep old copies either
    _age(fresh, 8)
    _age(_reason_of(fresh), 8)
    report = housekeeping(db, files, StorageSection(retention_days=365.0, quarantine_days=7.0))
    assert report.quarantined == 2 and not fresh.exists()


def test_age_limit_zero_keeps_copies_until_the_quota(tmp_path: Path, db: Database) -> None:
    files = _store(tmp_path)
    ancient = files.quarantine(b"old", "r", "1.8.1")
    _age(ancient, 10_000)
    far = datetime.now(UTC) + timedelta(days=10_000)
    report = housekeeping(db, files, StorageSection(quarantine_days=0.0), now=far)
    assert report.quarantined == 0 and ancient.exists()


# --- redaction --------------------------------------------------------------------------------


MESSAGES = [
    "Invalid value for VR UI: 'DOE^JOHN'",
    'could not convert "DOE^JOHN" to an integer',
    "bad bytes b'PID-123\\x00' in element",
    "unterminated 'DOE^JOHN",
    "frame 1: JPEG 2000 codestream declares 16384 x 16384 x 1 sample(s)",
    "(7FE0,0010) value ('a', 'b') of length 4",
]


@pytest.mark.parametrize("message", MESSAGES)
def test_reasons_follow_the_log_rule(message: str) -> None:
    """node.logs.redacted (what a log line shows of an exception) and a quarantine reason blank
    the same quoted values."""
    assert redacted(ValueError(message)) == f"ValueError: {redact_reason(message)}"
    assert "DOE" not in redact_reason(message) and "PID" not in redact_reason(message)


def test_reasons_keep_possessives_and_become_one_capped_line() -> None:
    """Our own reasons say "the request's" and "another patient's": not quotes."""
    assert redact_reason("study 1.2 already holds another patient's instances") == \
        "study 1.2 already holds another patient's instances"
    assert redact_reason("differs from the request's 1.2.3: 'DOE'") == \
        "differs from the request's 1.2.3: <value>"
    assert redact_reason("line one\nline 'DOE'\r\n\tthree") == "line one line <value> three"
    assert len(redact_reason("x" * 5000)) == MAX_REASON_CHARS


def test_quarantine_writes_the_redacted_reason(tmp_path: Path) -> None:
    files = _store(tmp_path)
    copy = files.quarantine(b"x", "dataset cannot be parsed: ValueError: 'DOE^JOHN'\nmore",
                            "1.9.1")
    assert _reason_of(copy).read_text() == "dataset cannot be parsed: ValueError: <value> more\n"


# --- configuration ----------------------------------------------------------------------------


def test_config_keys_and_their_checks() -> None:
    cfg = config_from_dict({"storage": {"quarantine_max_copy_kib": 16, "quarantine_quota_mb": 2,
                                        "quarantine_days": 0}})
    assert cfg.quarantine_max_copy_bytes == 16 * KIB
    assert cfg.quarantine_quota_bytes == 2 * 2**20 and cfg.storage.quarantine_days == 0.0
    limits = QuarantineLimits(cfg.quarantine_max_copy_bytes, cfg.quarantine_quota_bytes)
    assert limits.max_copy_bytes == 16 * KIB
    for bad, words in (({"quarantine_max_copy_kib": 0}, "quarantine_max_copy_kib must be >= 1"),
                       ({"quarantine_quota_mb": 1, "quarantine_max_copy_kib": 2048},
                        "must hold at least one"),
                       ({"quarantine_days": -1}, "quarantine_days must be >= 0")):
        with pytest.raises(ConfigError, match=words):
            config_from_dict({"storage": bad})
    with pytest.raises(ValueError):
        QuarantineLimits(max_copy_bytes=2 * KIB, quota_bytes=KIB)
