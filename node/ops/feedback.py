"""`python -m node feedback`: record the physician's conclusion for studies, one at a time
(`--study UID --label CLASS`) or from a CSV file (`--csv FILE`, columns study_uid,label).

Labels must be one of the model's classes (model.classes; storage stores what it is given).
A CSV is read whole and checked before anything is written: one bad row refuses the file,
and every bad row is named by its line number (the values are not echoed: a misplaced column
may hold a name). Nothing about who entered a label is recorded; the log says how many
labels and which study UIDs, nothing else. A later label for the same study replaces the
earlier one; a study the node has not received (yet) is accepted and counted apart.

`python -m node retrain --from-db` trains on the studies that have labels.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from model.classes import CLASS_NAMES
from node.config import Config
from storage.db import Database
from storage.feedback import known_studies, record_many
from storage.filestore import validate_uid

log = logging.getLogger(__name__)

MAX_CSV_BYTES = 16 * 1024 * 1024  # ~300 000 rows: far more than a site's labels
MAX_ERRORS_SHOWN = 20  # bad rows listed; the rest are counted
COLUMNS = ("study_uid", "label")
UIDS_LOGGED = 20  # study UIDs named in the log line; more are counted


class FeedbackError(ValueError):
    """The labels cannot be recorded; `errors` names each problem (line numbers, no values)."""

    def __init__(self, errors: list[str]) -> None:
        """Keep every error; the message shows the first MAX_ERRORS_SHOWN."""
        self.errors = errors
        shown = errors[:MAX_ERRORS_SHOWN]
        more = len(errors) - len(shown)
        super().__init__("\n".join(shown) + (f"\n... and {more} more" if more > 0 else ""))


@dataclass(frozen=True)
class Recorded:
    """What a feedback command stored."""

    new: int
    replaced: int
    unknown_studies: int
    uids: list[str] = field(default_factory=list)


def check_row(uid: str, label: str, where: str) -> list[str]:
    """Problems of one (study UID, label) pair, without quoting either."""
    errors = []
    try:
        validate_uid(uid)
    except ValueError:
        errors.append(f"{where}: study_uid is not a DICOM UID (digits and dots, at most 64)")
    if label not in CLASS_NAMES:
        errors.append(f"{where}: label is not one of {', '.join(CLASS_NAMES)}")
    return errors


def read_csv(path: Path, max_bytes: int = MAX_CSV_BYTES) -> list[tuple[str, str]]:
    """The (study UID, label) rows of a CSV with a study_uid,label header (more columns are
    ignored; blank lines skipped); FeedbackError lists every bad row by line number."""
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise FeedbackError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    if len(data) > max_bytes:
        raise FeedbackError([f"{path}: larger than {max_bytes // 2**20} MiB: split it"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FeedbackError([f"{path}: not UTF-8 text (byte {exc.start})"]) from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise FeedbackError([f"{path}: line 1: header lacks {', '.join(missing)} "
                             f"(expected {','.join(COLUMNS)})"])
    iu, il = header.index("study_uid"), header.index("label")
    rows: list[tuple[str, str]] = []
    errors: list[str] = []
    try:
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            where = f"{path.name}: line {reader.line_num}"
            if len(cells) <= max(iu, il):
                errors.append(f"{where}: {len(cells)} column(s), {len(header)} expected")
                continue
            uid, label = cells[iu].strip(), cells[il].strip()
            bad = check_row(uid, label, where)
            errors += bad
            if not bad:
                rows.append((uid, label))
    except csv.Error as exc:
        errors.append(f"{path.name}: line {reader.line_num}: not valid CSV ({exc})")
    if errors:
        raise FeedbackError(errors)
    if not rows:
        raise FeedbackError([f"{path}: no labelled rows"])
    return rows


def record(cfg: Config, rows: list[tuple[str, str]]) -> Recorded:
    """Store checked rows in one transaction; logs counts and study UIDs only."""
    db = Database(cfg.database_url)
    db.create_all()
    try:
        new, replaced = record_many(db, rows)
        uids = list(dict.fromkeys(uid for uid, _ in rows))
        unknown = len(set(uids) - known_studies(db, uids))
    finally:
        db.dispose()
    shown = ", ".join(uids[:UIDS_LOGGED]) + (f" and {len(uids) - UIDS_LOGGED} more"
                                             if len(uids) > UIDS_LOGGED else "")
    log.info("feedback recorded: %d new, %d replaced, %d for studies not received (yet): %s",
             new, replaced, unknown, shown)
    return Recorded(new, replaced, unknown, uids)


def add_feedback_arguments(p: argparse.ArgumentParser) -> None:
    """`feedback --study UID --label CLASS` or `feedback --csv FILE`."""
    p.add_argument("--config", type=Path, default=Path("config.toml"))
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="the study's StudyInstanceUID")
    which.add_argument("--csv", type=Path, metavar="FILE",
                       help="CSV with a header naming study_uid and label columns")
    p.add_argument("--label", choices=CLASS_NAMES, help="the physician's conclusion "
                   "(with --study)")


def run_feedback(cfg: Config, args: argparse.Namespace) -> int:
    """Check, then record; exit status 2 with every problem on stderr, nothing written."""
    try:
        if args.csv is not None:
            if args.label is not None:
                raise FeedbackError(["--label goes with --study; a CSV carries its labels"])
            rows = read_csv(args.csv)
        else:
            if args.label is None:
                raise FeedbackError(["--study needs --label"])
            errors = check_row(args.study, args.label, "--study")
            if errors:
                raise FeedbackError(errors)
            rows = [(args.study, args.label)]
    except FeedbackError as exc:
        print(f"feedback: nothing recorded:\n{exc}", file=sys.stderr)
        return 2
    out = record(cfg, rows)
    print(f"feedback: {out.new + out.replaced} label(s) recorded ({out.new} new, "
          f"{out.replaced} replacing an earlier label); {out.unknown_studies} for studies "
          "not received (yet)")
    return 0
