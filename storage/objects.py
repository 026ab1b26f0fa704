"""The objects of each study's latest result and their deliveries: the SR and what is sent
beside it (result image, PDF report), one export row each, for ``status`` and the web page.

Read-only (the queue that builds the objects after the SR is ``storage.jobs``). What an
object is (SR, image, PDF) is a DICOM fact the caller reads from the file
(node.dicom.codes); here an object is the SR (``object_path`` NULL: the result's own file) or
another object of the result with its file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, func, select

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


@dataclass(frozen=True)
class ResultToPicture:
    """A study's latest result as its SR states it: what its image and PDF show and whose
    UIDs they take (the model's weights hash, the version)."""

    result_id: int
    study_uid: str
    version: int
    model_sha256: str
    predicted_class: str
    probabilities: dict[str, float]
    per_view: dict[str, dict[str, float]]
    has_objects: bool  # its other objects are queued already


def result_to_picture(db: Database, study_uid: str) -> ResultToPicture | None:
    """The study's latest result (highest version), for the objects job; None before its
    first."""
    queued = exists().where(Export.result_id == Result.id, Export.object_path.is_not(None))
    stmt = (select(Result.id, Result.version, Result.model_sha256, Result.predicted_class,
                   Result.probabilities, Result.per_view, queued)
            .where(Result.study_uid == study_uid)
            .order_by(Result.version.desc(), Result.id.desc()).limit(1))
    with db.read_session() as s:
        row = s.execute(stmt).one_or_none()
    if row is None:
        return None
    rid, version, sha, predicted, probs, per_view, has_objects = row
    return ResultToPicture(result_id=rid, study_uid=study_uid, version=version,
                           model_sha256=sha, predicted_class=predicted,
                           probabilities=json.loads(probs), per_view=json.loads(per_view),
                           has_objects=bool(has_objects))


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
