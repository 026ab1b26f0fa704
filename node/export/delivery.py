"""Export loop of the result objects (SR, result image, PDF): C-STORE to PACS until
acknowledged, with capped exponential backoff and a
dead-letter state after the configured number of attempts (or at once for permanent refusals);
the schedule is decided in `node.export.policy`.

A claimed export always ends done, pending with a retry time, or dead: an SR file that is
missing or unreadable is dead-lettered at once with that reason (`scu.send_file` answers every
failure with an outcome). Only when the database itself cannot record the outcome does the row
stay ``sending``, until the stale-claim sweep gives it back to the queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydicom.uid import UID

from node.config import ExportSection
from node.export.policy import next_attempt
from node.export.scu import Destination, SendOutcome, send_file
from storage.db import Database
from storage.exports import ClaimedExport, claim_export, export_failed, export_succeeded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportContext:
    """Dependencies of the exporter, handed in explicitly."""

    db: Database
    destination: Destination
    calling_ae: str
    policy: ExportSection
    # observer (metrics, alerts) of each attempt's outcome: "delivered", "retry" or "dead",
    # with the export and its error (None when delivered); it must not raise
    on_outcome: Callable[[ClaimedExport, str, str | None], None] = lambda _j, _o, _e: None


def deliver(ctx: ExportContext, job: ClaimedExport) -> SendOutcome:
    """One attempt for one claimed export. Its bookkeeping is committed the moment PACS
    answers, before the association is released: a crash during the release cannot make an
    acknowledged SR go out again."""
    recorded: list[SendOutcome] = []

    def record(outcome: SendOutcome) -> None:
        recorded.append(outcome)
        _bookkeep(ctx, job, outcome)

    outcome = send_file(Path(job.sr_path), ctx.destination, ctx.calling_ae,
                        ctx.policy.timeout_seconds, on_answer=record)  # never raises
    if not recorded:  # no association, so no answer: record the failure now
        record(outcome)
    return outcome


def _bookkeep(ctx: ExportContext, job: ClaimedExport, outcome: SendOutcome) -> None:
    """Done, retry later, or dead letter; logged."""
    now = datetime.now(UTC)
    if outcome.acknowledged:
        export_succeeded(ctx.db, job.export_id, outcome.status or 0, now=now,
                         sop_class_uid=outcome.sop_class_uid, sop_uid=outcome.sop_uid)
        as_sent = "" if outcome.sop_uid in ("", job.sr_sop_uid) else \
            f" as {UID(outcome.sop_class_uid).name} {outcome.sop_uid}"
        log.info("result object %s of study %s acknowledged by %s%s (status 0x%04X)",
                 job.sr_sop_uid, job.study_uid, job.destination, as_sent, outcome.status or 0)
        ctx.on_outcome(job, "delivered", None)
        return
    retry_at = next_attempt(ctx.policy, job.attempts, outcome, now)
    export_failed(ctx.db, job.export_id, outcome.error, outcome.status, retry_at, now=now)
    ctx.on_outcome(job, "dead" if retry_at is None else "retry", outcome.error)
    if retry_at is None:
        log.error("result object %s of study %s dead-lettered after %d attempt(s): %s",
                  job.sr_sop_uid, job.study_uid, job.attempts, outcome.error)
    else:
        log.warning("result object %s of study %s not delivered (attempt %d): %s; retry at %s",
                    job.sr_sop_uid, job.study_uid, job.attempts, outcome.error,
                    retry_at.isoformat(timespec="seconds"))


def run_forever(ctx: ExportContext, worker_id: str, wake: threading.Event,
                stop: threading.Event, idle_seconds: float = 1.0) -> None:
    """Deliver due exports until stopped; woken early when a result is stored."""
    while not stop.is_set():
        try:
            job = claim_export(ctx.db, worker_id)
            if job is not None:
                deliver(ctx, job)
                continue
        except Exception:
            log.exception("exporter %s: unexpected error", worker_id)
        wake.wait(idle_seconds)
        wake.clear()
