"""Amended results: a view re-acquired (or added) after a study's result re-classifies the
study once it is quiet again, and the new result names the one it replaces.

Patient motion is common in bone scanning, so a view is often acquired again after the
result was sent; PACS must not keep describing the old images. The steps:

- ``storage.intake`` flags a new whole-body instance of a study already classified (or being
  classified) as late, and, within ``amend_window_days`` of the study's first result, as
  ``amends``, setting the study's ``amend_pending`` (``mark_amending``, in its transaction);
  later it is only counted late. An identical re-send is a duplicate: nothing happens.
- The completion sweep (``requeue_amendments``) puts a classified study with
  ``amend_pending`` and no new instance for the quiet period back in the queue: several
  re-acquired views make one amendment.
- The worker classifies with the latest instance of each view, reads ``current_result``
  for the version and predecessor, and ``storage.jobs.store_result`` records version n + 1
  naming version n. Earlier versions and their exports stay as they were (never re-sent).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, select, update

from storage.common import CLASSIFY, NO_SYNC, utc_now
from storage.db import Database, Job, JobState, Purge, Result, Study, StudyState

log = logging.getLogger(__name__)

DEFAULT_WINDOW_DAYS = 7.0
# states in which a new view can still change what PACS is told: a result exists or is being
# made (a failed study has none; `requeue` is the operator's way back for it)
AMENDABLE_STATES = frozenset({StudyState.CLASSIFIED, StudyState.CLASSIFYING})


@dataclass(frozen=True)
class ResultVersion:
    """A study's current result as an amendment needs it: its version and SR identity."""

    result_id: int
    study_uid: str
    version: int
    sr_sop_uid: str
    sr_series_uid: str


def mark_amending(conn: Connection, study_uid: str, sop_uid: str, state: StudyState,
                  when: datetime, window_days: float) -> bool:
    """In intake's transaction: a new whole-body instance arrived after classification
    began. True (and the study's ``amend_pending`` set) when it amends the result; False
    when the study cannot be amended or the window is past (one log line says so)."""
    if state not in AMENDABLE_STATES:
        return False
    first = conn.execute(select(func.min(Result.created_at))
                         .where(Result.study_uid == study_uid)).scalar_one_or_none()
    if window_days <= 0 or (first is not None
                            and when - first > timedelta(days=window_days)):
        log.info("study %s: instance %s arrived after the result and past "
                 "[completion].amend_window_days (%g): kept, counted late, not amended",
                 study_uid, sop_uid, window_days)
        return False
    if conn.execute(select(Purge.study_uid).where(Purge.study_uid == study_uid)
                    ).first() is not None:  # its other views are gone: never a partial result
        log.info("study %s: instance %s arrived after the study's files were purged "
                 "(retention): kept, counted late, not amended", study_uid, sop_uid)
        return False
    conn.execute(update(Study).where(Study.study_uid == study_uid)
                 .values(amend_pending=True).execution_options(**NO_SYNC))
    log.info("study %s: instance %s arrived after classification began; the study is "
             "classified again once quiet and an amended result sent", study_uid, sop_uid)
    return True


def requeue_amendments(db: Database, quiet_seconds: float, now: datetime | None = None
                       ) -> list[str]:
    """Classified studies with an amendment pending and no new instance for
    ``quiet_seconds``: ``complete`` again with a fresh classify job each. Returns the UIDs.
    The conditional UPDATE lets one sweep (of several nodes) take each study once."""
    when = utc_now(now)
    cutoff = when - timedelta(seconds=quiet_seconds)
    due = (Study.amend_pending.is_(True), Study.state == StudyState.CLASSIFIED.value,
           Study.last_instance_at < cutoff)
    with db.read_session() as s:  # the sweep runs every few seconds: no write lock for nothing
        if s.execute(select(Study.study_uid).where(*due).limit(1)).first() is None:
            return []
    with db.session() as s, s.begin():
        uids = sorted(s.execute(
            update(Study).where(*due)
            .values(state=StudyState.COMPLETE.value, amend_pending=False)
            .returning(Study.study_uid).execution_options(**NO_SYNC)).scalars())
        for uid in uids:
            s.add(Job(study_uid=uid, kind=CLASSIFY, state=JobState.PENDING.value,
                      attempts=0, created_at=when))
    for uid in uids:
        log.info("study %s queued for an amended result: new view(s) after the result, "
                 "quiet for %.0f s", uid, quiet_seconds)
    return uids


def current_result(db: Database, study_uid: str) -> ResultVersion | None:
    """The study's current result (highest version), None before its first."""
    with db.read_session() as s:
        row = s.execute(select(Result.id, Result.version, Result.sr_sop_uid,
                               Result.sr_series_uid)
                        .where(Result.study_uid == study_uid)
                        .order_by(Result.version.desc(), Result.id.desc()).limit(1)
                        ).one_or_none()
    if row is None:
        return None
    return ResultVersion(result_id=row.id, study_uid=study_uid, version=row.version,
                         sr_sop_uid=row.sr_sop_uid, sr_series_uid=row.sr_series_uid)


def result_versions(db: Database, study_uids: Collection[str]) -> dict[str, int]:
    """Each listed study's current result version (studies without a result left out)."""
    if not study_uids:
        return {}
    with db.read_session() as s:
        return {uid: int(v) for uid, v in s.execute(
            select(Result.study_uid, func.max(Result.version))
            .where(Result.study_uid.in_(sorted(set(study_uids))))
            .group_by(Result.study_uid))}
