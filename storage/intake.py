"""Intake: received instances in, studies declared complete (one classify job each).

``record_instance`` runs on every C-STORE, so it uses Core statements prepared once at import;
everything else is a short ORM-free transaction returning plain dataclasses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from storage.common import (
    ANTERIOR,
    CLASSIFY,
    NO_SYNC,
    POSTERIOR,
    join_views,
    retry_on_conflict,
    rowcount,
    split_views,
    utc_now,
)
from storage.db import CompletionReason, Database, Instance, Job, JobState, Study, StudyState
from storage.filestore import validate_uid

log = logging.getLogger(__name__)

LATE_STATES = frozenset({StudyState.CLASSIFYING, StudyState.CLASSIFIED, StudyState.FAILED})


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
class InstanceInfo:
    """An instance as the worker needs it."""

    sop_uid: str
    series_uid: str
    sop_class_uid: str
    path: str
    views: tuple[str, ...]
    n_frames: int
    late: bool


def record_instance(db: Database, rec: InstanceRecord, now: datetime | None = None
                    ) -> RecordOutcome:
    """Record a durably written instance; commit before the SCP answers Success.

    Re-sent SOP UIDs update their row, instances of an already classified study are kept
    and flagged late, and a study UID reused for another patient is refused (nothing
    inserted, ``patient_mismatch``) so two patients' images never merge.
    """
    when = utc_now(now)
    views = join_views(rec.views)
    for uid in (rec.sop_uid, rec.study_uid, rec.series_uid, rec.sop_class_uid,
                rec.transfer_syntax_uid):
        validate_uid(uid)  # same refusal on SQLite as PostgreSQL's VARCHAR(64) would give

    def attempt() -> RecordOutcome:
        with db.session() as s, s.begin():
            return _record(s, rec, views, when)

    return retry_on_conflict(attempt, "record_instance")


def _record(s: Session, rec: InstanceRecord, views: str, when: datetime) -> RecordOutcome:
    """Prepared Core statements on the session's connection: building ORM statements and
    their cache keys anew on every C-STORE costs more Python than the SQL itself."""
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
    present = {v for row in others for v in split_views(row)}
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
    when = utc_now(now)
    with db.session() as s, s.begin():
        res = s.execute(update(Study)
                        .where(Study.study_uid == study_uid,
                               Study.state == StudyState.RECEIVING.value)
                        .values(state=StudyState.COMPLETE.value, completed_at=when,
                                completion_reason=CompletionReason(reason).value)
                        .execution_options(**NO_SYNC))
        if rowcount(res) != 1:
            return False
        s.add(Job(study_uid=study_uid, kind=CLASSIFY, state=JobState.PENDING.value,
                  attempts=0, created_at=when))
    return True


def studies_due_quiet(db: Database, quiet_seconds: float, now: datetime | None = None
                      ) -> list[str]:
    """Receiving studies with no new instance for ``quiet_seconds`` (oldest first)."""
    cutoff = utc_now(now) - timedelta(seconds=quiet_seconds)
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
                             views=split_views(i.views), n_frames=i.n_frames, late=i.late)
                for i in rows]


def study_patient_keys(db: Database) -> dict[str, str | None]:
    """Every stored study UID with its opaque patient key (None when the camera sent none):
    retraining from the database groups a patient's studies on the same side of the split."""
    with db.read_session() as s:
        return {uid: key for uid, key in
                s.execute(select(Study.study_uid, Study.patient_key))}
