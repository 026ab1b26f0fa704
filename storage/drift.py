"""Drift inputs: what each classified study looked like (``study_profiles``), and the
distributions of one time window, for the comparison in node.service.drift.

A profile is written with the served result (storage.jobs.store_result), in the same
transaction; a study classified again replaces its profile. Counts per view are banded on a
logarithmic scale (half decades) so that a camera's or a protocol's change of dose or
acquisition time moves studies between bands while the usual spread stays within one or two.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.common import utc_now
from storage.db import Database, StudyProfile

log = logging.getLogger(__name__)

STREAM_ROWS = 500  # rows fetched at a time while a window is counted: memory stays bounded
TEXT_MAX = 64  # a header value as stored (manufacturer); longer ones are cut
NONE = "(none)"  # an attribute the headers did not carry

PREDICTED = "predicted class"
INDETERMINATE = "indeterminate share"
MANUFACTURER = "manufacturer"
MATRIX = "matrix"
SPACING = "pixel spacing"
COUNTS_ANTERIOR = "counts per anterior view"
COUNTS_POSTERIOR = "counts per posterior view"
CHARACTERISTICS = (PREDICTED, INDETERMINATE, MANUFACTURER, MATRIX, SPACING, COUNTS_ANTERIOR,
                   COUNTS_POSTERIOR)


@dataclass(frozen=True)
class StudyInputs:
    """A classified study's input characteristics (device attributes and count sums only)."""

    manufacturer: str = ""
    matrix: str = ""  # "1024x256": rows x columns of the views
    pixel_spacing: str = ""  # "2.40x2.40" mm
    views: int = 0
    counts_anterior: float | None = None  # mean total counts of its anterior views
    counts_posterior: float | None = None


@dataclass(frozen=True)
class WindowCounts:
    """One window's studies and, per characteristic, how many fell in each category."""

    start: datetime
    end: datetime
    studies: int = 0
    categories: dict[str, Counter[str]] = field(default_factory=dict)


def counts_band(value: float | None) -> str:
    """A view's total counts as a half-decade band ("1e+05-3e+05"); NONE without a view."""
    if value is None or not math.isfinite(value):
        return NONE
    if value < 1:
        return "<1"
    half = math.floor(2 * math.log10(value))
    low, high = 10 ** (half / 2), 10 ** ((half + 1) / 2)
    return f"{low:.0e}-{high:.0e}"


def write_profile(s: Session, study_uid: str, inputs: StudyInputs, predicted_class: str,
                  model_version: str, when: datetime) -> None:
    """Insert or replace a study's profile inside the caller's transaction."""
    row = s.get(StudyProfile, study_uid)
    if row is None:
        row = StudyProfile(study_uid=study_uid)
        s.add(row)
    row.recorded_at = when
    row.model_version = model_version
    row.predicted_class = predicted_class[:TEXT_MAX]
    row.manufacturer = inputs.manufacturer[:TEXT_MAX]
    row.matrix = inputs.matrix[:32]
    row.pixel_spacing = inputs.pixel_spacing[:32]
    row.views = inputs.views
    row.counts_anterior = inputs.counts_anterior
    row.counts_posterior = inputs.counts_posterior


def window_counts(db: Database, start: datetime, end: datetime,
                  indeterminate: str) -> WindowCounts:
    """Category counts of the studies profiled in [start, end). `indeterminate` is the
    finding's name (the model's vocabulary): it counts towards the indeterminate share,
    never towards the predicted classes, which are the determinate findings' spread."""
    start, end = utc_now(start), utc_now(end)
    cats: dict[str, Counter[str]] = {c: Counter() for c in CHARACTERISTICS}
    studies = 0
    stmt = (select(StudyProfile.predicted_class, StudyProfile.manufacturer,
                   StudyProfile.matrix, StudyProfile.pixel_spacing,
                   StudyProfile.counts_anterior, StudyProfile.counts_posterior)
            .where(StudyProfile.recorded_at >= start, StudyProfile.recorded_at < end)
            .execution_options(yield_per=STREAM_ROWS))
    with db.read_session() as s:
        for predicted, maker, matrix, spacing, ant, post in s.execute(stmt):
            studies += 1
            undecided = predicted == indeterminate
            cats[INDETERMINATE]["indeterminate" if undecided else "determinate"] += 1
            if not undecided:
                cats[PREDICTED][predicted or NONE] += 1
            cats[MANUFACTURER][maker or NONE] += 1
            cats[MATRIX][matrix or NONE] += 1
            cats[SPACING][spacing or NONE] += 1
            cats[COUNTS_ANTERIOR][counts_band(ant)] += 1
            cats[COUNTS_POSTERIOR][counts_band(post)] += 1
    return WindowCounts(start, end, studies, cats)


def first_profile_at(db: Database) -> datetime | None:
    """When the oldest profile was written (None: no study profiled yet)."""
    with db.read_session() as s:
        return s.execute(select(func.min(StudyProfile.recorded_at))).scalar_one_or_none()
