"""Group commit of the receiver's queue rows (node.receive.rows, issue 18): C-STOREs waiting
for SQLite's one write turn are committed together, one transaction and one fsync, each
handler answered only once its row is in; a refused row rolls back alone; a failure or a
turn not had in time never leaves a row behind. Real SQLite files, real threads."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, select

from node.receive.rows import GroupCommit
from storage.db import Database, DatabaseBusy, Instance
from storage.intake import InstanceRecord, RecordOutcome, Refusal, StudyLimits, record_instances

ROOT = "1.2.826.0.1.3680043.8.498.77"
NM = "1.2.840.10008.5.1.4.1.1.20"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _record(n: int, study: int, patient: str | None = "patient-a") -> InstanceRecord:
    return InstanceRecord(
        sop_uid=f"{ROOT}.3.{n}", study_uid=f"{ROOT}.1.{study}", series_uid=f"{ROOT}.2.{study}",
        sop_class_uid=NM, transfer_syntax_uid=EXPLICIT_LE, path=f"/store/{n}.dcm",
        views=("anterior",), n_frames=1, size_bytes=100, calling_ae="CAM",
        patient_key=patient)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    d = Database(f"sqlite:///{tmp_path / 'queue.db'}")
    d.create_all()
    yield d
    d.dispose()


def _commits(db: Database) -> list[int]:
    """A counter of the engine's commits, kept up to date by an event listener."""
    seen = [0]

    def on_commit(_conn: object) -> None:
        seen[0] += 1

    event.listen(db.engine, "commit", on_commit)
    return seen


def _stored(db: Database) -> set[str]:
    with db.read_session() as s:
        return set(s.execute(select(Instance.sop_uid)).scalars())


def _record_in_threads(rows: GroupCommit, recs: list[InstanceRecord], turn: threading.Lock
                       ) -> dict[str, RecordOutcome | BaseException]:
    """Each record from its own thread (as each association's handler would) while `turn`
    (held by the caller: another C-STORE writing) keeps them waiting; released once all are
    queued."""
    out: dict[str, RecordOutcome | BaseException] = {}

    def one(rec: InstanceRecord) -> None:
        try:
            out[rec.sop_uid] = rows.record(rec)
        except BaseException as exc:  # the test looks at it
            out[rec.sop_uid] = exc

    threads = [threading.Thread(target=one, args=(r,)) for r in recs]
    for t in threads:
        t.start()
    _wait_queued(rows, len(recs))
    turn.release()
    return _joined(threads, out)


def _wait_queued(rows: GroupCommit, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(rows._queue) < n:
        assert time.monotonic() < deadline, "the handlers never queued"
        time.sleep(0.01)


def _joined(threads: list[threading.Thread], out: dict[str, RecordOutcome | BaseException]
            ) -> dict[str, RecordOutcome | BaseException]:
    for t in threads:
        t.join(30)
    return out


def test_rows_waiting_for_the_turn_go_in_one_transaction(sqlite_db: Database) -> None:
    turn = threading.Lock()
    rows = GroupCommit(sqlite_db, StudyLimits(), turn, wait_seconds=30)
    commits = _commits(sqlite_db)
    recs = [_record(n, study=n % 3) for n in range(8)]
    turn.acquire()  # another C-STORE is writing: all eight queue behind it
    out = _record_in_threads(rows, recs, turn)
    assert all(isinstance(o, RecordOutcome) and o.refusal is None for o in out.values())
    assert _stored(sqlite_db) == {r.sop_uid for r in recs}
    assert commits[0] == 1  # eight rows, one commit (one WAL fsync)
    new_studies = sum(1 for o in out.values() if isinstance(o, RecordOutcome) and o.new_study)
    assert new_studies == 3  # later rows of a study see the earlier ones of the same batch


def test_alone_a_row_commits_at_once(sqlite_db: Database) -> None:
    rows = GroupCommit(sqlite_db, StudyLimits(), threading.Lock(), wait_seconds=30)
    commits = _commits(sqlite_db)
    outcome = rows.record(_record(1, study=1))
    assert outcome.refusal is None and outcome.new_study
    assert commits[0] == 1 and _stored(sqlite_db) == {_record(1, 1).sop_uid}


def test_a_refused_row_rolls_back_alone(sqlite_db: Database) -> None:
    turn = threading.Lock()
    rows = GroupCommit(sqlite_db, StudyLimits(), turn, wait_seconds=30)
    first, other_patient, third = (_record(1, study=1), _record(2, study=1, patient="b"),
                                   _record(3, study=2))
    rows.record(first)  # the study belongs to patient a
    turn.acquire()
    out = _record_in_threads(rows, [other_patient, third], turn)
    refused = out[other_patient.sop_uid]
    assert isinstance(refused, RecordOutcome) and refused.refusal is Refusal.PATIENT_MISMATCH
    kept = out[third.sop_uid]
    assert isinstance(kept, RecordOutcome) and kept.refusal is None
    assert _stored(sqlite_db) == {first.sop_uid, third.sop_uid}


def test_a_locked_database_is_busy_for_every_waiting_row_and_writes_none(
        sqlite_db: Database, tmp_path: Path) -> None:
    quick = sqlite_db.with_lock_wait(0.3)
    turn = threading.Lock()
    rows = GroupCommit(quick, StudyLimits(), turn, wait_seconds=30)
    other = sqlite3.connect(tmp_path / "queue.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process (the classifier) holds the write lock
    try:
        turn.acquire()
        out = _record_in_threads(rows, [_record(n, study=1) for n in range(4)], turn)
        assert all(isinstance(o, DatabaseBusy) for o in out.values()), out
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert _stored(sqlite_db) == set() and rows._queue == []
    assert rows.record(_record(9, study=1)).refusal is None  # the lock gone: serving again


def test_a_turn_not_had_in_time_withdraws_the_row(sqlite_db: Database) -> None:
    turn = threading.Lock()
    rows = GroupCommit(sqlite_db, StudyLimits(), turn, wait_seconds=0.3)
    turn.acquire()  # a writer that outlasts the wait
    try:
        with pytest.raises(DatabaseBusy):
            rows.record(_record(1, study=1))
    finally:
        turn.release()
    assert rows._queue == []
    rows.record(_record(2, study=1))  # the next holder must not commit the withdrawn row
    assert _stored(sqlite_db) == {_record(2, 1).sop_uid}


def test_a_bad_record_fails_alone(sqlite_db: Database) -> None:
    rows = GroupCommit(sqlite_db, StudyLimits(), threading.Lock(), wait_seconds=30)
    bad = _record(1, study=1)
    bad = InstanceRecord(**{**bad.__dict__, "series_uid": "1." + "2" * 70})  # over 64 chars
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        rows.record(bad)
    assert rows._queue == [] and rows.record(_record(2, study=1)).refusal is None


def test_record_instances_savepoints_on_both_databases(db: Database) -> None:
    """The batch query itself (storage.intake.record_instances) on SQLite and PostgreSQL."""
    first, other_patient, third = (_record(1, study=1), _record(2, study=1, patient="b"),
                                   _record(3, study=2))
    outcomes = record_instances(db, [first, other_patient, third])
    assert [o.refusal for o in outcomes] == [None, Refusal.PATIENT_MISMATCH, None]
    assert [o.new_study for o in outcomes] == [True, False, True]
    assert _stored(db) == {first.sop_uid, third.sop_uid}
