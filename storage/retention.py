"""Retention queries: which delivered studies may be purged, what to delete, and the record.

Deleting files is the caller's job (``node.service.housekeeping``): this module only says
which rows point at purgeable files and, once the files are gone, removes those rows and
records the purge in one transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, delete, exists, func, or_, select

from storage.common import NO_SYNC, utc_now
from storage.db import Database, Export, ExportState, Instance, Purge, Result, Study, StudyState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PurgeCandidates:
    """What a purge of one study may delete: instances received before the cutoff and the
    study's result files, SRs and the other objects sent beside them (result image, PDF
    report); each file is still checked against the cutoff before it goes."""

    instances: tuple[tuple[str, str], ...]  # (SOP instance UID, path)
    sr_paths: tuple[str, ...]  # every result object's file, the SRs first


def purgeable_studies(db: Database, cutoff: datetime, limit: int) -> list[str]:
    """Delivered or not-applicable studies last touched before ``cutoff`` whose files are
    still there.

    Delivered: classified, at least one export and every export done; touched: the newest of
    the last instance and the last acknowledgement. A not-applicable study (never classified,
    nothing to deliver) is purged like a delivered one. Oldest first, at most ``limit``.
    """
    cutoff = utc_now(cutoff)
    own = Export.study_uid == Study.study_uid
    last_ack = select(func.max(Export.acked_at)).where(own).scalar_subquery()
    purged_since = exists().where(Purge.study_uid == Study.study_uid,
                                  Purge.purged_at >= Study.last_instance_at)
    delivered = and_(Study.state == StudyState.CLASSIFIED.value, exists().where(own),
                     ~exists().where(own, Export.state != ExportState.DONE.value),
                     last_ack < cutoff)
    never_classified = Study.state == StudyState.NOT_APPLICABLE.value  # nothing to deliver
    stmt = (select(Study.study_uid)
            .where(or_(delivered, never_classified), Study.last_instance_at < cutoff,
                   ~purged_since)
            .order_by(Study.last_instance_at, Study.study_uid).limit(limit))
    with db.read_session() as s:
        return list(s.execute(stmt).scalars())


def purge_candidates(db: Database, study_uid: str, cutoff: datetime) -> PurgeCandidates:
    """The study's instances received before ``cutoff`` and all its result files."""
    cutoff = utc_now(cutoff)
    with db.read_session() as s:
        instances = s.execute(select(Instance.sop_uid, Instance.path)
                              .where(Instance.study_uid == study_uid,
                                     Instance.received_at < cutoff)).all()
        srs = s.execute(select(Result.sr_path).where(Result.study_uid == study_uid)
                        ).scalars().all()
        others = s.execute(select(Export.object_path)
                           .where(Export.study_uid == study_uid, Export.object_path.is_not(None))
                           .order_by(Export.id)).scalars().all()
    paths = [*srs, *(p for p in others if p is not None)]
    return PurgeCandidates(instances=tuple((sop, path) for sop, path in instances),
                           sr_paths=tuple(dict.fromkeys(paths)))


def record_purge(db: Database, study_uid: str, sop_uids: list[str], cutoff: datetime,
                 n_files: int, n_bytes: int, when: datetime) -> None:
    """Instance rows of deleted files go and the purge is recorded, in one transaction.

    Only rows received before ``cutoff`` are deleted, so an instance re-sent meanwhile keeps
    its fresh row; a later purge of the same study adds to its ``purges`` row.
    """
    cutoff, when = utc_now(cutoff), utc_now(when)
    with db.session() as s, s.begin():
        if sop_uids:
            s.execute(delete(Instance).where(Instance.sop_uid.in_(sop_uids),
                                             Instance.received_at < cutoff)
                      .execution_options(**NO_SYNC))
        row = s.get(Purge, study_uid)
        if row is None:
            s.add(Purge(study_uid=study_uid, purged_at=when, files=n_files, size_bytes=n_bytes))
        else:
            row.purged_at, row.files = when, row.files + n_files
            row.size_bytes = row.size_bytes + n_bytes
