"""storage/: durable files, the queue database and its concurrency guarantees.

Real SQLite files in tmp_path, no mocks. Every database test runs twice: on SQLite and on a
fresh database of the test PostgreSQL server (conftest `database_url`; `make test` starts
one with .ci/postgres.sh). SQLite-only checks are skipped on PostgreSQL.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from storage import intake, jobs
from storage.db import (
    CompletionReason,
    Database,
    Export,
    ExportState,
    Instance,
    Job,
    Purge,
    Study,
    StudyState,
    make_engine,
)
from storage.exports import (
    claim_export,
    export_failed,
    export_succeeded,
    release_stale_exports,
    renew_export_claims,
    requeue_dead_exports,
)
from storage.filestore import TEMP_SUFFIX, FileStore, validate_uid
from storage.intake import (
    InstanceRecord,
    Refusal,
    mark_complete,
    record_instance,
    studies_due_quiet,
    study_instances,
    study_patient_keys,
)
from storage.jobs import NewResult, claim_job, finish_job, release_stale_claims, store_result
from storage.reports import WorkBacklog, queue_depth, study_summaries, work_backlog
from storage.retention import purge_candidates, purgeable_studies, record_purge

T0 = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC)
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
DEST = "PACS@127.0.0.1:11112"


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def db_url(database_url: str) -> str:
    """A fresh SQLite file or a fresh PostgreSQL database (both, parametrised)."""
    return database_url


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.create_all()
    yield database
    database.dispose()


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


def rec(sop: str, views: tuple[str, ...] = ("anterior",), study: str = STUDY,
        patient_key: str | None = "pk-1") -> InstanceRecord:
    return InstanceRecord(
        sop_uid=sop, study_uid=study, series_uid=SERIES,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.20", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"/data/{sop}.dcm", views=views, n_frames=len(views), size_bytes=1000,
        calling_ae="CAMERA", patient_key=patient_key)


def seed_jobs(db: Database, n: int) -> list[int]:
    """n complete studies with one pending job each, in one transaction (fast)."""
    with db.session() as s, s.begin():
        for i in range(n):
            uid = f"9.{i}"
            s.add(Study(study_uid=uid, state="complete", first_seen_at=T0, last_instance_at=T0,
                        completion_reason="manual"))
            s.flush()
            s.add(Job(study_uid=uid, kind="classify", state="pending", attempts=0,
                      created_at=T0))
    with db.session() as s:
        return sorted(s.execute(select(Job.id)).scalars())


def classified_study(db: Database) -> int:
    """STUDY with both views, completed, claimed and classified; returns the job id."""
    record_instance(db, rec("1.1", ("anterior",)), now=T0)
    record_instance(db, rec("1.2", ("posterior",)), now=T0)
    assert mark_complete(db, STUDY, "both_views", now=T0)
    job = claim_job(db, "w", now=T0)
    assert job is not None
    finish_job(db, job.job_id, ok=True, now=T0)
    return job.job_id


def new_result(job_id: int | None, sr_uid: str = "2.25.1") -> NewResult:
    return NewResult(study_uid=STUDY, job_id=job_id, model_version="v1", model_sha256="ab" * 32,
                     predicted_class="normal", probabilities={"normal": 0.9, "other": 0.1},
                     per_view={"anterior": {"normal": 0.8, "other": 0.2}}, sr_sop_uid=sr_uid,
                     sr_series_uid="2.25.2", sr_path=f"/sr/{sr_uid}.dcm", note=None)


def export_id_ready(db: Database) -> int:
    job_id = classified_study(db)
    _, export_id = store_result(db, new_result(job_id), DEST, now=T0)
    return export_id


# --- FileStore -----------------------------------------------------------------------------


def test_write_instance_is_complete_and_leaves_no_temp(store: FileStore) -> None:
    data = os.urandom(256 * 1024)
    path = store.write_instance(STUDY, SERIES, "1.2.3", data)
    assert path == store.root / "studies" / STUDY / SERIES / "1.2.3.dcm"
    assert path.read_bytes() == data
    assert list(store.tmp.iterdir()) == []
    again = store.write_instance(STUDY, SERIES, "1.2.3", b"resent")  # atomic replace
    assert again == path and path.read_bytes() == b"resent"
    assert list(store.tmp.iterdir()) == []


def test_failed_write_removes_its_temp_file(store: FileStore) -> None:
    target = store.instance_path(STUDY, SERIES, "1.2.3")
    target.mkdir(parents=True)  # a directory where the file should go: rename fails
    with pytest.raises(OSError):
        store.write_instance(STUDY, SERIES, "1.2.3", b"x")
    assert list(store.tmp.iterdir()) == []


def test_write_sr_layout(store: FileStore) -> None:
    path = store.write_sr(STUDY, "2.25.7", b"sr")
    assert path == store.root / "sr" / STUDY / "2.25.7.dcm" and path.read_bytes() == b"sr"


@pytest.mark.parametrize("bad", ["", ".", "..", "../1.2", "1.2/../3", "/etc/passwd", "1..2",
                                 ".1.2", "1.2.", "1.2.a", "1 2", "1.2\x00", "1" * 65,
                                 "1.2\\3"])
def test_uid_validation_rejects_traversal_and_junk(store: FileStore, bad: str) -> None:
    with pytest.raises(ValueError):
        store.instance_path(STUDY, SERIES, bad)
    with pytest.raises(ValueError):
        store.write_instance(bad, SERIES, "1.2", b"x")
    with pytest.raises(ValueError):
        store.write_sr(STUDY, bad, b"x")


def test_uid_validation_accepts_real_uids() -> None:
    assert validate_uid("1.2.840.10008.5.1.4.1.1.20") == "1.2.840.10008.5.1.4.1.1.20"
    assert validate_uid("1." + "2" * 62) == "1." + "2" * 62  # exactly 64


def test_quarantine_keeps_data_and_reason(store: FileStore) -> None:
    path = store.quarantine(b"bad bytes", "SOP class not accepted", "../../etc/passwd 1.2")
    assert path.parent == store.root / "quarantine" and path.suffix == ".dcm"
    assert path.read_bytes() == b"bad bytes"
    assert "/" not in path.name and ".." not in path.name and " " not in path.name
    reason = path.with_name(path.name[: -len(".dcm")] + ".reason.txt")
    assert reason.read_text().strip() == "SOP class not accepted"
    second = store.quarantine(b"other", "again", "../../etc/passwd 1.2")
    assert second != path  # same hint, same second: still two files
    assert len(list(store.quarantine_dir.glob("*.dcm"))) == 2
    assert list(store.tmp.iterdir()) == []


def test_sweep_temp_removes_leftovers_only(store: FileStore) -> None:
    data = store.write_instance(STUDY, SERIES, "1.2.3", b"keep me")
    sr = store.write_sr(STUDY, "2.25.1", b"keep sr")
    for i in range(3):
        (store.tmp / f"crash{i}{TEMP_SUFFIX}").write_bytes(b"half")
    foreign = store.tmp / "notes.txt"
    foreign.write_text("not ours")
    assert store.sweep_temp(older_than_seconds=3600) == 0  # fresh: could be in flight
    assert store.sweep_temp() == 3
    assert store.sweep_temp() == 0
    assert data.read_bytes() == b"keep me" and sr.read_bytes() == b"keep sr"
    assert foreign.exists()
    assert store.free_bytes() > 0


# --- database set-up -----------------------------------------------------------------------


def test_sqlite_wal_and_durability_pragmas(db: Database) -> None:
    if db.dialect != "sqlite":
        pytest.skip("SQLite pragmas")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_sqlite_write_sessions_take_the_lock_immediately(db: Database) -> None:
    """A write session holds the lock from BEGIN; a read session does not need it."""
    if db.dialect != "sqlite":
        pytest.skip("SQLite locking")
    with db.session() as s:
        s.execute(select(1))  # BEGIN IMMEDIATE: the write lock is held from here on
        with db.read_session() as r:  # WAL readers are not blocked by it
            assert r.execute(select(func.count()).select_from(Study)).scalar_one() == 0
        raw = db.engine.raw_connection()
        try:
            raw.driver_connection.execute("PRAGMA busy_timeout=50")  # type: ignore[union-attr]
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                raw.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
        finally:
            raw.close()


def test_make_engine_creates_parent_dir(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a' / 'b' / 'q.db'}")
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    engine.dispose()
    assert (tmp_path / "a" / "b" / "q.db").exists()


def test_timestamps_are_aware_utc_and_naive_is_refused(db: Database) -> None:
    record_instance(db, rec("1.1"), now=T0.astimezone(timezone(timedelta(hours=2))))
    with db.session() as s:
        study = s.get(Study, STUDY)
        assert study is not None and study.first_seen_at == T0
        assert study.first_seen_at.utcoffset() == timedelta(0)
    with pytest.raises(ValueError):
        record_instance(db, rec("1.2"), now=datetime(2025, 1, 1))


def test_one_active_classify_job_per_study_is_enforced(db: Database) -> None:
    record_instance(db, rec("1.1"), now=T0)
    assert mark_complete(db, STUDY, "quiet", now=T0)
    with pytest.raises(IntegrityError), db.session() as s, s.begin():
        s.add(Job(study_uid=STUDY, kind="classify", state="pending", attempts=0,
                  created_at=T0))


def test_claim_sql_uses_skip_locked_on_postgresql_only() -> None:
    stmt = jobs._job_claim_stmt("w0", "classify", T0)
    pg = str(stmt.compile(dialect=postgresql.dialect()))
    lite = str(stmt.compile(dialect=sqlite.dialect()))
    assert "FOR UPDATE SKIP LOCKED" in pg and "RETURNING" in pg
    assert "FOR UPDATE" not in lite and "RETURNING" in lite


def test_instance_rows_are_locked_on_postgresql() -> None:
    """Several receivers on one PostgreSQL: the study and instance rows a C-STORE updates
    are read FOR UPDATE there (SQLite serialises writers with BEGIN IMMEDIATE instead)."""
    for stmt in (intake._SELECT_STUDY, intake._SELECT_INSTANCE):
        assert "FOR UPDATE" in str(stmt.compile(dialect=postgresql.dialect()))
        assert "FOR UPDATE" not in str(stmt.compile(dialect=sqlite.dialect()))


# --- instances and studies -----------------------------------------------------------------


def test_record_instance_new_duplicate_and_views(db: Database) -> None:
    first = record_instance(db, rec("1.1", ("anterior",)), now=T0)
    assert first.new_study and not first.duplicate and not first.late
    assert first.study_state == "receiving" and first.has_anterior and not first.has_posterior
    second = record_instance(db, rec("1.2", ("posterior",)), now=T0 + timedelta(seconds=5))
    assert not second.new_study and second.has_anterior and second.has_posterior
    again = record_instance(db, rec("1.1", ("anterior",)), now=T0 + timedelta(seconds=9))
    assert again.duplicate and not again.new_study and not again.patient_mismatch
    [summary] = study_summaries(db)
    assert summary.instance_count == 2 and summary.late_instance_count == 0
    assert summary.views == "anterior,posterior"
    assert summary.last_instance_at == T0 + timedelta(seconds=9)
    infos = {i.sop_uid: i for i in study_instances(db, STUDY)}
    assert set(infos) == {"1.1", "1.2"}
    assert infos["1.2"].views == ("posterior",) and infos["1.2"].n_frames == 1


def test_multiframe_instance_sets_both_views(db: Database) -> None:
    out = record_instance(db, rec("1.1", ("anterior", "posterior")), now=T0)
    assert out.has_anterior and out.has_posterior
    assert study_instances(db, STUDY)[0].views == ("anterior", "posterior")


def test_late_instance_is_recorded_and_flagged(db: Database) -> None:
    classified_study(db)
    late = record_instance(db, rec("1.3", ("anterior",)), now=T0 + timedelta(minutes=5))
    assert late.late and late.study_state == "classified" and not late.duplicate
    [summary] = study_summaries(db)
    assert summary.instance_count == 3 and summary.late_instance_count == 1
    flags = {i.sop_uid: i.late for i in study_instances(db, STUDY)}
    assert flags == {"1.1": False, "1.2": False, "1.3": True}
    resent = record_instance(db, rec("1.1", ("anterior",)), now=T0 + timedelta(minutes=6))
    assert resent.duplicate and not resent.late  # a re-send of an on-time instance
    assert study_summaries(db)[0].late_instance_count == 1


def test_patient_mismatch_is_not_recorded(db: Database) -> None:
    record_instance(db, rec("1.1", patient_key="pk-A"), now=T0)
    out = record_instance(db, rec("1.2", ("posterior",), patient_key="pk-B"), now=T0)
    assert out.patient_mismatch and not out.has_posterior
    assert [i.sop_uid for i in study_instances(db, STUDY)] == ["1.1"]
    assert study_summaries(db)[0].instance_count == 1


def test_unknown_patient_key_is_adopted_later(db: Database) -> None:
    record_instance(db, rec("1.1", patient_key=None), now=T0)
    assert not record_instance(db, rec("1.2", patient_key="pk-A"), now=T0).patient_mismatch
    assert record_instance(db, rec("1.3", patient_key="pk-B"), now=T0).patient_mismatch
    with db.session() as s:
        study = s.get(Study, STUDY)
        assert study is not None and study.patient_key == "pk-A"


def test_sop_resent_under_another_study_is_refused_not_moved(db: Database) -> None:
    record_instance(db, rec("1.1", ("anterior",)), now=T0)
    record_instance(db, rec("1.2", ("posterior",)), now=T0)
    out = record_instance(db, rec("1.2", ("posterior",), study="7.7"), now=T0)
    assert out.refusal is Refusal.SOP_IN_OTHER_STUDY and out.detail == f"stored under study {STUDY}"
    rows = {r.study_uid: r for r in study_summaries(db)}
    assert set(rows) == {STUDY}  # the other study's row, inserted first, was rolled back
    assert rows[STUDY].instance_count == 2 and rows[STUDY].views == "anterior,posterior"
    assert [i.sop_uid for i in study_instances(db, STUDY)] == ["1.1", "1.2"]


def test_record_instance_refuses_invalid_uids(db: Database) -> None:
    """Same answer on SQLite and PostgreSQL (where VARCHAR(64) would reject it)."""
    with pytest.raises(ValueError):
        record_instance(db, rec("1." + "2" * 63), now=T0)
    with pytest.raises(ValueError):
        record_instance(db, rec("1.1", study="../1"), now=T0)
    with pytest.raises(ValueError):
        record_instance(db, rec("1.1", ("ant,erior",)), now=T0)
    assert study_summaries(db) == []


def test_concurrent_first_instances_of_one_study(db: Database) -> None:
    n = 8
    barrier = threading.Barrier(n)
    outcomes: list[object] = []
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            views = ("anterior",) if i % 2 else ("posterior",)
            outcomes.append(record_instance(db, rec(f"1.{i}", views)))
        except BaseException as exc:  # reported below, with the thread's traceback lost
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(outcomes) == n
    assert sum(o.new_study for o in outcomes) == 1  # type: ignore[attr-defined]
    [summary] = study_summaries(db)
    assert summary.instance_count == n and summary.views == "anterior,posterior"


def test_mark_complete_is_idempotent_and_creates_one_job(db: Database) -> None:
    assert not mark_complete(db, STUDY, "quiet", now=T0)  # unknown study
    record_instance(db, rec("1.1"), now=T0)
    assert mark_complete(db, STUDY, "both_views", now=T0)
    assert not mark_complete(db, STUDY, "quiet", now=T0)
    assert not mark_complete(db, STUDY, "both_views", now=T0)
    with db.session() as s:
        jobs = s.execute(select(Job)).scalars().all()
        study = s.get(Study, STUDY)
    assert [(j.study_uid, j.state, j.kind) for j in jobs] == [(STUDY, "pending", "classify")]
    assert study is not None and study.state == "complete"
    assert study.completion_reason == "both_views" and study.completed_at == T0
    with pytest.raises(ValueError):
        mark_complete(db, STUDY, "because")


def test_studies_due_quiet(db: Database) -> None:
    record_instance(db, rec("1.1"), now=T0)
    record_instance(db, rec("2.1", study="2.2"), now=T0 + timedelta(seconds=50))
    record_instance(db, rec("3.1", study="3.3"), now=T0)
    mark_complete(db, "3.3", "manual", now=T0)
    now = T0 + timedelta(seconds=60)
    assert studies_due_quiet(db, 30, now=now) == [STUDY]
    assert studies_due_quiet(db, 5, now=now) == [STUDY, "2.2"]
    assert studies_due_quiet(db, 120, now=now) == []


# --- classify jobs -------------------------------------------------------------------------


def test_claim_finish_cycle(db: Database) -> None:
    assert claim_job(db, "w0", now=T0) is None
    record_instance(db, rec("1.1"), now=T0)
    mark_complete(db, STUDY, "quiet", now=T0)
    job = claim_job(db, "w0", now=T0)
    assert job is not None and job.study_uid == STUDY and job.attempts == 1
    assert claim_job(db, "w1", now=T0) is None
    assert study_summaries(db)[0].state == "classifying"
    assert queue_depth(db)["claimed_jobs"] == 1
    finish_job(db, job.job_id, ok=False, error="ValueError: no views", now=T0)
    assert study_summaries(db)[0].state == "failed"
    with db.session() as s:
        row = s.get(Job, job.job_id)
        assert row is not None and row.state == "failed" and row.error == "ValueError: no views"
    with pytest.raises(LookupError):
        finish_job(db, 999, ok=True)


def test_threads_never_claim_the_same_job(db: Database) -> None:
    ids = seed_jobs(db, 200)
    barrier = threading.Barrier(4)
    claimed: dict[str, list[int]] = {f"t{i}": [] for i in range(4)}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            barrier.wait(timeout=10)
            while (job := claim_job(db, name)) is not None:
                claimed[name].append(job.job_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    counts = Counter(j for got in claimed.values() for j in got)
    assert sorted(counts) == ids and set(counts.values()) == {1}
    _assert_claims_match(db, claimed)


def _claim_all(url: str, worker_id: str, barrier: Any,
               out: mp.Queue[tuple[str, list[int]]]) -> None:
    """Child process: its own engine on the shared file, claim until the queue is empty."""
    db = Database(url)
    try:
        barrier.wait(timeout=60)
        got: list[int] = []
        while (job := claim_job(db, worker_id)) is not None:
            got.append(job.job_id)
        out.put((worker_id, got))
    finally:
        db.dispose()


def test_processes_never_claim_the_same_job(db: Database, db_url: str) -> None:
    ids = seed_jobs(db, 100)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    out: mp.Queue[tuple[str, list[int]]] = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(db_url, f"p{i}", barrier, out))
             for i in range(2)]
    for p in procs:
        p.start()
    claimed = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    counts = Counter(j for got in claimed.values() for j in got)
    assert sorted(counts) == ids and set(counts.values()) == {1}
    _assert_claims_match(db, claimed)


def _assert_claims_match(db: Database, claimed: dict[str, list[int]]) -> None:
    """The database agrees with what each worker was told: one claim per job, one try."""
    with db.session() as s:
        rows = {j.id: j for j in s.execute(select(Job)).scalars()}
    for name, got in claimed.items():
        assert all(rows[j].claimed_by == name and rows[j].state == "claimed" for j in got)
    assert {j.attempts for j in rows.values()} == {1}


def test_release_stale_claims(db: Database) -> None:
    seed_jobs(db, 3)
    a = claim_job(db, "host:NODE:w0", now=T0)
    b = claim_job(db, "host:NODE2:w0", now=T0)
    c = claim_job(db, "host:NODE", now=T0)
    assert a and b and c
    # this node's restart: only its own claims (not NODE2's, despite the common prefix)
    assert release_stale_claims(db, 0.0, now=T0, prefix="host:NODE") == 2
    with db.session() as s:
        study = s.get(Study, a.study_uid)
        assert study is not None and study.state == "complete"
    assert release_stale_claims(db, 600, now=T0 + timedelta(seconds=100)) == 0
    assert release_stale_claims(db, 600, now=T0 + timedelta(seconds=700)) == 1
    again = claim_job(db, "host:NODE:w1", now=T0)
    assert again is not None and again.job_id == a.job_id and again.attempts == 2
    assert queue_depth(db)["pending_jobs"] == 2


def test_heartbeat_renews_a_lease_and_its_absence_frees_the_job(db: Database) -> None:
    seed_jobs(db, 2)
    mine = claim_job(db, "hostA:NODE:worker11:w0", now=T0)
    theirs = claim_job(db, "hostB:NODE:worker12:w0", now=T0)
    assert mine and theirs
    beat = T0 + timedelta(seconds=50)
    assert jobs.renew_claims(db, "hostA:NODE:worker11", now=beat) == 1  # only our own
    # at T0+70 the silent worker's lease (60 s) ran out, the beating one's has not
    assert release_stale_claims(db, 60, now=T0 + timedelta(seconds=70)) == 1
    with db.session() as s:
        kept, freed = s.get(Job, mine.job_id), s.get(Job, theirs.job_id)
        assert kept is not None and kept.state == "claimed" and kept.heartbeat_at == beat
        assert freed is not None and freed.state == "pending" and freed.claimed_by is None
        assert freed.heartbeat_at is None
    # the dead worker's heartbeat is no longer anyone's: renewing it claims nothing back
    assert jobs.renew_claims(db, "hostB:NODE:worker12", now=beat) == 0
    taken = claim_job(db, "hostC:NODE:worker13:w0", now=T0 + timedelta(seconds=71))
    assert taken is not None and taken.job_id == theirs.job_id and taken.attempts == 2
    assert release_stale_claims(db, 60, now=T0 + timedelta(seconds=111)) == 1  # mine, now


def test_a_worker_presumed_dead_stores_no_second_result(db: Database) -> None:
    """The first worker's lease ran out, a second took the study and finished; the first
    finishes after all, with another SR UID (a newer model): one result, one export."""
    record_instance(db, rec("1.1", ("anterior", "posterior")), now=T0)
    assert mark_complete(db, STUDY, "both_views", now=T0)
    slow = claim_job(db, "w-slow", now=T0)
    assert slow is not None
    assert release_stale_claims(db, 60, now=T0 + timedelta(seconds=61)) == 1
    fast = claim_job(db, "w-fast", now=T0 + timedelta(seconds=61))
    assert fast is not None and fast.job_id == slow.job_id
    first = store_result(db, new_result(fast.job_id, "2.25.10"), DEST, now=T0)
    assert store_result(db, new_result(slow.job_id, "2.25.11"), DEST, now=T0) == first
    with db.session() as s:
        assert s.execute(select(func.count()).select_from(Export)).scalar_one() == 1
        assert s.execute(select(func.count()).select_from(jobs.Result)).scalar_one() == 1
    assert study_summaries(db)[0].state == "classified"


def test_export_lease_renewed_by_its_sender_only(db: Database) -> None:
    export_id = export_id_ready(db)
    assert claim_export(db, "hostA:NODE:worker11:x0", now=T0) is not None
    beat = T0 + timedelta(seconds=50)
    assert renew_export_claims(db, "hostB:NODE:worker12", now=beat) == 0
    assert renew_export_claims(db, "hostA:NODE:worker11", now=beat) == 1
    assert release_stale_exports(db, 60, now=T0 + timedelta(seconds=70)) == 0
    assert release_stale_exports(db, 60, now=beat + timedelta(seconds=61)) == 1
    x = claim_export(db, "hostB:NODE:worker12:x0", now=beat + timedelta(seconds=61))
    assert x is not None and x.export_id == export_id and x.attempts == 2


# --- results and exports -------------------------------------------------------------------


def test_store_result_never_duplicates_an_export(db: Database) -> None:
    job_id = classified_study(db)
    first = store_result(db, new_result(job_id), DEST, now=T0)
    assert store_result(db, new_result(job_id), DEST, now=T0) == first
    result_id, other_export = store_result(db, new_result(job_id), "BACKUP@10.0.0.2:104")
    assert result_id == first[0] and other_export != first[1]
    with db.session() as s:
        assert s.execute(select(func.count()).select_from(Export)).scalar_one() == 2
    summary = study_summaries(db)[0]
    assert summary.predicted_class == "normal" and summary.model_version == "v1"
    assert summary.export_state == "pending"


def test_export_retry_dead_requeue_cycle(db: Database) -> None:
    export_id = export_id_ready(db)
    x = claim_export(db, "x0", now=T0)
    assert x is not None and x.export_id == export_id and x.attempts == 1
    assert x.sr_path == "/sr/2.25.1.dcm" and x.destination == DEST and x.study_uid == STUDY
    assert claim_export(db, "x1", now=T0) is None  # sending: nobody else gets it
    retry = T0 + timedelta(seconds=10)
    export_failed(db, export_id, "association rejected", None, retry, now=T0)
    assert claim_export(db, "x0", now=T0 + timedelta(seconds=5)) is None  # not due yet
    summary = study_summaries(db)[0]
    assert summary.export_state == "pending" and summary.export_attempts == 1
    assert summary.next_attempt_at == retry and summary.last_error == "association rejected"
    x = claim_export(db, "x0", now=retry)
    assert x is not None and x.attempts == 2
    export_failed(db, export_id, "status 0xA900", 0xA900, None, now=retry)
    assert queue_depth(db)["dead_exports"] == 1
    assert claim_export(db, "x0", now=retry + timedelta(days=1)) is None  # dead stays dead
    assert requeue_dead_exports(db, now=retry) == 1
    assert requeue_dead_exports(db, now=retry) == 0
    x = claim_export(db, "x0", now=retry)
    assert x is not None and x.attempts == 1  # fresh budget after a manual resend
    export_succeeded(db, export_id, 0x0000, now=retry + timedelta(seconds=1))
    summary = study_summaries(db)[0]
    assert summary.export_state == "done" and summary.acked_at == retry + timedelta(seconds=1)
    assert summary.last_error is None
    export_failed(db, export_id, "late failure from a stale sender", None, None)
    assert study_summaries(db)[0].export_state == "done"  # delivered stays delivered
    with pytest.raises(LookupError):
        export_succeeded(db, 999, 0)
    with pytest.raises(LookupError):
        export_failed(db, 999, "x", None, None)


def test_release_stale_exports(db: Database) -> None:
    export_id = export_id_ready(db)
    assert claim_export(db, "host:NODE:x0", now=T0) is not None
    assert release_stale_exports(db, 0.0, now=T0, prefix="host:OTHER") == 0
    assert release_stale_exports(db, 600, now=T0 + timedelta(seconds=10)) == 0
    assert release_stale_exports(db, 0.0, now=T0, prefix="host:NODE") == 1
    x = claim_export(db, "host:NODE:x1", now=T0)
    assert x is not None and x.export_id == export_id and x.attempts == 2


def test_queue_depth_counts(db: Database) -> None:
    assert queue_depth(db) == {"pending_jobs": 0, "claimed_jobs": 0, "pending_exports": 0,
                               "sending_exports": 0, "dead_exports": 0,
                               "receiving_studies": 0}
    record_instance(db, rec("1.1", study="5.5"), now=T0)
    export_id_ready(db)
    depth = queue_depth(db)
    assert depth["receiving_studies"] == 1 and depth["pending_exports"] == 1
    assert depth["pending_jobs"] == 0


def test_study_summaries_newest_first(db: Database) -> None:
    record_instance(db, rec("1.1"), now=T0)
    record_instance(db, rec("2.1", study="2.2"), now=T0 + timedelta(hours=1))
    assert [s.study_uid for s in study_summaries(db)] == ["2.2", STUDY]
    assert [s.study_uid for s in study_summaries(db, limit=1)] == ["2.2"]
    assert study_summaries(db)[1].export_state is None


def test_study_summaries_carry_enums(db: Database) -> None:
    """States cross into node/ as enums (still equal to their stored strings)."""
    export_id_ready(db)
    record_instance(db, rec("2.1", study="2.2"), now=T0 + timedelta(hours=1))
    fresh, done = study_summaries(db)
    assert fresh.state is StudyState.RECEIVING and fresh.completion_reason is None
    assert fresh.export_state is None
    assert done.state is StudyState.CLASSIFIED
    assert done.completion_reason is CompletionReason.BOTH_VIEWS
    assert done.export_state is ExportState.PENDING and done.export_state == "pending"


def test_work_backlog(db: Database) -> None:
    assert work_backlog(db) == WorkBacklog(0, None, None, 0, None)
    export_id = export_id_ready(db)
    record_instance(db, rec("3.1", study="3.3"), now=T0)
    assert mark_complete(db, "3.3", CompletionReason.QUIET, now=T0 + timedelta(minutes=1))
    work = work_backlog(db)
    assert work.oldest_pending_export_at == T0 and work.exports_retrying == 0
    assert work.oldest_pending_job_at == T0 + timedelta(minutes=1)
    assert claim_export(db, "x0", now=T0) is not None
    export_failed(db, export_id, "association rejected", None, T0 + timedelta(seconds=9),
                  now=T0)
    work = work_backlog(db)
    assert work.exports_retrying == 1 and work.last_export_error == "association rejected"
    job = claim_job(db, "w", now=T0)
    assert job is not None
    finish_job(db, job.job_id, ok=False, error="ValueError", now=T0)
    work = work_backlog(db)
    assert work.failed_studies == 1 and work.oldest_pending_job_at is None


def test_study_patient_keys(db: Database) -> None:
    assert study_patient_keys(db) == {}
    record_instance(db, rec("1.1"), now=T0)
    record_instance(db, rec("2.1", study="2.2", patient_key=None), now=T0)
    assert study_patient_keys(db) == {STUDY: "pk-1", "2.2": None}


def test_retention_queries(db: Database) -> None:
    """Only a delivered study is purgeable; after the purge its old rows are gone."""
    export_id = export_id_ready(db)
    cutoff = T0 + timedelta(days=1)
    assert purgeable_studies(db, cutoff, 10) == []  # export still pending
    assert claim_export(db, "x0", now=T0) is not None
    export_succeeded(db, export_id, 0, now=T0 + timedelta(seconds=1))
    assert purgeable_studies(db, T0, 10) == []  # touched after the cutoff
    assert purgeable_studies(db, cutoff, 10) == [STUDY]
    assert purgeable_studies(db, cutoff, 0) == []
    found = purge_candidates(db, STUDY, cutoff)
    assert sorted(found.instances) == [("1.1", "/data/1.1.dcm"), ("1.2", "/data/1.2.dcm")]
    assert found.sr_paths == ("/sr/2.25.1.dcm",)
    assert purge_candidates(db, STUDY, T0).instances == ()
    record_purge(db, STUDY, ["1.1", "1.2"], cutoff, 3, 3000, when=cutoff)
    assert study_instances(db, STUDY) == []
    assert purgeable_studies(db, cutoff + timedelta(days=1), 10) == []
    record_purge(db, STUDY, [], cutoff, 1, 500, when=cutoff + timedelta(days=1))
    with db.read_session() as s:
        row = s.get(Purge, STUDY)
        assert row is not None and (row.files, row.size_bytes) == (4, 3500)
        assert row.purged_at == cutoff + timedelta(days=1)


def test_instance_rows_cascade_nowhere(db: Database) -> None:
    """Foreign keys are on: an instance cannot point at a study that does not exist."""
    with pytest.raises(IntegrityError), db.session() as s, s.begin():
        s.add(Instance(sop_uid="1.9", study_uid="404", series_uid="1", sop_class_uid="1",
                       transfer_syntax_uid="1", path="/x", views="", n_frames=0, size_bytes=0,
                       received_at=T0, calling_ae="A", late=False))
