"""Read-only reports: the status table, queue depth and the backlog a health check watches.

Nothing here identifies a patient: study UIDs, states, counts, times and error texts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from storage.common import ANTERIOR, CLASSIFY, POSTERIOR
from storage.db import (
    CompletionReason,
    Database,
    Export,
    ExportState,
    Job,
    JobState,
    Result,
    Study,
    StudyState,
)
from storage.jobs import OBJECTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudySummary:
    """One line of ``python -m node status``: the study, its latest result and export."""

    study_uid: str
    state: StudyState
    instance_count: int
    late_instance_count: int
    views: str
    completion_reason: CompletionReason | None
    predicted_class: str | None
    model_version: str | None
    export_state: ExportState | None
    export_attempts: int | None
    next_attempt_at: datetime | None
    last_error: str | None
    last_instance_at: datetime
    acked_at: datetime | None
    first_seen_at: datetime
    completed_at: datetime | None
    # not_applicable: why it is never classified; classified: what was left out (else None)
    applicability_reason: str | None = None
    # the latest result's per-class probabilities (listed also when it is "indeterminate")
    probabilities: dict[str, float] | None = None
    result_version: int | None = None  # 1, or an amended result's version (storage.amend)


@dataclass(frozen=True)
class WorkBacklog:
    """Work waiting or gone wrong: what a health check turns into ages and problems."""

    exports_retrying: int  # pending exports that have failed at least once
    oldest_pending_export_at: datetime | None
    oldest_pending_job_at: datetime | None
    failed_studies: int
    last_export_error: str | None  # newest error of an export not yet delivered
    # stored but no whole-body planar view: the node doing its job, not a problem
    not_applicable_studies: int = 0
    # result images / PDFs that could not be built for good (their SR was delivered, and names
    # an image PACS will not get): how many, and the newest one's study and reason
    failed_pictures: int = 0
    last_pictures_failure: tuple[str, str | None] | None = None


def study_summaries(db: Database, limit: int | None = None) -> list[StudySummary]:
    """Newest studies first, each with its latest result and that result's latest export."""
    latest_result = (select(Result.study_uid, func.max(Result.id).label("rid"))
                     .group_by(Result.study_uid).subquery())
    latest_export = (select(Export.result_id, func.max(Export.id).label("eid"))
                     .where(Export.object_path.is_(None))  # the SR's delivery
                     .group_by(Export.result_id).subquery())
    stmt = (select(Study, Result.predicted_class, Result.model_version, Export.state,
                   Export.attempts, Export.next_attempt_at, Export.last_error, Export.acked_at,
                   Result.probabilities, Result.version)
            .outerjoin(latest_result, latest_result.c.study_uid == Study.study_uid)
            .outerjoin(Result, Result.id == latest_result.c.rid)
            .outerjoin(latest_export, latest_export.c.result_id == Result.id)
            .outerjoin(Export, Export.id == latest_export.c.eid)
            .order_by(Study.first_seen_at.desc(), Study.study_uid).limit(limit))
    with db.read_session() as s:
        return [_summary(*row[:9], version=row[9]) for row in s.execute(stmt).all()]


def _summary(st: Study, predicted: str | None, model: str | None, export_state: str | None,
             attempts: int | None, next_at: datetime | None, error: str | None,
             acked: datetime | None, probabilities: str | None = None,
             version: int | None = None) -> StudySummary:
    """One row as plain data, states as enums (the CHECK constraints keep them valid)."""
    views = [v for v, present in ((ANTERIOR, st.has_anterior), (POSTERIOR, st.has_posterior))
             if present]
    return StudySummary(
        study_uid=st.study_uid, state=StudyState(st.state), instance_count=st.instance_count,
        late_instance_count=st.late_instance_count, views=",".join(views),
        completion_reason=None if st.completion_reason is None
        else CompletionReason(st.completion_reason),
        predicted_class=predicted, model_version=model,
        export_state=None if export_state is None else ExportState(export_state),
        export_attempts=attempts, next_attempt_at=next_at, last_error=error,
        last_instance_at=st.last_instance_at, acked_at=acked, first_seen_at=st.first_seen_at,
        completed_at=st.completed_at, applicability_reason=st.applicability_reason,
        probabilities=None if probabilities is None else json.loads(probabilities),
        result_version=version)


def queue_depth(db: Database) -> dict[str, int]:
    """Counts an admin (or a health check) watches: backlog and dead letters (JSON keys)."""
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


def work_backlog(db: Database) -> WorkBacklog:
    """Exports waiting for a retry, the oldest pending work, failed and not applicable
    studies, last error."""
    pending = Export.state == ExportState.PENDING.value
    with db.read_session() as s:
        retrying = s.execute(select(func.count()).select_from(Export)
                             .where(pending, Export.attempts > 0)).scalar_one()
        oldest_export = s.execute(select(func.min(Export.created_at)).where(pending)
                                  ).scalar_one()
        oldest_job = s.execute(select(func.min(Job.created_at))  # a study's result waits
                               .where(Job.state == JobState.PENDING.value,
                                      Job.kind == CLASSIFY)).scalar_one()
        failed = s.execute(select(func.count()).select_from(Study)
                           .where(Study.state == StudyState.FAILED.value)).scalar_one()
        not_applicable = s.execute(select(func.count()).select_from(Study).where(
            Study.state == StudyState.NOT_APPLICABLE.value)).scalar_one()
        failed_objects = (Job.kind == OBJECTS, Job.state == JobState.FAILED.value)
        failed_pictures = s.execute(select(func.count()).select_from(Job)
                                    .where(*failed_objects)).scalar_one()
        newest = s.execute(select(Job.study_uid, Job.error).where(*failed_objects)
                           .order_by(Job.id.desc()).limit(1)).one_or_none()
        last_error = s.execute(select(Export.last_error)
                               .where(Export.state.in_([ExportState.PENDING.value,
                                                        ExportState.DEAD.value]),
                                      Export.last_error.is_not(None))
                               .order_by(Export.id.desc()).limit(1)).scalar_one_or_none()
    return WorkBacklog(exports_retrying=retrying, oldest_pending_export_at=oldest_export,
                       oldest_pending_job_at=oldest_job, failed_studies=failed,
                       last_export_error=last_error, not_applicable_studies=not_applicable,
                       failed_pictures=failed_pictures,
                       last_pictures_failure=None if newest is None else (newest[0], newest[1]))
