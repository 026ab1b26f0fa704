"""SR exports: claim the most overdue delivery, record its outcome, re-queue dead letters.

The retry schedule itself (backoff, when to give up) is policy and lives in
``node.export.policy``; this module only stores the ``retry_at`` it is handed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from storage.common import NO_SYNC, owned_by, rowcount, utc_now
from storage.db import Database, Export, ExportState, Result

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedExport:
    """A delivery this exporter now owns, of the SR or another object of the result (the
    result image: ``sr_sop_uid`` and ``sr_path`` are then its own); ``attempts`` includes
    this one."""

    export_id: int
    result_id: int
    study_uid: str
    sr_sop_uid: str
    sr_path: str
    destination: str
    attempts: int
    is_sr: bool = True  # False: another object of the result (its latency is not the SR's)


def claim_export(db: Database, worker_id: str, now: datetime | None = None
                 ) -> ClaimedExport | None:
    """Atomically take the most overdue pending export; ``attempts`` counts this try."""
    when = utc_now(now)
    pick = (select(Export.id)
            .where(Export.state == ExportState.PENDING.value, Export.next_attempt_at <= when)
            .order_by(Export.next_attempt_at, Export.id).limit(1)
            .with_for_update(skip_locked=True).scalar_subquery())
    stmt = (update(Export).where(Export.id == pick,
                                 Export.state == ExportState.PENDING.value)
            .values(state=ExportState.SENDING.value, claimed_by=worker_id, claimed_at=when,
                    heartbeat_at=when, attempts=Export.attempts + 1)
            .returning(Export.id, Export.result_id, Export.study_uid, Export.sr_sop_uid,
                       Export.destination, Export.attempts, Export.object_path)
            .execution_options(**NO_SYNC))
    with db.session() as s, s.begin():
        row = s.execute(stmt).one_or_none()
        if row is None:
            return None
        sr_path = row.object_path or s.execute(
            select(Result.sr_path).where(Result.id == row.result_id)).scalar_one()
    return ClaimedExport(export_id=row.id, result_id=row.result_id, study_uid=row.study_uid,
                         sr_sop_uid=row.sr_sop_uid, sr_path=sr_path,
                         destination=row.destination, attempts=row.attempts,
                         is_sr=row.object_path is None)


def renew_export_claims(db: Database, prefix: str, now: datetime | None = None) -> int:
    """Heartbeat: renew the lease of every export ``prefix`` (this process) is sending."""
    when = utc_now(now)
    with db.session() as s, s.begin():
        return rowcount(s.execute(update(Export)
                                  .where(Export.state == ExportState.SENDING.value,
                                         owned_by(Export.claimed_by, prefix))
                                  .values(heartbeat_at=when).execution_options(**NO_SYNC)))


def export_succeeded(db: Database, export_id: int, status: int, now: datetime | None = None,
                     sop_class_uid: str | None = None, sop_uid: str | None = None) -> None:
    """The destination acknowledged the SR: done for good. `sop_class_uid` and `sop_uid`:
    what it holds (the SR re-encoded in a class it accepts has its own UID; None: as
    stored)."""
    when = utc_now(now)
    with db.session() as s, s.begin():
        res = s.execute(update(Export).where(Export.id == export_id)
                        .values(state=ExportState.DONE.value, acked_at=when, last_status=status,
                                last_error=None, claimed_by=None, claimed_at=None,
                                delivered_sop_class_uid=sop_class_uid or None,
                                delivered_sop_uid=sop_uid or None)
                        .execution_options(**NO_SYNC))
        if rowcount(res) != 1:
            raise LookupError(f"no export with id {export_id}")


def export_failed(db: Database, export_id: int, error: str, status: int | None,
                  retry_at: datetime | None, now: datetime | None = None) -> None:
    """Not delivered: pending again at ``retry_at``, or dead-lettered when it is None.

    An export another exporter meanwhile delivered stays done (no second send).
    """
    utc_now(now)  # validated for a uniform signature; a failure stamps nothing
    values: dict[str, Any] = dict(last_error=error, last_status=status, claimed_by=None,
                                  claimed_at=None)
    if retry_at is None:
        values["state"] = ExportState.DEAD.value
    else:
        values.update(state=ExportState.PENDING.value, next_attempt_at=utc_now(retry_at))
    with db.session() as s, s.begin():
        res = s.execute(update(Export).where(Export.id == export_id,
                                             Export.state != ExportState.DONE.value)
                        .values(**values).execution_options(**NO_SYNC))
        if rowcount(res) == 1:
            return
        if s.get(Export, export_id) is None:
            raise LookupError(f"no export with id {export_id}")
    log.info("export %d failed on one path but was already delivered", export_id)


def requeue_dead_exports(db: Database, now: datetime | None = None) -> int:
    """Admin resend: every dead export is pending again with a fresh attempt budget."""
    when = utc_now(now)
    with db.session() as s, s.begin():
        res = s.execute(update(Export).where(Export.state == ExportState.DEAD.value)
                        .values(state=ExportState.PENDING.value, attempts=0,
                                next_attempt_at=when, claimed_by=None, claimed_at=None)
                        .execution_options(**NO_SYNC))
        return rowcount(res)


def release_stale_exports(db: Database, older_than_seconds: float,
                          now: datetime | None = None, prefix: str | None = None) -> int:
    """``sending`` rows left by a crash go back to pending, due now (attempts are kept):
    with a ``prefix``, this process's own; without, any whose lease ran out (no heartbeat
    for ``older_than_seconds``)."""
    when = utc_now(now)
    last_sign = func.coalesce(Export.heartbeat_at, Export.claimed_at)  # rows from before leases
    conds = [Export.state == ExportState.SENDING.value,
             last_sign <= when - timedelta(seconds=older_than_seconds)]
    if prefix is not None:
        conds.append(owned_by(Export.claimed_by, prefix))
    with db.session() as s, s.begin():
        n = rowcount(s.execute(update(Export).where(*conds)
                               .values(state=ExportState.PENDING.value, next_attempt_at=when,
                                       claimed_by=None, claimed_at=None, heartbeat_at=None)
                               .execution_options(**NO_SYNC)))
    if n:
        log.warning("released %d stale export claim(s)", n)
    return n
