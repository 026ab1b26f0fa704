"""`python -m node status --drift`: this window's predicted classes and input characteristics
against the previous windows (node.service.drift), as a table or JSON.

The command computes the comparison itself (a running node's /health shows the verdict it
computed last, which may be up to `[drift].check_seconds` older). The model named as the
reference is the registry's serving version (no model file is loaded: `status` stays fast).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from node.config import Config
from node.ops.status import make_console
from node.service.drift import (
    DRIFT,
    DriftReport,
    as_data,
    compute_drift,
    reference_text,
    top,
)
from storage.db import Database
from storage.registry import serving_model

log = logging.getLogger(__name__)

TIME = "%Y-%m-%d %H:%M"


def drift_report(cfg: Config, now: datetime | None = None) -> DriftReport:
    """Compute the comparison now, naming the registry's serving model as the reference."""
    db = Database(cfg.database_url)
    db.create_all()
    try:
        rec = serving_model(db)
        reference = reference_text(rec.version if rec else None,
                                   rec.data_description if rec else None,
                                   cfg.drift.baseline_windows)
        return compute_drift(db, cfg.drift, reference, now)
    finally:
        db.dispose()


def drift_table(report: DriftReport) -> Table:
    """One row per characteristic: distance, the current window's and the baseline's
    largest categories; drifted rows marked."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for name, justify in (("characteristic", "left"), ("distance", "right"),
                          ("usual", "right"), ("", "left"), ("this window", "left"),
                          ("previous windows", "left")):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for c in report.comparisons:
        table.add_row(c.characteristic, _num(c.distance), _num(c.usual),
                      "DRIFT" if c.drifted else "", top(c.current), top(c.baseline),
                      style="bold red" if c.drifted else None)
    return table


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def header_lines(report: DriftReport) -> list[str]:
    """The verdict, the windows compared and the reference, in words."""
    cur = report.current
    lines = [f"drift: {report.verdict.upper() if report.verdict == DRIFT else report.verdict}"
             f" — {report.reason}",
             f"this window: {cur.start.strftime(TIME)} to {cur.end.strftime(TIME)} UTC "
             f"({report.window_days:g} d), {cur.studies} studies; previous windows: "
             f"{len(report.previous)}, {report.baseline_studies} studies; threshold "
             f"{report.threshold:.2f} (total variation distance; and beyond the usual "
             f"variation: a previous window's largest distance from the others), at least "
             f"{report.min_studies} studies a side",
             f"reference: {report.reference}"]
    return lines


def previous_lines(report: DriftReport) -> list[str]:
    """Each previous window: its studies and how far it lies from the other previous
    windows (the usual variation, to read the distances above against)."""
    out = []
    for p in report.previous:
        w, largest = p.counts, p.largest
        spread = "-" if largest is None else \
            f"at most {largest[1]:.2f} ({largest[0]}) from the others"
        out.append(f"  {w.start.strftime(TIME)} to {w.end.strftime(TIME)}: {w.studies} "
                   f"studies, {spread}")
    return out


def print_drift(cfg: Config, as_json: bool = False, now: datetime | None = None,
                console: Console | None = None) -> int:
    """Print the comparison; exit status 1 when drift was found (for scripts), else 0."""
    report = drift_report(cfg, now or datetime.now(UTC))
    if as_json:
        print(json.dumps(as_data(report), indent=2))
    else:
        out = console or make_console()
        for line in header_lines(report):
            out.print(line, markup=False, highlight=False, overflow="fold")
        out.print(drift_table(report))
        out.print("previous windows:", markup=False, highlight=False)
        for line in previous_lines(report):
            out.print(line, markup=False, highlight=False, overflow="fold")
    return 1 if report.verdict == DRIFT else 0
