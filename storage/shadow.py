"""Shadow trials: a registered candidate run on live studies beside the serving model, its
results stored here and never exported, so a physicist sees how it would have done on this
site's camera before promoting it.

One trial runs at a time (`start_shadow` stops the one before). A shadow result sits beside
what the serving model said about the same study (its latest result), and `shadow_summary`
compares the two: agreement, the confusion between them, latency, and accuracy of both
against the physicians' feedback where a label exists.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from statistics import median

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.common import NO_SYNC, retry_on_conflict, utc_now
from storage.db import Database, Result, ShadowResult, ShadowTrial

log = logging.getLogger(__name__)

RUNNING, STOPPED = "running", "stopped"
ERROR_MAX = 300  # characters of a failure's reason kept


@dataclass(frozen=True)
class ServingResult:
    """What the serving model said about a study (its latest result)."""

    version: str
    predicted_class: str


@dataclass(frozen=True)
class NewShadowResult:
    """One shadow run of one study; `predicted_class` None and `error` set when it failed."""

    study_uid: str
    version: str
    serving: ServingResult
    predicted_class: str | None
    probabilities: Mapping[str, float]
    latency_ms: int
    error: str | None = None


@dataclass(frozen=True)
class ShadowSummary:
    """A shadow version against the serving model, over the studies both classified."""

    version: str
    studies: int  # shadow results with a class
    failed: int  # shadow runs that failed
    agreed: int
    confusion: dict[tuple[str, str], int] = field(default_factory=dict)  # (serving, shadow)
    median_ms: float | None = None
    p95_ms: float | None = None
    with_feedback: int = 0  # studies with a physician's label
    shadow_correct: int = 0
    serving_correct: int = 0

    @property
    def agreement(self) -> float | None:
        """Share of studies where both said the same class; None before the first."""
        return self.agreed / self.studies if self.studies else None

    @property
    def shadow_accuracy(self) -> float | None:
        """Shadow against feedback; None without any labelled study."""
        return self.shadow_correct / self.with_feedback if self.with_feedback else None

    @property
    def serving_accuracy(self) -> float | None:
        """The serving model against feedback on the same studies."""
        return self.serving_correct / self.with_feedback if self.with_feedback else None


def active_shadow(db: Database) -> str | None:
    """The version in shadow now, None when no trial runs."""
    with db.read_session() as s:
        return s.execute(select(ShadowTrial.version).where(ShadowTrial.state == RUNNING)
                         ).scalar_one_or_none()


def start_shadow(db: Database, version: str, now: datetime | None = None) -> str | None:
    """Run `version` in shadow from now on; the trial running before (if another) stops.
    Returns the version that was in shadow before, if any. The caller checks that the
    version is registered (storage never loads models)."""
    when = utc_now(now)

    def attempt() -> str | None:
        with db.session() as s, s.begin():
            before = s.execute(select(ShadowTrial).where(ShadowTrial.state == RUNNING)
                               .with_for_update()).scalar_one_or_none()
            if before is not None and before.version == version:
                return version
            previous = before.version if before is not None else None
            _stop(s, when)
            s.flush()
            s.add(ShadowTrial(version=version, state=RUNNING, started_at=when))
            return previous

    previous = retry_on_conflict(attempt, "start_shadow")
    log.info("model %s runs in shadow%s", version,
             f" (instead of {previous})" if previous and previous != version else "")
    return previous


def stop_shadow(db: Database, now: datetime | None = None) -> str | None:
    """Stop the running trial; the version that ran, None when none did."""
    when = utc_now(now)
    with db.session() as s, s.begin():
        version = s.execute(select(ShadowTrial.version).where(ShadowTrial.state == RUNNING)
                            ).scalar_one_or_none()
        _stop(s, when)
    if version is not None:
        log.info("shadow trial of model %s stopped", version)
    return version


def _stop(s: Session, when: datetime) -> None:
    s.execute(update(ShadowTrial).where(ShadowTrial.state == RUNNING)
              .values(state=STOPPED, stopped_at=when).execution_options(**NO_SYNC))


def serving_result(db: Database, study_uid: str) -> ServingResult | None:
    """The serving model's latest result for the study, None when it has none."""
    with db.read_session() as s:
        row = s.execute(select(Result.model_version, Result.predicted_class)
                        .where(Result.study_uid == study_uid)
                        .order_by(Result.id.desc()).limit(1)).one_or_none()
    return ServingResult(str(row[0]), str(row[1])) if row is not None else None


def store_shadow_result(db: Database, r: NewShadowResult, now: datetime | None = None
                        ) -> bool:
    """Store one shadow run; False when this version already has a result for the study
    (a study classified again is not counted twice)."""
    row = ShadowResult(
        study_uid=r.study_uid, version=r.version, serving_version=r.serving.version,
        serving_class=r.serving.predicted_class, predicted_class=r.predicted_class,
        probabilities=json.dumps(dict(r.probabilities), sort_keys=True),
        latency_ms=max(int(r.latency_ms), 0),
        error=r.error[:ERROR_MAX] if r.error else None, created_at=utc_now(now))
    try:
        with db.session() as s, s.begin():
            if s.execute(select(ShadowResult.id).where(
                    ShadowResult.study_uid == r.study_uid,
                    ShadowResult.version == r.version)).first() is not None:
                return False
            s.add(row)
    except IntegrityError:  # a concurrent store of the same pair won
        return False
    return True


def shadow_versions(db: Database) -> list[str]:
    """Every version that has run in shadow, most recent trial first."""
    with db.read_session() as s:
        rows = s.execute(select(ShadowTrial.version, ShadowTrial.id)
                         .order_by(ShadowTrial.id.desc())).all()
    return list(dict.fromkeys(str(v) for v, _ in rows))


def shadow_summary(db: Database, version: str, feedback: Mapping[str, str] | None = None
                   ) -> ShadowSummary:
    """How `version` did in shadow against the serving model; `feedback` (study UID ->
    the physician's class) adds accuracy of both on the labelled studies."""
    with db.read_session() as s:
        rows = s.execute(select(ShadowResult.study_uid, ShadowResult.serving_class,
                                ShadowResult.predicted_class, ShadowResult.latency_ms)
                         .where(ShadowResult.version == version)).all()
    labels = feedback or {}
    done = [(str(u), str(a), str(b), int(ms)) for u, a, b, ms in rows if b is not None]
    confusion = Counter((a, b) for _, a, b, _ in done)
    latencies = sorted(ms for *_, ms in done)
    labelled = [(labels[u], a, b) for u, a, b, _ in done if u in labels]
    return ShadowSummary(
        version=version, studies=len(done), failed=len(rows) - len(done),
        agreed=sum(n for (a, b), n in confusion.items() if a == b),
        confusion=dict(confusion),
        median_ms=float(median(latencies)) if latencies else None,
        p95_ms=float(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))])
        if latencies else None,
        with_feedback=len(labelled),
        shadow_correct=sum(label == b for label, _, b in labelled),
        serving_correct=sum(label == a for label, a, _ in labelled))
