"""Intake: received instances in, studies declared complete (one classify job each), or not
applicable (no whole-body planar view among them: never classified).

``record_instance`` runs on every C-STORE, so it uses Core statements prepared once at import;
everything else is a short ORM-free transaction returning plain dataclasses.

Only instances the applicability gate (node.dicom.applicability) found to be whole-body planar
views count: for the anterior/posterior completion rule, for classification and for retraining
(``study_instances``). The others are stored and listed, never classified.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import cast

from sqlalchemy import Connection, Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from storage.amend import DEFAULT_WINDOW_DAYS, mark_amending
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
from storage.db import (
    AE,
    CompletionReason,
    Database,
    IgnoredCount,
    Instance,
    Job,
    JobState,
    Study,
    StudyState,
    lock_wait_as_busy,
)
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
    # the applicability gate's verdict (the receiver always passes it; True for callers that
    # record known whole-body views, such as tests and benchmarks)
    applicable: bool = True
    applicability_reason: str = ""
    decoded_bytes: int = 0  # rows x columns x frames x 4: what the per-study cap sums


class Refusal(StrEnum):
    """Why record_instance kept nothing; the receiver answers each with its own status."""

    PATIENT_MISMATCH = "patient_mismatch"  # the study holds another patient's instances
    NO_PATIENT_IDENTITY = "no_patient_identity"  # no patient attributes, the study has some
    SOP_IN_OTHER_STUDY = "sop_in_other_study"  # refused, never moved: the old file would orphan
    STUDY_INSTANCES = "study_instances"  # the study already holds its maximum of instances
    STUDY_DECODED_BYTES = "study_decoded_bytes"  # the study's decoded size would pass its cap


@dataclass(frozen=True)
class StudyLimits:
    """Per-study caps, checked under the study's row lock so racing C-STOREs cannot both
    slip under them (0 = no cap)."""

    max_instances: int = 0
    max_decoded_bytes: int = 0
    # how long after its first result a study's new views still amend it (0 = never)
    amend_window_days: float = DEFAULT_WINDOW_DAYS


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
    refusal: Refusal | None = None  # set when nothing was recorded
    detail: str = ""  # the refusal's particulars for its log line: UIDs and counts only


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
    applicable: bool = True
    applicability_reason: str = ""
    amends: bool = False  # late, but the amended result is classified with it


def record_instance(db: Database, rec: InstanceRecord, now: datetime | None = None,
                    limits: StudyLimits | None = None) -> RecordOutcome:
    """Record a durably written instance; commit before the SCP answers Success.

    Re-sent SOP UIDs update their row, instances of an already classified study are kept
    and flagged late (a new whole-body one within the amendment window also amends the
    result: storage.amend), and a study UID reused for another patient is refused (nothing
    inserted, ``patient_mismatch``) so two patients' images never merge. Only an applicable
    instance's views count towards completion; one arriving in a study already found not
    applicable reopens it (receiving again), so a whole-body scan sent after the camera's
    pause is classified after all.

    Refused, with nothing written (``refusal`` says why): an instance without patient
    attributes joining a study that has a patient, a SOP UID already stored under another
    study, a study over ``limits``. DatabaseBusy when the write lock was not had within the
    session's lock wait (nothing written either).
    """
    when = utc_now(now)
    validate_record(rec)
    views = join_views(rec.views)

    def attempt() -> RecordOutcome:
        try:
            with db.transaction() as conn:
                return _record(conn, rec, views, when, limits)
        except _Refused as refused:  # raised inside: a study row inserted for it rolls back
            return refused.outcome

    with lock_wait_as_busy("record_instance"):
        return retry_on_conflict(attempt, "record_instance")


def record_instances(db: Database, recs: Sequence[InstanceRecord], now: datetime | None = None,
                     limits: StudyLimits | None = None) -> list[RecordOutcome]:
    """Several instances recorded as `record_instance` would, one after the other, in ONE
    transaction: one commit (one WAL fsync) for C-STOREs of several associations that
    waited for the same write (group commit, issue 18). Each runs in a savepoint, so a
    refused one leaves nothing and the others stand. Outcomes in the order given; an
    exception (DatabaseBusy, a database error) is every instance's: nothing was recorded.
    Callers validate each record first (`validate_record`)."""
    when = utc_now(now)

    def attempt() -> list[RecordOutcome]:
        out: list[RecordOutcome] = []
        with db.transaction() as conn:
            for rec in recs:
                try:
                    with conn.begin_nested():
                        out.append(_record(conn, rec, join_views(rec.views), when, limits))
                except _Refused as refused:  # its savepoint rolled back; the rest stand
                    out.append(refused.outcome)
        return out

    with lock_wait_as_busy("record_instances"):
        return retry_on_conflict(attempt, "record_instances")


def validate_record(rec: InstanceRecord) -> None:
    """ValueError for a UID no column may hold (the same refusal on SQLite as PostgreSQL's
    VARCHAR(64) would give) or a view name the views column cannot keep."""
    for uid in (rec.sop_uid, rec.study_uid, rec.series_uid, rec.sop_class_uid,
                rec.transfer_syntax_uid):
        validate_uid(uid)
    join_views(rec.views)


class _Refused(Exception):
    """Leaves the transaction so it rolls back, carrying the outcome to return."""

    def __init__(self, outcome: RecordOutcome) -> None:
        super().__init__(outcome.refusal)
        self.outcome = outcome


def _record(conn: Connection, rec: InstanceRecord, views: str, when: datetime,
            limits: StudyLimits | None = None) -> RecordOutcome:
    """Prepared Core statements on a bare connection: building ORM statements and their
    cache keys anew on every C-STORE, and a Session around them, cost more Python than the
    SQL itself."""
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
                                 has_anterior=ant, has_posterior=post, patient_mismatch=True,
                                 refusal=Refusal.PATIENT_MISMATCH)
    existing = conn.execute(_SELECT_INSTANCE, {"sop_uid": rec.sop_uid}).one_or_none()
    refused = _refusal(conn, rec, key, None if existing is None else existing.study_uid,
                       limits)
    if refused is not None:
        raise _Refused(RecordOutcome(
            new_study=False, duplicate=existing is not None, late=False,
            study_state=StudyState(state), has_anterior=ant, has_posterior=post,
            patient_mismatch=False, refusal=refused[0], detail=refused[1]))
    if existing is not None:
        late, added = bool(existing.late), 0  # a re-send keeps its original late flag
    else:
        late, added = StudyState(state) in LATE_STATES, 1
    amends = late and bool(added) and rec.applicable and mark_amending(
        conn, rec.study_uid, rec.sop_uid, StudyState(state), when,
        (limits or StudyLimits()).amend_window_days)
    fields = {"study_uid": rec.study_uid, "series_uid": rec.series_uid,
              "sop_class_uid": rec.sop_class_uid, "transfer_syntax_uid": rec.transfer_syntax_uid,
              "path": rec.path, "views": views, "n_frames": rec.n_frames,
              "size_bytes": rec.size_bytes, "received_at": when, "calling_ae": rec.calling_ae,
              "late": late, "applicable": rec.applicable, "decoded_bytes": rec.decoded_bytes,
              "applicability_reason": rec.applicability_reason}
    if existing is None:
        conn.execute(_INSERT_INSTANCE, {"sop_uid": rec.sop_uid, **fields, "amends": amends})
    else:
        conn.execute(_UPDATE_INSTANCE, {"b_sop_uid": rec.sop_uid, **fields})
    if rec.applicable:  # a spot view labelled ANT must not complete a whole-body study
        ant, post = ant or ANTERIOR in rec.views, post or POSTERIOR in rec.views
        if state == StudyState.NOT_APPLICABLE.value:
            _reopen(conn, rec.study_uid, rec.sop_uid)
            state = StudyState.RECEIVING.value
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
_STUDY_TOTALS = select(func.count(), func.coalesce(func.sum(_INSTANCES.c.decoded_bytes), 0)
                       ).where(_INSTANCES.c.study_uid == bindparam("study_uid"),
                               _INSTANCES.c.sop_uid != bindparam("sop_uid"))
_UPDATE_INSTANCE = update(_INSTANCES).where(_INSTANCES.c.sop_uid == bindparam("b_sop_uid"))
_UPDATE_STUDY = update(_STUDIES).where(_STUDIES.c.study_uid == bindparam("b_study_uid")).values(
    instance_count=_STUDIES.c.instance_count + bindparam("b_added"),
    late_instance_count=_STUDIES.c.late_instance_count + bindparam("b_late_added"),
    has_anterior=bindparam("b_ant"), has_posterior=bindparam("b_post"),
    last_instance_at=bindparam("b_last"), patient_key=bindparam("b_key"))


def _reopen(conn: Connection, study_uid: str, sop_uid: str) -> None:
    """A whole-body view arrived in a study found not applicable: receiving again."""
    log.info("study %s: whole-body instance %s arrived after the study was found not "
             "applicable; receiving again", study_uid, sop_uid)
    conn.execute(update(Study).where(Study.study_uid == study_uid).values(
        state=StudyState.RECEIVING.value, completed_at=None, completion_reason=None,
        applicability_reason=None))


def _refusal(conn: Connection, rec: InstanceRecord, study_key: str | None,
             stored_in: str | None, limits: StudyLimits | None) -> tuple[Refusal, str] | None:
    """The identity rules, then the per-study caps (a re-send replaces its own share)."""
    if rec.patient_key is None and study_key is not None:
        return Refusal.NO_PATIENT_IDENTITY, f"study {rec.study_uid} already has a patient"
    if stored_in is not None and stored_in != rec.study_uid:
        return Refusal.SOP_IN_OTHER_STUDY, f"stored under study {stored_in}"
    if limits is None or not (limits.max_instances or limits.max_decoded_bytes):
        return None
    count, total = conn.execute(_STUDY_TOTALS, {"study_uid": rec.study_uid,
                                                "sop_uid": rec.sop_uid}).one()
    if limits.max_instances and count >= limits.max_instances:
        return Refusal.STUDY_INSTANCES, \
            f"study {rec.study_uid} already holds {count} other instance(s)"
    if limits.max_decoded_bytes and total + rec.decoded_bytes > limits.max_decoded_bytes:
        return Refusal.STUDY_DECODED_BYTES, \
            f"study {rec.study_uid} would decode to {total + rec.decoded_bytes} bytes"
    return None


def _patient_mismatch(stored: str | None, incoming: str | None) -> bool:
    """The one patient rule: only two known, different keys are a conflict."""
    return stored is not None and incoming is not None and stored != incoming


def mark_complete(db: Database, study_uid: str, reason: CompletionReason,
                  now: datetime | None = None) -> bool:
    """receiving -> complete plus one pending classify job, or receiving -> not_applicable
    (no job) when no instance is a whole-body planar view. True only when a job was queued;
    False if not receiving (or not applicable).

    A study that mixes whole-body views with other NM images (spot views, a three-phase
    bone scan's flow and blood-pool images, SPECT, a renal dynamic) is classified on its
    whole-body views alone, and the study records what was left out. That is what the
    reading physician expects: spot views and SPECT are routinely added to a bone scan and its
    whole-body views are still the images to read, and Dscint only ever sees those (the worker
    and the SR reference nothing else), so no other image is diagnosed. Refusing the whole
    study would silently drop most real bone scans. Which tracer a whole-body image shows is
    not decided here. A study with no whole-body view is never classified.

    The conditional UPDATE makes the transition happen once even when the SCP and the
    quiet sweep race, so exactly one job is created.
    """
    when = utc_now(now)
    with db.session() as s, s.begin():
        s.execute(select(Study.state).where(Study.study_uid == study_uid).with_for_update())
        applicable, others, first_reason = _applicability(s, study_uid)
        if applicable == 0:
            why = (f"no whole-body planar view among {others} instance(s): "
                   f"{first_reason or 'no instances'}")
            if _transition(s, study_uid, StudyState.NOT_APPLICABLE, reason, when, why):
                log.info("study %s not applicable, not classified: %s", study_uid, why)
            return False
        note = None if others == 0 else (
            f"classified on {applicable} whole-body instance(s); {others} other instance(s) "
            f"left out: {first_reason}")
        if not _transition(s, study_uid, StudyState.COMPLETE, reason, when, note):
            return False
        s.add(Job(study_uid=study_uid, kind=CLASSIFY, state=JobState.PENDING.value,
                  attempts=0, created_at=when))
    if note is not None:
        log.info("study %s: %s", study_uid, note)
    return True


def _applicability(s: Session, study_uid: str) -> tuple[int, int, str | None]:
    """(applicable instances, other instances, the first other one's reason)."""
    counts = {bool(applicable): int(n) for applicable, n in
              s.execute(select(Instance.applicable, func.count())
                        .where(Instance.study_uid == study_uid)
                        .group_by(Instance.applicable))}
    first = s.execute(select(Instance.applicability_reason)
                      .where(Instance.study_uid == study_uid, Instance.applicable.is_(False))
                      .order_by(Instance.received_at, Instance.sop_uid).limit(1)
                      ).scalar_one_or_none()
    return int(counts.get(True, 0)), int(counts.get(False, 0)), first


def _transition(s: Session, study_uid: str, to: StudyState, reason: CompletionReason,
                when: datetime, note: str | None) -> bool:
    """receiving -> `to`, once; False when the study was not receiving."""
    res = s.execute(update(Study)
                    .where(Study.study_uid == study_uid,
                           Study.state == StudyState.RECEIVING.value)
                    .values(state=to.value, completed_at=when,
                            completion_reason=CompletionReason(reason).value,
                            applicability_reason=note)
                    .execution_options(**NO_SYNC))
    return rowcount(res) == 1


def studies_due_quiet(db: Database, quiet_seconds: float, now: datetime | None = None
                      ) -> list[str]:
    """Receiving studies with no new instance for ``quiet_seconds`` (oldest first)."""
    cutoff = utc_now(now) - timedelta(seconds=quiet_seconds)
    with db.read_session() as s:
        return list(s.execute(
            select(Study.study_uid)
            .where(Study.state == StudyState.RECEIVING.value, Study.last_instance_at < cutoff)
            .order_by(Study.last_instance_at, Study.study_uid)).scalars())


def study_instances(db: Database, study_uid: str, include_not_applicable: bool = False
                    ) -> list[InstanceInfo]:
    """A study's instances in arrival order, late ones included (flagged); only whole-body
    planar views unless `include_not_applicable` (what the worker and retraining read)."""
    stmt = select(Instance).where(Instance.study_uid == study_uid)
    if not include_not_applicable:
        stmt = stmt.where(Instance.applicable.is_(True))
    with db.read_session() as s:
        rows = s.execute(stmt.order_by(Instance.received_at, Instance.sop_uid)).scalars().all()
        return [InstanceInfo(sop_uid=i.sop_uid, series_uid=i.series_uid,
                             sop_class_uid=i.sop_class_uid, path=i.path,
                             views=split_views(i.views), n_frames=i.n_frames, late=i.late,
                             applicable=i.applicable,
                             applicability_reason=i.applicability_reason, amends=i.amends)
                for i in rows]


def study_patient_keys(db: Database) -> dict[str, str | None]:
    """Every stored study UID with its opaque patient key (None when the camera sent none):
    retraining from the database groups a patient's studies on the same side of the split."""
    with db.read_session() as s:
        return {uid: key for uid, key in
                s.execute(select(Study.study_uid, Study.patient_key))}


@dataclass(frozen=True)
class IgnoredTotal:
    """Instances of one SOP class answered but not kept, of one kind (see IgnoredCount)."""

    sop_class_uid: str
    kind: str
    count: int
    last_at: datetime
    last_calling_ae: str


def count_ignored(db: Database, counts: Mapping[tuple[str, str], int], calling_ae: str,
                  now: datetime | None = None) -> None:
    """Add one association's counts, {(SOP class UID, kind): n}, in one short transaction
    (the receiver calls it once per association, not once per instance)."""
    when = utc_now(now)
    items = [(uid, kind, n) for (uid, kind), n in sorted(counts.items()) if n > 0]
    if not items:
        return

    def attempt() -> None:
        with db.session() as s, s.begin():
            for uid, kind, n in items:
                res = s.execute(update(IgnoredCount)
                                .where(IgnoredCount.sop_class_uid == uid,
                                       IgnoredCount.kind == kind)
                                .values(count=IgnoredCount.count + n, last_at=when,
                                        last_calling_ae=calling_ae[:AE])
                                .execution_options(**NO_SYNC))
                if rowcount(res) == 0:
                    s.execute(insert(IgnoredCount).values(
                        sop_class_uid=uid, kind=kind, count=n, first_at=when, last_at=when,
                        last_calling_ae=calling_ae[:AE]))

    with lock_wait_as_busy("count_ignored"):
        retry_on_conflict(attempt, "count_ignored")


def ignored_totals(db: Database) -> list[IgnoredTotal]:
    """Every (SOP class, kind) count, most recent first (status, /health, /metrics)."""
    with db.read_session() as s:
        rows = s.execute(select(IgnoredCount).order_by(IgnoredCount.last_at.desc(),
                                                       IgnoredCount.sop_class_uid)).scalars()
        return [IgnoredTotal(r.sop_class_uid, r.kind, r.count, r.last_at, r.last_calling_ae)
                for r in rows]
