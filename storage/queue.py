"""Queue operations: instances in, classify jobs, results, SR exports.

Each function is one short transaction and returns plain frozen dataclasses, so callers
never hold ORM objects (no lazy loads on a closed session, nothing shared between threads).
Claims are single ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED) AND
state = 'pending' RETURNING`` statements: on SQLite they run inside ``BEGIN IMMEDIATE``
(``FOR UPDATE`` is not rendered there), on PostgreSQL the row lock plus ``SKIP LOCKED``
keeps concurrent workers on different rows. Either way a job is claimed exactly once.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    CursorResult,
    Table,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy import Result as SAResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import UpdateBase

from storage.db import (
    CompletionReason,
    Database,
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    Result,
    Study,
    StudyState,
)
from storage.filestore import validate_uid

log = logging.getLogger(__name__)

T = TypeVar("T")
CLASSIFY = "classify"
ANTERIOR = "anterior"
POSTERIOR = "posterior"
LATE_STATES = frozenset({StudyState.CLASSIFYING, StudyState.CLASSIFIED, StudyState.FAILED})
INTEGRITY_RETRIES = 5
_NO_SYNC = {"synchronize_session": False}


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP knows about one received instance (no patient data but an opaque key)."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    views: tuple[str, ...]
    n_frames: int
    size_bytes: int
    calling_ae: str
    patient_key: str | None


@dataclass(frozen=True)
class RecordOutcome:
    """What happened to an instance, so the SCP can answer and trigger completion."""

    new_study: bool
    duplicate: bool
    late: bool
    study_state: StudyState
    has_anterior: bool
    has_posterior: bool
    patient_mismatch: bool


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now owns."""

    job_id: int
    study_uid: str
    attempts: int


@dataclass(frozen=True)
class InstanceInfo:
    """An instance as the worker needs it."""

    sop_uid: str
    series_uid: str
    sop_class_uid: str
    path: str
    views: tuple[str, ...]
    n_frames: int
    late: bool


@dataclass(frozen=True)
class NewResult:
    """A classification ready to be stored with its SR."""

    study_uid: str
    job_id: int | None
    model_version: str
    model_sha256: str
    predicted_class: str
    probabilities: Mapping[str, float]
    per_view: Mapping[str, Mapping[str, float]]
    sr_sop_uid: str
    sr_series_uid: str
    sr_path: str
    note: str | None = None


@dataclass(frozen=True)
class ClaimedExport:
    """An SR delivery this exporter now owns; ``attempts`` includes this one."""

    export_id: int
    result_id: int
    study_uid: str
    sr_sop_uid: str
    sr_path: str
    destination: str
    attempts: int


@dataclass(frozen=True)
class StudySummary:
    """One line of ``python -m node status``: the study, its latest result and export."""

    study_uid: str
    state: str
    instance_count: int
    late_instance_count: int
    views: str
    completion_reason: str | None
    predicted_class: str | None
    model_version: str | None
    export_state: str | None
    export_attempts: int | None
    next_attempt_at: datetime | None
    last_error: str | None
    last_instance_at: datetime
    acked_at: datetime | None
    first_seen_at: datetime
    completed_at: datetime | None


# --- helpers -------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    """Aware UTC now, or the caller's aware clock (tests, one timestamp per operation)."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("naive datetime; pass an aware UTC time")
    return now


def _rowcount(result: SAResult[Any]) -> int:
    """Rows touched by an UPDATE (Session.execute is typed as the generic Result)."""
    return cast(CursorResult[Any], result).rowcount


def _retry_on_conflict(fn: Callable[[], T], what: str) -> T:
    """Run a transaction again when a concurrent insert won the race for a unique key.

    On SQLite writers are serialised by BEGIN IMMEDIATE so this never fires; on PostgreSQL
    two first instances of one study can both try to insert the study row.
    """
    for _ in range(INTEGRITY_RETRIES - 1):
        try:
            return fn()
        except IntegrityError:
            log.info("%s: concurrent insert of the same key, retrying", what)
    return fn()


def _owned_by(column: Any, prefix: str) -> ColumnElement[bool]:
    """Claims of one node: ``prefix`` itself or ``prefix:<anything>`` (LIKE-escaped)."""
    return cast(ColumnElement[bool],
                or_(column == prefix, column.startswith(f"{prefix}:", autoescape=True)))


def _join_views(views: Iterable[str]) -> str:
    """Views as stored: comma-joined, so a view name must not contain a comma."""
    views = tuple(views)
    if any("," in v for v in views):
        raise ValueError("view names must not contain commas")
    return ",".join(views)


def _split_views(views: str) -> tuple[str, ...]:
    return tuple(v for v in views.split(",") if v)


# --- instances and studies -----------------------------------------------------------------


def record_instance(db: Database, rec: InstanceRecord, now: datetime | None = None
                    ) -> RecordOutcome:
    """Record a durably written instance; commit before the SCP answers Success.

    Re-sent SOP UIDs update their row, instances of an already classified study are kept
    and flagged late, and a study UID reused for another patient is refused (nothing
    inserted, ``patient_mismatch``) so two patients' images never merge.
    """
    when = _now(now)
    views = _join_views(rec.views)
    for uid in (rec.sop_uid, rec.study_uid, rec.series_uid, rec.sop_class_uid,
                rec.transfer_syntax_uid):
        validate_uid(uid)  # same refusal on SQLite as PostgreSQL's VARCHAR(64) would give

    def attempt() -> RecordOutcome:
        with db.session() as s, s.begin():
            return _record(s, rec, views, when)

    return _retry_on_conflict(attempt, "record_instance")


def _record(s: Session, rec: InstanceRecord, views: str, when: datetime) -> RecordOutcome:
    """Prepared Core statements on the session's connection: building ORM statements and
    their cache keys anew cost ~1.5 ms of Python per C-STORE, more than the SQL itself."""
    conn = s.connection()
    row = conn.execute(_SELECT_STUDY, {"study_uid": rec.study_uid}).one_or_none()
    if row is None:
        conn.execute(_INSERT_STUDY, {  # now, so a racing insert fails here (and is retried)
            "study_uid": rec.study_uid, "state": StudyState.RECEIVING.value,
            "first_seen_at": when, "last_instance_at": when, "completed_at": None,
            "completion_reason": None, "has_anterior": False, "has_posterior": False,
            "instance_count": 0, "late_instance_count": 0, "patient_key": rec.patient_key,
            "calling_ae": rec.calling_ae})
        state, key, ant, post, last = StudyState.RECEIVING.value, rec.patient_key, False, \
            False, when
    else:
        state, key, ant, post, last = row
        if _patient_mismatch(key, rec.patient_key):
            log.warning("study %s: instance %s belongs to another patient; not recorded",
                        rec.study_uid, rec.sop_uid)
            return RecordOutcome(new_study=False, duplicate=False, late=False,
                                 study_state=StudyState(state),
                                 has_anterior=ant, has_posterior=post, patient_mismatch=True)
    existing = conn.execute(_SELECT_INSTANCE, {"sop_uid": rec.sop_uid}).one_or_none()
    if existing is not None and existing.study_uid == rec.study_uid:
        late, added = bool(existing.late), 0  # a re-send keeps its original late flag
    else:
        if existing is not None:
            _detach_from_study(conn, rec.sop_uid, existing.study_uid, bool(existing.late))
        late, added = StudyState(state) in LATE_STATES, 1
    fields = {"study_uid": rec.study_uid, "series_uid": rec.series_uid,
              "sop_class_uid": rec.sop_class_uid, "transfer_syntax_uid": rec.transfer_syntax_uid,
              "path": rec.path, "views": views, "n_frames": rec.n_frames,
              "size_bytes": rec.size_bytes, "received_at": when, "calling_ae": rec.calling_ae,
              "late": late}
    if existing is None:
        conn.execute(_INSERT_INSTANCE, {"sop_uid": rec.sop_uid, **fields})
    else:
        conn.execute(_UPDATE_INSTANCE, {"b_sop_uid": rec.sop_uid, **fields})
    ant, post = ant or ANTERIOR in rec.views, post or POSTERIOR in rec.views
    conn.execute(_UPDATE_STUDY, {
        "b_study_uid": rec.study_uid, "b_added": added, "b_late_added": int(late and added),
        "b_ant": ant, "b_post": post, "b_last": max(last, when),
        "b_key": rec.patient_key if key is None else key})  # the first known key binds it
    return RecordOutcome(new_study=row is None, duplicate=existing is not None, late=late,
                         study_state=StudyState(state), has_anterior=ant,
                         has_posterior=post, patient_mismatch=False)


_STUDIES = cast(Table, Study.__table__)
_INSTANCES = cast(Table, Instance.__table__)
# built once (immutable): only parameters change per C-STORE
_SELECT_STUDY = select(_STUDIES.c.state, _STUDIES.c.patient_key, _STUDIES.c.has_anterior,
                       _STUDIES.c.has_posterior, _STUDIES.c.last_instance_at
                       ).where(_STUDIES.c.study_uid == bindparam("study_uid")).with_for_update()
_INSERT_STUDY = insert(_STUDIES)
_SELECT_INSTANCE = select(_INSTANCES.c.study_uid, _INSTANCES.c.late).where(
    _INSTANCES.c.sop_uid == bindparam("sop_uid")).with_for_update()
_INSERT_INSTANCE = insert(_INSTANCES)
_UPDATE_INSTANCE = update(_INSTANCES).where(_INSTANCES.c.sop_uid == bindparam("b_sop_uid"))
_UPDATE_STUDY = update(_STUDIES).where(_STUDIES.c.study_uid == bindparam("b_study_uid")).values(
    instance_count=_STUDIES.c.instance_count + bindparam("b_added"),
    late_instance_count=_STUDIES.c.late_instance_count + bindparam("b_late_added"),
    has_anterior=bindparam("b_ant"), has_posterior=bindparam("b_post"),
    last_instance_at=bindparam("b_last"), patient_key=bindparam("b_key"))


def _patient_mismatch(stored: str | None, incoming: str | None) -> bool:
    """The one patient rule: only two known, different keys are a conflict."""
    return stored is not None and incoming is not None and stored != incoming


def patient_conflict(db: Database, study_uid: str, patient_key: str | None) -> bool:
    """Would an instance of this patient conflict with the study as stored? The receiver asks
    before a re-sent SOP's file is replaced; record_instance asks again under the row lock."""
    with db.read_session() as s:
        stored = s.execute(select(Study.patient_key).where(Study.study_uid == study_uid)
                           ).scalar_one_or_none()
    return _patient_mismatch(stored, patient_key)


def _detach_from_study(conn: Connection, sop_uid: str, old_study: str, was_late: bool) -> None:
    """A SOP UID re-sent under another study: take it off the old study's counts and views."""
    log.warning("SOP %s re-sent under study different from %s; moving it", sop_uid, old_study)
    conn.execute(_SELECT_STUDY, {"study_uid": old_study}).one()  # lock its row first, as before
    others = conn.execute(select(Instance.views).where(Instance.study_uid == old_study,
                                                       Instance.sop_uid != sop_uid)
                          ).scalars().all()
    present = {v for row in others for v in _split_views(row)}
    conn.execute(update(Study).where(Study.study_uid == old_study).values(
        instance_count=Study.instance_count - 1,
        late_instance_count=Study.late_instance_count - int(was_late),
        has_anterior=ANTERIOR in present, has_posterior=POSTERIOR in present))


def mark_complete(db: Database, study_uid: str, reason: CompletionReason,
                  now: datetime | None = None) -> bool:
    """receiving -> complete plus one pending classify job; False if not receiving.

    The conditional UPDATE makes the transition happen once even when the SCP and the
    quiet sweep race, so exactly one job is created.
    """
    when = _now(now)
    with db.session() as s, s.begin():
        res = s.execute(update(Study)
                        .where(Study.study_uid == study_uid,
                               Study.state == StudyState.RECEIVING.value)
                        .values(state=StudyState.COMPLETE.value, completed_at=when,
                                completion_reason=CompletionReason(reason).value)
                        .execution_options(**_NO_SYNC))
        if _rowcount(res) != 1:
            return False
        s.add(Job(study_uid=study_uid, kind=CLASSIFY, state=JobState.PENDING.value,
                  attempts=0, created_at=when))
    return True


def studies_due_quiet(db: Database, quiet_seconds: float, now: datetime | None = None
                      ) -> list[str]:
    """Receiving studies with no new instance for ``quiet_seconds`` (oldest first)."""
    cutoff = _now(now) - timedelta(seconds=quiet_seconds)
    with db.read_session() as s:
        return list(s.execute(
            select(Study.study_uid)
            .where(Study.state == StudyState.RECEIVING.value, Study.last_instance_at < cutoff)
            .order_by(Study.last_instance_at, Study.study_uid)).scalars())


def study_instances(db: Database, study_uid: str) -> list[InstanceInfo]:
    """A study's instances in arrival order, late ones included (flagged)."""
    with db.read_session() as s:
        rows = s.execute(select(Instance).where(Instance.study_uid == study_uid)
                         .order_by(Instance.received_at, Instance.sop_uid)).scalars().all()
        return [InstanceInfo(sop_uid=i.sop_uid, series_uid=i.series_uid,
                             sop_class_uid=i.sop_class_uid, path=i.path,
                             views=_split_views(i.views), n_frames=i.n_frames, late=i.late)
                for i in rows]


# --- classify jobs -------------------------------------------------------------------------


def claim_job(db: Database, worker_id: str, kind: str = CLASSIFY,
              now: datetime | None = None) -> ClaimedJob | None:
    """Atomically take the oldest pending job; the study becomes ``classifying``."""
    with db.session() as s, s.begin():
        row = s.execute(_job_claim_stmt(worker_id, kind, _now(now))).one_or_none()
        if row is None:
            return None
        s.execute(update(Study).where(Study.study_uid == row.study_uid)
                  .values(state=StudyState.CLASSIFYING.value).execution_options(**_NO_SYNC))
    return ClaimedJob(job_id=row.id, study_uid=row.study_uid, attempts=row.attempts)


def _job_claim_stmt(worker_id: str, kind: str, when: datetime) -> UpdateBase:
    """One statement that picks and claims: re-checking ``state`` makes a lost race a no-op."""
    pick = (select(Job.id).where(Job.state == JobState.PENDING.value, Job.kind == kind)
            .order_by(Job.id).limit(1).with_for_update(skip_locked=True).scalar_subquery())
    return (update(Job).where(Job.id == pick, Job.state == JobState.PENDING.value)
            .values(state=JobState.CLAIMED.value, claimed_by=worker_id, claimed_at=when,
                    attempts=Job.attempts + 1)
            .returning(Job.id, Job.study_uid, Job.attempts).execution_options(**_NO_SYNC))


def release_stale_claims(db: Database, older_than_seconds: float,
                         now: datetime | None = None, prefix: str | None = None) -> int:
    """Give claims of dead workers back to the queue; returns how many.

    With ``older_than_seconds=0`` and this node's ``prefix`` it re-queues everything the
    node had claimed before a restart; without a prefix it frees any claim older than the
    threshold (a crashed peer's).
    """
    cutoff = _now(now) - timedelta(seconds=older_than_seconds)
    conds = [Job.state == JobState.CLAIMED.value, Job.claimed_at <= cutoff]
    if prefix is not None:
        conds.append(_owned_by(Job.claimed_by, prefix))
    with db.session() as s, s.begin():
        studies = s.execute(update(Job).where(*conds)
                            .values(state=JobState.PENDING.value, claimed_by=None,
                                    claimed_at=None)
                            .returning(Job.study_uid).execution_options(**_NO_SYNC)
                            ).scalars().all()
        if studies:
            s.execute(update(Study).where(Study.study_uid.in_(sorted(set(studies))),
                                          Study.state == StudyState.CLASSIFYING.value)
                      .values(state=StudyState.COMPLETE.value).execution_options(**_NO_SYNC))
    if studies:
        log.warning("released %d stale job claim(s)", len(studies))
    return len(studies)


def finish_job(db: Database, job_id: int, ok: bool, error: str | None = None,
               now: datetime | None = None) -> None:
    """Close a job and move its study to ``classified`` or ``failed``."""
    when = _now(now)
    job_state, study_state = (JobState.DONE, StudyState.CLASSIFIED) if ok \
        else (JobState.FAILED, StudyState.FAILED)
    with db.session() as s, s.begin():
        study_uid = s.execute(update(Job).where(Job.id == job_id)
                              .values(state=job_state.value, finished_at=when, error=error)
                              .returning(Job.study_uid).execution_options(**_NO_SYNC)
                              ).scalar_one_or_none()
        if study_uid is None:
            raise LookupError(f"no job with id {job_id}")
        s.execute(update(Study).where(Study.study_uid == study_uid)
                  .values(state=study_state.value).execution_options(**_NO_SYNC))


# --- results and exports -------------------------------------------------------------------


def store_result(db: Database, r: NewResult, destination: str, now: datetime | None = None
                 ) -> tuple[int, int]:
    """Result and its pending export in one transaction: a stored result is never unsent.

    Idempotent per SR: a result with the same SR SOP UID is reused, and an export to the
    same destination is never created twice.
    """
    when = _now(now)

    def attempt() -> tuple[int, int]:
        with db.session() as s, s.begin():
            result_id = _ensure_result(s, r, when)
            return result_id, _ensure_export(s, r, result_id, destination, when)

    return _retry_on_conflict(attempt, "store_result")


def _ensure_result(s: Session, r: NewResult, when: datetime) -> int:
    existing = s.execute(select(Result.id).where(Result.sr_sop_uid == r.sr_sop_uid)
                         .order_by(Result.id).limit(1)).scalar_one_or_none()
    if existing is not None:
        return existing
    row = Result(study_uid=r.study_uid, job_id=r.job_id, model_version=r.model_version,
                 model_sha256=r.model_sha256, predicted_class=r.predicted_class,
                 probabilities=json.dumps(dict(r.probabilities), sort_keys=True),
                 per_view=json.dumps({k: dict(v) for k, v in r.per_view.items()},
                                     sort_keys=True),
                 sr_sop_uid=r.sr_sop_uid, sr_series_uid=r.sr_series_uid, sr_path=r.sr_path,
                 created_at=when, note=r.note)
    s.add(row)
    s.flush()
    return row.id


def _ensure_export(s: Session, r: NewResult, result_id: int, destination: str,
                   when: datetime) -> int:
    existing = s.execute(select(Export.id).where(Export.sr_sop_uid == r.sr_sop_uid,
                                                 Export.destination == destination)
                         ).scalar_one_or_none()
    if existing is not None:
        return existing
    row = Export(result_id=result_id, study_uid=r.study_uid, sr_sop_uid=r.sr_sop_uid,
                 destination=destination, state=ExportState.PENDING.value, attempts=0,
                 next_attempt_at=when, created_at=when)
    s.add(row)
    s.flush()
    return row.id


def claim_export(db: Database, worker_id: str, now: datetime | None = None
                 ) -> ClaimedExport | None:
    """Atomically take the most overdue pending export; ``attempts`` counts this try."""
    when = _now(now)
    pick = (select(Export.id)
            .where(Export.state == ExportState.PENDING.value, Export.next_attempt_at <= when)
            .order_by(Export.next_attempt_at, Export.id).limit(1)
            .with_for_update(skip_locked=True).scalar_subquery())
    stmt = (update(Export).where(Export.id == pick,
                                 Export.state == ExportState.PENDING.value)
            .values(state=ExportState.SENDING.value, claimed_by=worker_id, claimed_at=when,
                    attempts=Export.attempts + 1)
            .returning(Export.id, Export.result_id, Export.study_uid, Export.sr_sop_uid,
                       Export.destination, Export.attempts)
            .execution_options(**_NO_SYNC))
    with db.session() as s, s.begin():
        row = s.execute(stmt).one_or_none()
        if row is None:
            return None
        sr_path = s.execute(select(Result.sr_path).where(Result.id == row.result_id)
                            ).scalar_one()
    return ClaimedExport(export_id=row.id, result_id=row.result_id, study_uid=row.study_uid,
                         sr_sop_uid=row.sr_sop_uid, sr_path=sr_path,
                         destination=row.destination, attempts=row.attempts)


def export_succeeded(db: Database, export_id: int, status: int, now: datetime | None = None
                     ) -> None:
    """The destination acknowledged the SR: done for good."""
    when = _now(now)
    with db.session() as s, s.begin():
        res = s.execute(update(Export).where(Export.id == export_id)
                        .values(state=ExportState.DONE.value, acked_at=when, last_status=status,
                                last_error=None, claimed_by=None, claimed_at=None)
                        .execution_options(**_NO_SYNC))
        if _rowcount(res) != 1:
            raise LookupError(f"no export with id {export_id}")


def export_failed(db: Database, export_id: int, error: str, status: int | None,
                  retry_at: datetime | None, now: datetime | None = None) -> None:
    """Not delivered: pending again at ``retry_at``, or dead-lettered when it is None.

    An export another exporter meanwhile delivered stays done (no second send).
    """
    _now(now)  # validated for a uniform signature; a failure stamps nothing
    values: dict[str, Any] = dict(last_error=error, last_status=status, claimed_by=None,
                                  claimed_at=None)
    if retry_at is None:
        values["state"] = ExportState.DEAD.value
    else:
        values.update(state=ExportState.PENDING.value, next_attempt_at=_now(retry_at))
    with db.session() as s, s.begin():
        res = s.execute(update(Export).where(Export.id == export_id,
                                             Export.state != ExportState.DONE.value)
                        .values(**values).execution_options(**_NO_SYNC))
        if _rowcount(res) == 1:
            return
        if s.get(Export, export_id) is None:
            raise LookupError(f"no export with id {export_id}")
    log.info("export %d failed on one path but was already delivered", export_id)


def requeue_dead_exports(db: Database, now: datetime | None = None) -> int:
    """Admin resend: every dead export is pending again with a fresh attempt budget."""
    when = _now(now)
    with db.session() as s, s.begin():
        res = s.execute(update(Export).where(Export.state == ExportState.DEAD.value)
                        .values(state=ExportState.PENDING.value, attempts=0,
                                next_attempt_at=when, claimed_by=None, claimed_at=None)
                        .execution_options(**_NO_SYNC))
        return _rowcount(res)


def release_stale_exports(db: Database, older_than_seconds: float,
                          now: datetime | None = None, prefix: str | None = None) -> int:
    """``sending`` rows left by a crash go back to pending, due now (attempts are kept)."""
    when = _now(now)
    conds = [Export.state == ExportState.SENDING.value,
             Export.claimed_at <= when - timedelta(seconds=older_than_seconds)]
    if prefix is not None:
        conds.append(_owned_by(Export.claimed_by, prefix))
    with db.session() as s, s.begin():
        n = _rowcount(s.execute(update(Export).where(*conds)
                                .values(state=ExportState.PENDING.value, next_attempt_at=when,
                                        claimed_by=None, claimed_at=None)
                                .execution_options(**_NO_SYNC)))
    if n:
        log.warning("released %d stale export claim(s)", n)
    return n


# --- reporting -----------------------------------------------------------------------------


def study_summaries(db: Database, limit: int | None = None) -> list[StudySummary]:
    """Newest studies first, each with its latest result and that result's latest export."""
    latest_result = (select(Result.study_uid, func.max(Result.id).label("rid"))
                     .group_by(Result.study_uid).subquery())
    latest_export = (select(Export.result_id, func.max(Export.id).label("eid"))
                     .group_by(Export.result_id).subquery())
    stmt = (select(Study, Result.predicted_class, Result.model_version, Export.state,
                   Export.attempts, Export.next_attempt_at, Export.last_error, Export.acked_at)
            .outerjoin(latest_result, latest_result.c.study_uid == Study.study_uid)
            .outerjoin(Result, Result.id == latest_result.c.rid)
            .outerjoin(latest_export, latest_export.c.result_id == Result.id)
            .outerjoin(Export, Export.id == latest_export.c.eid)
            .order_by(Study.first_seen_at.desc(), Study.study_uid).limit(limit))
    with db.read_session() as s:
        return [_summary(*row) for row in s.execute(stmt).all()]


def _summary(st: Study, predicted: str | None, model: str | None, export_state: str | None,
             attempts: int | None, next_at: datetime | None, error: str | None,
             acked: datetime | None) -> StudySummary:
    views = [v for v, present in ((ANTERIOR, st.has_anterior), (POSTERIOR, st.has_posterior))
             if present]
    return StudySummary(
        study_uid=st.study_uid, state=st.state, instance_count=st.instance_count,
        late_instance_count=st.late_instance_count, views=",".join(views),
        completion_reason=st.completion_reason, predicted_class=predicted,
        model_version=model, export_state=export_state, export_attempts=attempts,
        next_attempt_at=next_at, last_error=error, last_instance_at=st.last_instance_at,
        acked_at=acked, first_seen_at=st.first_seen_at, completed_at=st.completed_at)


def queue_depth(db: Database) -> dict[str, int]:
    """Counts an admin (or a health check) watches: backlog and dead letters."""
    with db.read_session() as s:
        jobs = {state: n for state, n in
                s.execute(select(Job.state, func.count()).group_by(Job.state))}
        exports = {state: n for state, n in
                   s.execute(select(Export.state, func.count()).group_by(Export.state))}
        receiving = s.execute(select(func.count()).select_from(Study)
                              .where(Study.state == StudyState.RECEIVING.value)).scalar_one()
    return {
        "pending_jobs": jobs.get(JobState.PENDING.value, 0),
        "claimed_jobs": jobs.get(JobState.CLAIMED.value, 0),
        "pending_exports": exports.get(ExportState.PENDING.value, 0),
        "sending_exports": exports.get(ExportState.SENDING.value, 0),
        "dead_exports": exports.get(ExportState.DEAD.value, 0),
        "receiving_studies": receiving,
    }


def backoff_delay(attempts: int, base_seconds: float, cap_seconds: float) -> float:
    """Seconds before retry number ``attempts + 1``: base * 2**(attempts-1), capped.

    Pure, never overflows, non-decreasing in ``attempts``; attempts <= 1 gives the base.
    """
    if not (base_seconds >= 0 and cap_seconds >= 0):  # also rejects NaN
        raise ValueError("backoff base and cap must be non-negative numbers")
    exponent = min(max(attempts - 1, 0), 1000)
    return min(cap_seconds, base_seconds * math.ldexp(1.0, exponent))
