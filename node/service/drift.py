"""Drift: is this window's input (and what the model makes of it) like what came before?

Per characteristic (storage.drift.CHARACTERISTICS: predicted classes, indeterminate share,
manufacturer, matrix, pixel spacing, counts per view) the current window's distribution is
compared with a baseline by total variation distance: half the sum of the absolute
differences of the shares, 0 (same) to 1 (disjoint), read as the share of studies that
would have to change category. Past `[drift].threshold`, and past the characteristic's usual
variation (the largest distance of a previous window from the other previous windows), the
characteristic has drifted.

The baseline: the model's metadata records what it was trained on in words only (no
distribution of classes or inputs), so the current window is compared with the previous
`[drift].baseline_windows` windows pooled, and the report says so. With fewer than
`[drift].min_studies` studies on either side there is no verdict (noise, not drift).

A running node recomputes this every `[drift].check_seconds` (`DriftMonitor`), not per
request: GET /health reads the latest verdict. `python -m node status --drift` prints it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from model.calibration import INDETERMINATE
from node.config import DriftSection
from storage.db import Database
from storage.drift import CHARACTERISTICS, WindowCounts, window_counts

log = logging.getLogger(__name__)

SHOWN_CATEGORIES = 3  # categories named per side in a problem line or a table cell

DRIFT = "drift"
NO_DRIFT = "no drift"
NO_VERDICT = "no verdict"


@dataclass(frozen=True)
class Comparison:
    """One characteristic: the current window's shares against the baseline's."""

    characteristic: str
    distance: float | None  # total variation distance; None when a side has no study
    current: dict[str, float]
    baseline: dict[str, float]
    drifted: bool
    usual: float | None = None  # the largest distance of a previous window from the others


@dataclass(frozen=True)
class PreviousWindow:
    """A baseline window, and how far it lies from the other baseline windows pooled, per
    characteristic (the usual week-to-week variation)."""

    counts: WindowCounts
    distances: dict[str, float]

    @property
    def largest(self) -> tuple[str, float] | None:
        """The characteristic in which this window stood furthest from the others."""
        return max(self.distances.items(), key=lambda kv: kv[1], default=None)


@dataclass(frozen=True)
class DriftReport:
    """The comparison as computed at `computed_at`."""

    computed_at: datetime
    window_days: float
    threshold: float
    min_studies: int
    current: WindowCounts
    baseline_studies: int
    previous: tuple[PreviousWindow, ...]
    comparisons: tuple[Comparison, ...]
    reference: str
    verdict: str
    reason: str  # why no verdict, or which characteristics drifted

    def drifted(self) -> list[Comparison]:
        """The characteristics past the threshold (empty without a verdict)."""
        return [c for c in self.comparisons if c.drifted] if self.verdict == DRIFT else []


def shares(counts: Counter[str]) -> dict[str, float]:
    """Counts as shares of their total, largest first; empty for no counts."""
    total = sum(counts.values())
    return {k: v / total for k, v in counts.most_common()} if total else {}


def total_variation(a: Counter[str], b: Counter[str]) -> float | None:
    """Half the L1 distance between the two distributions; None when one is empty."""
    pa, pb = shares(a), shares(b)
    if not pa or not pb:
        return None
    return 0.5 * sum(abs(pa.get(k, 0.0) - pb.get(k, 0.0)) for k in set(pa) | set(pb))


def pooled(windows: list[WindowCounts]) -> dict[str, Counter[str]]:
    """Category counts of several windows added together."""
    out: dict[str, Counter[str]] = {c: Counter() for c in CHARACTERISTICS}
    for w in windows:
        for c in CHARACTERISTICS:
            out[c].update(w.categories.get(c, Counter()))
    return out


def reference_text(model: str | None, training_data: str | None, windows: int) -> str:
    """What the current window is compared with, in words (the model's own description
    quoted: it holds no distribution to compare with)."""
    what = f"model {model}" if model else "the served model"
    said = f" (trained on: {training_data})" if training_data else ""
    return (f"{what}{said}: its metadata records no distribution of classes or inputs, so "
            f"the current window is compared with the previous {windows} window(s)")


def compute_drift(db: Database, cfg: DriftSection, reference: str,
                  now: datetime | None = None) -> DriftReport:
    """Count the current and the previous windows and compare them."""
    when = now or datetime.now(UTC)
    span = timedelta(days=cfg.window_days)
    current = window_counts(db, when - span, when, INDETERMINATE)
    previous = [window_counts(db, when - (i + 1) * span, when - i * span, INDETERMINATE)
                for i in range(1, cfg.baseline_windows + 1)]
    base = pooled(previous)
    base_studies = sum(w.studies for w in previous)
    earlier = _previous(previous)
    verdict, reason = _verdict(current.studies, base_studies, cfg.min_studies)
    comparisons = []
    for c in CHARACTERISTICS:
        distance = total_variation(current.categories[c], base[c])
        usual = max((p.distances[c] for p in earlier if c in p.distances), default=None)
        comparisons.append(Comparison(
            c, distance, shares(current.categories[c]), shares(base[c]),
            verdict != NO_VERDICT and _beyond(distance, cfg.threshold, usual), usual))
    if verdict != NO_VERDICT:
        drifted = [c for c in comparisons if c.drifted]
        verdict = DRIFT if drifted else NO_DRIFT
        reason = "; ".join(_describe(c) for c in drifted) if drifted else \
            f"every characteristic within {cfg.threshold:.2f} or its usual variation"
    return DriftReport(when, cfg.window_days, cfg.threshold, cfg.min_studies, current,
                       base_studies, tuple(earlier), tuple(comparisons), reference, verdict,
                       reason)


def _beyond(distance: float | None, threshold: float, usual: float | None) -> bool:
    """Drifted: further than the threshold, and further than any previous window was from
    the others (a characteristic that varies that much from week to week is noise there)."""
    return distance is not None and distance > threshold and \
        (usual is None or distance > usual)


def _verdict(current: int, baseline: int, needed: int) -> tuple[str, str]:
    """NO_VERDICT with the reason when either side is too small; else '' (to be decided)."""
    if current < needed:
        return NO_VERDICT, f"{current} study(ies) in the current window, {needed} needed"
    if baseline < needed:
        return NO_VERDICT, f"{baseline} study(ies) in the previous windows, {needed} needed"
    return "", ""


def _previous(windows: list[WindowCounts]) -> list[PreviousWindow]:
    """Each baseline window against the others pooled, per characteristic (none where a
    side is empty: a single window with studies has no usual variation)."""
    out = []
    for i, w in enumerate(windows):
        others = pooled(windows[:i] + windows[i + 1:])
        distances = {c: d for c in CHARACTERISTICS
                     if (d := total_variation(w.categories.get(c, Counter()), others[c]))
                     is not None}
        out.append(PreviousWindow(w, distances))
    return out


def top(share: dict[str, float], n: int = SHOWN_CATEGORIES) -> str:
    """The largest categories with their percentages: "GE 80%, Siemens 20%"."""
    return ", ".join(f"{k} {v:.0%}" for k, v in list(share.items())[:n]) or "-"


def _describe(c: Comparison) -> str:
    return f"{c.characteristic} {c.distance or 0:.2f} ({top(c.current)}; was {top(c.baseline)})"


def problem_line(report: DriftReport) -> str | None:
    """The /health problem when drift was found, in words an admin can act on; else None."""
    if report.verdict != DRIFT:
        return None
    return (f"input drift over the last {report.window_days:g} d ({report.current.studies} "
            f"studies vs {report.baseline_studies} in the previous windows; distance > "
            f"{report.threshold:.2f}): {report.reason}. Check the cameras' protocols and the "
            "model's results; `python -m node status --drift` shows the comparison")


def as_data(report: DriftReport) -> dict[str, Any]:
    """The report as JSON-ready data (counts and shares: no patient data)."""
    return {
        "verdict": report.verdict, "reason": report.reason,
        "computed_at": report.computed_at.isoformat(timespec="seconds"),
        "window_days": report.window_days, "threshold": report.threshold,
        "min_studies": report.min_studies, "current_studies": report.current.studies,
        "baseline_studies": report.baseline_studies, "reference": report.reference,
        "characteristics": {c.characteristic: {
            "distance": None if c.distance is None else round(c.distance, 4),
            "usual": None if c.usual is None else round(c.usual, 4),
            "drifted": c.drifted, "current": {k: round(v, 4) for k, v in c.current.items()},
            "baseline": {k: round(v, 4) for k, v in c.baseline.items()}}
            for c in report.comparisons},
    }


class DriftMonitor:
    """The latest drift report of a running node, recomputed by its scheduler; GET /health
    reads it. `refresh` never raises (the scheduler must keep running)."""

    def __init__(self, db: Database, cfg: DriftSection, reference: Callable[[], str]) -> None:
        """Nothing is computed until the first `refresh`; `reference` describes the model
        served at that time (a promotion changes it)."""
        self._db, self._cfg, self._reference = db, cfg, reference
        self._lock = threading.Lock()
        self._latest: DriftReport | None = None
        self._alarmed = False

    def refresh(self, now: datetime | None = None) -> DriftReport | None:
        """Recompute; a verdict change is logged once (counts, no patient data)."""
        try:
            report = compute_drift(self._db, self._cfg, self._reference(), now)
        except Exception:
            log.exception("drift check failed")
            return None
        with self._lock:
            self._latest = report
            alarmed, self._alarmed = self._alarmed, report.verdict == DRIFT
        if report.verdict == DRIFT and not alarmed:
            log.warning("input drift: %s", report.reason)
        elif alarmed and report.verdict != DRIFT:
            log.info("input drift over: %s (%s)", report.verdict, report.reason)
        return report

    def latest(self) -> DriftReport | None:
        """The last computed report (None before the first)."""
        with self._lock:
            return self._latest
