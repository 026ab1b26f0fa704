"""Physician feedback: the conclusion a physician reached for a study, one label per study.

Labels are stored as given; which names are valid is the model's business, so the command
that records them (node.ops.feedback) checks them (storage never imports model/). Nothing
about who entered a label is stored. A later label for the same study replaces the earlier.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from storage.common import retry_on_conflict, utc_now
from storage.db import UID, Database, Feedback, Result, ShadowResult, Study

log = logging.getLogger(__name__)

LABEL_MAX = 64  # the column's width
IN_CHUNK = 500  # UIDs per IN (...) list: well under every backend's parameter limit


@dataclass(frozen=True)
class Agreement:
    """How often one model version's finding matched the physicians' labels: `agree` of
    `compared` determinate findings; `undecided` indeterminate ones (neither right nor
    wrong); `shadow` when the findings come from a shadow trial (never reported)."""

    version: str
    shadow: bool
    compared: int
    agree: int
    undecided: int

    @property
    def rate(self) -> float | None:
        """Share of determinate findings that matched (None: nothing compared)."""
        return self.agree / self.compared if self.compared else None


def _check(study_uid: str, label: str) -> None:
    """Refuse what the columns cannot hold before a transaction is opened."""
    if not study_uid or len(study_uid) > UID:
        raise ValueError(f"study UID must be 1 to {UID} characters")
    if not label or len(label) > LABEL_MAX:
        raise ValueError(f"label must be 1 to {LABEL_MAX} characters")


def record_feedback(db: Database, study_uid: str, label: str,
                    now: datetime | None = None) -> None:
    """Record `label` for `study_uid`, replacing an earlier label for it."""
    record_many(db, [(study_uid, label)], now)


def feedback_labels(db: Database) -> dict[str, str]:
    """Every study's current label: {study_uid: label}."""
    with db.read_session() as s:
        rows = s.execute(select(Feedback.study_uid, Feedback.label)).all()
    return {uid: label for uid, label in rows}


def record_many(db: Database, labels: Iterable[tuple[str, str]],
                now: datetime | None = None) -> tuple[int, int]:
    """Record (study UID, label) pairs in one transaction (all or none; a later pair for the
    same study wins); returns (new, replaced)."""
    pairs = dict(labels)
    for uid, label in pairs.items():
        _check(uid, label)
    when = utc_now(now)

    def attempt() -> tuple[int, int]:
        new = replaced = 0
        with db.session() as s, s.begin():
            for uid, label in pairs.items():
                row = s.get(Feedback, uid)
                if row is None:
                    s.add(Feedback(study_uid=uid, label=label, recorded_at=when))
                    new += 1
                else:
                    row.label, row.recorded_at = label, when
                    replaced += 1
        return new, replaced

    return retry_on_conflict(attempt, "record feedback")


def known_studies(db: Database, uids: Iterable[str]) -> set[str]:
    """Which of `uids` the node has received (feedback may come before a study)."""
    wanted = list(dict.fromkeys(uids))
    found: set[str] = set()
    with db.read_session() as s:
        for i in range(0, len(wanted), IN_CHUNK):
            chunk = wanted[i:i + IN_CHUNK]
            found.update(s.execute(select(Study.study_uid)
                                   .where(Study.study_uid.in_(chunk))).scalars())
    return found


def agreement(db: Database, indeterminate: str) -> list[Agreement]:
    """Per model version, its findings against the feedback labels: the served results (a
    study's latest result per version) and the shadow trials' findings. `indeterminate` is
    the finding's name in the model's vocabulary."""
    latest = select(func.max(Result.id)).group_by(Result.study_uid, Result.model_version)
    served = (select(Result.model_version, Result.predicted_class, Feedback.label)
              .join(Feedback, Feedback.study_uid == Result.study_uid)
              .where(Result.id.in_(latest)))
    shadow = (select(ShadowResult.version, ShadowResult.predicted_class, Feedback.label)
              .join(Feedback, Feedback.study_uid == ShadowResult.study_uid)
              .where(ShadowResult.predicted_class.is_not(None)))
    tallies: dict[tuple[str, bool], list[int]] = {}
    with db.read_session() as s:
        for is_shadow, stmt in ((False, served), (True, shadow)):
            for version, predicted, label in s.execute(stmt):
                t = tallies.setdefault((version, is_shadow), [0, 0, 0])
                if predicted == indeterminate:
                    t[2] += 1
                else:
                    t[0] += 1
                    t[1] += predicted == label
    return [Agreement(v, sh, *t) for (v, sh), t in sorted(tallies.items())]
