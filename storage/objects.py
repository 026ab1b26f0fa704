"""The objects of each study's latest result and their deliveries: the SR and what is sent
beside it (result image, PDF report), one export row each, for ``status`` and the web page.

Read-only. What an object is (SR, image, PDF) is a DICOM fact the caller reads from the file
(node.dicom.codes); here an object is the SR (``object_path`` NULL: the result's own file) or
another object of the result with its file.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from storage.db import Database, Export, ExportState, Result

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResultObject:
    """One object of a study's latest result and its delivery to one destination."""

    study_uid: str
    sop_uid: str
    path: str  # the stored file (may be gone after retention)
    is_sr: bool
    state: ExportState
    attempts: int
    last_error: str | None
    acked_at: datetime | None


def result_objects(db: Database, study_uids: Collection[str] | None = None
                   ) -> dict[str, list[ResultObject]]:
    """Per study (all, or those named), the objects of its latest result in the order they
    are sent (the SR first)."""
    latest = (select(Result.study_uid, func.max(Result.id).label("rid"))
              .group_by(Result.study_uid))
    if study_uids is not None:
        latest = latest.where(Result.study_uid.in_(list(study_uids)))
    sub = latest.subquery()
    stmt = (select(Export.study_uid, Export.sr_sop_uid, Export.object_path, Result.sr_path,
                   Export.state, Export.attempts, Export.last_error, Export.acked_at)
            .join(sub, sub.c.rid == Export.result_id)
            .join(Result, Result.id == Export.result_id)
            .order_by(Export.study_uid, Export.id))
    out: dict[str, list[ResultObject]] = {}
    with db.read_session() as s:
        for uid, sop, obj_path, sr_path, state, attempts, error, acked in s.execute(stmt):
            out.setdefault(uid, []).append(ResultObject(
                study_uid=uid, sop_uid=sop, path=obj_path or sr_path, is_sr=obj_path is None,
                state=ExportState(state), attempts=attempts or 0, last_error=error,
                acked_at=acked))
    return out


def newest_object_paths(db: Database, limit: int) -> list[tuple[str, str]]:
    """(study UID, file) of the newest objects sent beside SRs, newest first: where the web
    page looks for the latest result image."""
    stmt = (select(Export.study_uid, Export.object_path)
            .where(Export.object_path.is_not(None))
            .order_by(Export.id.desc()).limit(limit))
    with db.read_session() as s:
        return [(uid, path) for uid, path in s.execute(stmt) if path is not None]
