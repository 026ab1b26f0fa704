"""Classify jobs: claim, retry later, release, finish, re-queue, and the result (with its
pending SR export); and the ``objects`` job that builds the result's other objects after it.

Claims are single ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED) AND
state = 'pending' RETURNING`` statements: on SQLite they run inside ``BEGIN IMMEDIATE``
(``FOR UPDATE`` is not rendered there), on PostgreSQL the row lock plus ``SKIP LOCKED``
keeps concurrent workers on different rows. Either way a job is claimed exactly once. A job
put back for a retry carries ``not_before``: it is not claimed before then.

A claim is a lease: ``heartbeat_at`` is stamped at the claim and renewed by the claiming
process's heartbeat (``renew_claims``) while it works; ``release_stale_claims`` gives a job
whose heartbeat stopped (its worker died, on any machine) back to the queue. A worker that
was presumed dead and finishes after all stores nothing new: the SR UID is deterministic per
study and model (one result row per SR), and a job already done keeps its one result.

The result image and the PDF report take longer to build than the classification (an evidence
map each study), so the SR does not wait for them: ``store_result`` commits the SR, its export
and an ``objects`` job (kind ``OBJECTS``, one active per study) together; a worker claims the
job, builds the objects of the study's latest result and ``store_objects`` queues their exports
and closes the job in one transaction. A crash in between leaves the job to be claimed again
(a claim of a dead worker is released as a classify job's is); the objects' UIDs and files
are deterministic, so a second build replaces the first and queues nothing twice. Objects jobs
never move the study's state (it stays ``classified``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import UpdateBase

from storage.common import CLASSIFY, NO_SYNC, owned_by, retry_on_conflict, rowcount, utc_now
from storage.db import Database, Export, ExportState, Job, JobState, Result, Study, StudyState
from storage.drift import StudyInputs, write_profile

log = logging.getLogger(__name__)

OBJECTS = "objects"  # job kind: build a result's image and PDF after its SR (node.classify)


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now owns."""

    job_id: int
    study_uid: str
    attempts: int


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
    # other objects of the result (the result image): (SOP Instance UID, file), one export each
    other_objects: tuple[tuple[str, str], ...] = ()
    # 1, or an amended result's version and the result it replaces (storage.amend)
    version: int = 1
    predecessor_id: int | None = None
    # the inputs' characteristics, profiled for drift (storage.drift); None: not profiled
    inputs: StudyInputs | None = None
    # other objects still to build (after the SR): an ``objects`` job queued with the result
    objects_pending: bool = False


@dataclass(frozen=True)
class FailedStudy:
    """A study whose classification failed for good, and why (redacted, no PHI)."""

    study_uid: str
    reason: str | None
    attempts: int
    failed_at: datetime | None


def claim_job(db: Database, worker_id: str, kind: str = CLASSIFY,
              now: datetime | None = None) -> ClaimedJob | None:
    """Atomically take the oldest pending job of `kind`; for a classify job the study
    becomes ``classifying`` (an objects job leaves it ``classified``)."""
    with db.session() as s, s.begin():
        row = s.execute(_job_claim_stmt(worker_id, kind, utc_now(now))).one_or_none()
        if row is None:
            return None
        if kind != CLASSIFY:
            return ClaimedJob(job_id=row.id, study_uid=row.study_uid, attempts=row.attempts)
        s.execute(update(Study).where(Study.study_uid == row.study_uid)
                  .values(state=StudyState.CLASSIFYING.value, amend_pending=False)
                  .execution_options(**NO_SYNC))  # this attempt reads every view in so far
    return ClaimedJob(job_id=row.id, study_uid=row.study_uid, attempts=row.attempts)


def _job_claim_stmt(worker_id: str, kind: str, when: datetime) -> UpdateBase:
    """One statement that picks and claims: re-checking ``state`` makes a lost race a no-op.
    A job waiting for its retry time is skipped."""
    due = or_(Job.not_before.is_(None), Job.not_before <= when)
    pick = (select(Job.id).where(Job.state == JobState.PENDING.value, Job.kind == kind, due)
            .order_by(Job.id).limit(1).with_for_update(skip_locked=True).scalar_subquery())
    return (update(Job).where(Job.id == pick, Job.state == JobState.PENDING.value)
            .values(state=JobState.CLAIMED.value, claimed_by=worker_id, claimed_at=when,
                    heartbeat_at=when, attempts=Job.attempts + 1)
            .returning(Job.id, Job.study_uid, Job.attempts).execution_options(**NO_SYNC))


def renew_claims(db: Database, prefix: str, now: datetime | None = None) -> int:
    """Heartbeat: renew the lease of every job claimed by ``prefix`` (this process's workers);
    returns how many. A claim already released to another worker is not ours any more."""
    when = utc_now(now)
    with db.session() as s, s.begin():
        return rowcount(s.execute(update(Job)
                                  .where(Job.state == JobState.CLAIMED.value,
                                         owned_by(Job.claimed_by, prefix))
                                  .values(heartbeat_at=when).execution_options(**NO_SYNC)))


def release_stale_claims(db: Database, older_than_seconds: float,
                         now: datetime | None = None, prefix: str | None = None) -> int:
    """Give claims of dead workers back to the queue; returns how many.

    With ``older_than_seconds=0`` and this node's ``prefix`` it re-queues everything the
    node had claimed before a restart; without a prefix it frees any claim whose lease ran
    out: no heartbeat for ``older_than_seconds`` (a crashed peer's, on any machine).
    """
    cutoff = utc_now(now) - timedelta(seconds=older_than_seconds)
    last_sign = func.coalesce(Job.heartbeat_at, Job.claimed_at)  # rows from before leases
    conds = [Job.state == JobState.CLAIMED.value, last_sign <= cutoff]
    if prefix is not None:
        conds.append(owned_by(Job.claimed_by, prefix))
    with db.session() as s, s.begin():
        released = s.execute(update(Job).where(*conds)
                             .values(state=JobState.PENDING.value, claimed_by=None,
                                     claimed_at=None, heartbeat_at=None)
                             .returning(Job.study_uid, Job.kind).execution_options(**NO_SYNC)
                             ).all()
        studies = [uid for uid, _kind in released]
        classifying = sorted({uid for uid, kind in released if kind == CLASSIFY})
        if classifying:  # an objects job's study stays classified
            s.execute(update(Study).where(Study.study_uid.in_(classifying),
                                          Study.state == StudyState.CLASSIFYING.value)
                      .values(state=StudyState.COMPLETE.value).execution_options(**NO_SYNC))
    if studies:
        log.warning("released %d stale job claim(s)", len(studies))
    return len(studies)


def finish_job(db: Database, job_id: int, ok: bool, error: str | None = None,
               now: datetime | None = None) -> None:
    """Close a job and move its study to ``classified`` or ``failed`` (a classify job's)."""
    when = utc_now(now)
    with db.session() as s, s.begin():
        _close_job(s, job_id, ok, error, when)


def _close_job(s: Session, job_id: int, ok: bool, error: str | None, when: datetime) -> None:
    """The job done or failed and, a classify job's, its study classified or failed, in the
    caller's transaction."""
    job_state, study_state = (JobState.DONE, StudyState.CLASSIFIED) if ok \
        else (JobState.FAILED, StudyState.FAILED)
    values = dict(state=job_state.value, finished_at=when, error=error, not_before=None)
    if not ok:
        values["last_error"] = error
    row = s.execute(update(Job).where(Job.id == job_id).values(**values)
                    .returning(Job.study_uid, Job.kind).execution_options(**NO_SYNC)
                    ).one_or_none()
    if row is None:
        raise LookupError(f"no job with id {job_id}")
    study_uid, kind = row
    if kind != CLASSIFY:  # the result's other objects: the study stays classified
        return
    s.execute(update(Study).where(Study.study_uid == study_uid)
              .values(state=study_state.value).execution_options(**NO_SYNC))


def retry_job(db: Database, job_id: int, error: str, not_before: datetime,
              now: datetime | None = None) -> None:
    """A claimed job back in the queue, not claimed before ``not_before``; a classify job's
    study is ``complete`` again and ``last_error`` says why the attempt failed. Attempts are
    kept (the next claim counts on)."""
    utc_now(now)  # validated for a uniform signature
    with db.session() as s, s.begin():
        row = s.execute(update(Job).where(Job.id == job_id,
                                          Job.state == JobState.CLAIMED.value)
                        .values(state=JobState.PENDING.value, claimed_by=None,
                                claimed_at=None, heartbeat_at=None,
                                not_before=utc_now(not_before),
                                last_error=error)
                        .returning(Job.study_uid, Job.kind).execution_options(**NO_SYNC)
                        ).one_or_none()
        if row is None:
            raise LookupError(f"no claimed job with id {job_id}")
        study_uid, kind = row
        if kind != CLASSIFY:  # an objects job: the study stays classified
            return
        s.execute(update(Study).where(Study.study_uid == study_uid,
                                      Study.state == StudyState.CLASSIFYING.value)
                  .values(state=StudyState.COMPLETE.value).execution_options(**NO_SYNC))


def failed_studies(db: Database, limit: int | None = 10) -> list[FailedStudy]:
    """Failed studies, most recently failed first, each with its last classify job's reason."""
    latest = (select(Job.study_uid, func.max(Job.id).label("jid"))
              .where(Job.kind == CLASSIFY).group_by(Job.study_uid).subquery())
    stmt = (select(Study.study_uid, Job.error, Job.attempts, Job.finished_at)
            .where(Study.state == StudyState.FAILED.value)
            .outerjoin(latest, latest.c.study_uid == Study.study_uid)
            .outerjoin(Job, Job.id == latest.c.jid)
            .order_by(Job.finished_at.desc(), Study.study_uid).limit(limit))
    with db.read_session() as s:
        return [FailedStudy(study_uid=uid, reason=error, attempts=attempts or 0,
                            failed_at=finished)
                for uid, error, attempts, finished in s.execute(stmt)]


def jobs_retrying(db: Database) -> int:
    """Classify jobs waiting for another attempt after a failed one."""
    with db.read_session() as s:
        return int(s.execute(select(func.count()).select_from(Job)
                             .where(Job.state == JobState.PENDING.value, Job.kind == CLASSIFY,
                                    Job.attempts > 0)).scalar_one())


def requeue_studies(db: Database, study_uid: str | None = None, now: datetime | None = None
                    ) -> list[str]:
    """Put failed studies back in the queue (all, or the one named): each gets a fresh classify
    job with a new attempt budget (the failed job stays as the record) and is ``complete``
    again. A named study whose job waits for a retry is made due now. Returns the UIDs."""
    when = utc_now(now)
    active = exists().where(Job.study_uid == Study.study_uid, Job.kind == CLASSIFY,
                            Job.state.in_([JobState.PENDING.value, JobState.CLAIMED.value]))
    conds = [Study.state == StudyState.FAILED.value, ~active]
    if study_uid is not None:
        conds.append(Study.study_uid == study_uid)
    with db.session() as s, s.begin():
        uids = list(s.execute(update(Study).where(*conds)
                              .values(state=StudyState.COMPLETE.value)
                              .returning(Study.study_uid).execution_options(**NO_SYNC)
                              ).scalars())
        for uid in sorted(uids):
            s.add(Job(study_uid=uid, kind=CLASSIFY, state=JobState.PENDING.value, attempts=0,
                      created_at=when))
        if study_uid is not None and not uids:
            uids = _make_due(s, study_uid, when)
    if uids:
        log.info("re-queued %d study(ies) for classification", len(uids))
    return sorted(uids)


def _make_due(s: Session, study_uid: str, when: datetime) -> list[str]:
    """A study's pending job that waits for a retry, due now; [study_uid] if there was one."""
    res = s.execute(update(Job).where(Job.study_uid == study_uid, Job.kind == CLASSIFY,
                                      Job.state == JobState.PENDING.value,
                                      Job.not_before > when)
                    .values(not_before=when).execution_options(**NO_SYNC))
    return [study_uid] if rowcount(res) else []


def store_result(db: Database, r: NewResult, destination: str, now: datetime | None = None
                 ) -> tuple[int, int]:
    """Result and its pending export in one transaction: a stored result is never unsent.

    Idempotent per SR: a result with the same SR SOP UID is reused, and an export to the
    same destination is never created twice. With a ``job_id`` the job is done and the study
    classified in the same transaction: no failure after the result is stored can have the
    study classified again (a second SR). Returns (result id, export id).
    """
    when = utc_now(now)

    def attempt() -> tuple[int, int]:
        with db.session() as s, s.begin():
            if r.job_id is not None and \
                    (done := _done_job_result(s, r.job_id, r.sr_sop_uid)) is not None:
                return done
            result_id, created = _ensure_result(s, r, when)
            if r.inputs is not None:
                write_profile(s, r.study_uid, r.inputs, r.predicted_class, r.model_version,
                              when)
            export_id = _ensure_export(s, r.study_uid, result_id, destination, when,
                                       r.sr_sop_uid)
            for sop_uid, path in r.other_objects:  # after the SR: it goes first
                _ensure_export(s, r.study_uid, result_id, destination, when, sop_uid, path)
            if r.objects_pending and created:
                _queue_objects(s, r.study_uid, when)
            if r.job_id is not None:
                _close_job(s, r.job_id, True, None, when)
            return result_id, export_id

    return retry_on_conflict(attempt, "store_result")


def _done_job_result(s: Session, job_id: int, sr_sop_uid: str) -> tuple[int, int] | None:
    """(result id, export id) when the job is already done with another SR: a worker took it
    over after this one's lease ran out (with a newer model, so another SR UID) and finished
    first. The same SR again is the normal idempotent path (None: e.g. another destination).
    The job row is locked (PostgreSQL) so two finishers of one job run one after the other."""
    state = s.execute(select(Job.state).where(Job.id == job_id).with_for_update()
                      ).scalar_one_or_none()
    if state != JobState.DONE.value:
        return None
    row = s.execute(select(Result.id, Export.id, Result.sr_sop_uid)
                    .join(Export, Export.result_id == Result.id)
                    .where(Result.job_id == job_id, Export.object_path.is_(None))
                    .order_by(Result.id, Export.id).limit(1)
                    ).one_or_none()
    if row is None or row[2] == sr_sop_uid:
        return None
    log.warning("job %d was already finished by another worker (its lease had run out "
                "here): this result is not stored", job_id)
    return int(row[0]), int(row[1])


def _ensure_result(s: Session, r: NewResult, when: datetime) -> tuple[int, bool]:
    """The result row for this SR, inserted unless a retry already stored it; (id, whether
    inserted now)."""
    existing = s.execute(select(Result.id).where(Result.sr_sop_uid == r.sr_sop_uid)
                         .order_by(Result.id).limit(1)).scalar_one_or_none()
    if existing is not None:
        return existing, False
    row = Result(study_uid=r.study_uid, job_id=r.job_id, model_version=r.model_version,
                 model_sha256=r.model_sha256, predicted_class=r.predicted_class,
                 probabilities=json.dumps(dict(r.probabilities), sort_keys=True),
                 per_view=json.dumps({k: dict(v) for k, v in r.per_view.items()},
                                     sort_keys=True),
                 sr_sop_uid=r.sr_sop_uid, sr_series_uid=r.sr_series_uid, sr_path=r.sr_path,
                 created_at=when, note=r.note, version=r.version,
                 predecessor_id=r.predecessor_id)
    s.add(row)
    s.flush()
    return row.id, True


def _ensure_export(s: Session, study_uid: str, result_id: int, destination: str,
                   when: datetime, sop_uid: str, path: str | None = None) -> int:
    """The pending export of object `sop_uid` of the result (its SR: no `path`; another
    object: its file) to this destination, due now, created at most once."""
    existing = s.execute(select(Export.id).where(Export.sr_sop_uid == sop_uid,
                                                 Export.destination == destination)
                         ).scalar_one_or_none()
    if existing is not None:
        return existing
    row = Export(result_id=result_id, study_uid=study_uid, sr_sop_uid=sop_uid,
                 destination=destination, state=ExportState.PENDING.value, attempts=0,
                 next_attempt_at=when, created_at=when, object_path=path)
    s.add(row)
    s.flush()
    return row.id


def _queue_objects(s: Session, study_uid: str, when: datetime) -> None:
    """An objects job for the study, unless one is active: a waiting one builds the latest
    result when claimed; one being built is locked here (PostgreSQL), so its finisher, which
    updates it first, sees this result afterwards and queues itself again (store_objects)."""
    active = s.execute(select(Job.id).where(Job.study_uid == study_uid, Job.kind == OBJECTS,
                                            Job.state.in_([JobState.PENDING.value,
                                                           JobState.CLAIMED.value]))
                       .with_for_update()).first()
    if active is None:
        s.add(Job(study_uid=study_uid, kind=OBJECTS, state=JobState.PENDING.value, attempts=0,
                  created_at=when))
        s.flush()


def store_objects(db: Database, job_id: int, result_id: int,
                  objects: tuple[tuple[str, str], ...], destination: str,
                  now: datetime | None = None) -> bool:
    """The objects built for result `result_id` ((SOP Instance UID, file) each) queued for
    export, and the objects job closed, in one transaction; an export is created at most
    once. When a newer result of the study was stored meanwhile (an amendment), the job goes
    back to the queue instead, to build that one's. Returns True when the job is done."""
    when = utc_now(now)

    def attempt() -> bool:
        with db.session() as s, s.begin():
            found = s.execute(update(Job).where(Job.id == job_id)  # locks the job row first
                              .values(state=JobState.DONE.value, finished_at=when, error=None,
                                      not_before=None)
                              .returning(Job.id).execution_options(**NO_SYNC)).first()
            if found is None:
                raise LookupError(f"no job with id {job_id}")
            study_uid, version = s.execute(select(Result.study_uid, Result.version)
                                           .where(Result.id == result_id)).one()
            for sop_uid, path in objects:
                _ensure_export(s, study_uid, result_id, destination, when, sop_uid, path)
            newer = s.execute(select(Result.id).where(Result.study_uid == study_uid,
                                                      Result.version > version).limit(1)
                              ).first()
            if newer is None:
                return True
            s.execute(update(Job).where(Job.id == job_id)
                      .values(state=JobState.PENDING.value, finished_at=None, claimed_by=None,
                              claimed_at=None, heartbeat_at=None)
                      .execution_options(**NO_SYNC))
            return False

    return retry_on_conflict(attempt, "store_objects")


def classify_due(db: Database, now: datetime | None = None) -> bool:
    """Whether a classify job waits to be claimed now: a worker then classifies it before
    building any result's objects (its SR is the result's latency, the objects are not)."""
    when = utc_now(now)
    with db.read_session() as s:
        return s.execute(select(Job.id).where(
            Job.state == JobState.PENDING.value, Job.kind == CLASSIFY,
            or_(Job.not_before.is_(None), Job.not_before <= when)).limit(1)).first() is not None
