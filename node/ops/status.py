"""`python -m node status`: what an admin checks first — studies, their states, exports, and
why a study is not classified (not_applicable: no whole-body planar view) or what was left out.

Compact by default so it fits an 80-column terminal (a study UID is shown by its ending, which
is what differs between studies of one site); `--wide` shows every column, `--json` the rows
as data for scripts. A result is several objects (the SR, the result image, the PDF report),
each delivered on its own: the compact table counts them ("3/3 sent"), `--wide` and `--json`
list each object with its delivery. Cells are never wrapped: a narrow terminal crops a cell
with an ellipsis instead of breaking "classified" over three lines. In a pipe (no terminal)
the width is COLUMNS if set, else 80.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table

from node.config import Config
from node.dicom.objects import object_kind
from node.service.drift import compute_drift, reference_text
from node.service.health import add_drift, health_report, summary_line
from storage.db import Database, ExportState
from storage.objects import ResultObject, result_objects
from storage.reports import StudySummary, queue_depth, study_summaries

APPLICABILITY_SHOWN = 200  # characters of a study's applicability reason in the wide table
DEFAULT_WIDTH = 80  # a pipe or a terminal that does not say its width
UID_TAIL = 12  # characters of a study UID's ending in the compact table
WIDE_WIDTH = 1000  # --wide: the table's natural width (cells never cropped or wrapped)
ROOMY_WIDTH = 120  # from this width on, the compact table shows whole UIDs and the last error
_SINCE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# which undelivered object a compact cell names: the one most in need of an admin
_STATE_URGENCY = (ExportState.DEAD, ExportState.SENDING, ExportState.PENDING)
Objects = dict[str, list[ResultObject]]  # study UID -> its latest result's objects


@dataclass(frozen=True)
class StatusFilter:
    """Which studies to show: a state, an age, a study UID (its ending is enough)."""

    state: str | None = None
    since: timedelta | None = None
    study: str | None = None
    limit: int = 200

    def keeps(self, row: StudySummary, now: datetime) -> bool:
        """True when `row` passes every filter given."""
        if self.state is not None and str(row.state) != self.state:
            return False
        if self.since is not None and now - row.last_instance_at > self.since:
            return False
        return self.study is None or row.study_uid.endswith(self.study)


def parse_since(text: str) -> timedelta:
    """'90s', '15m', '2h', '7d' -> timedelta; ValueError names the expected form."""
    m = _SINCE.match(text.strip())
    if m is None:
        raise ValueError(f"--since {text!r}: expected a number and s, m, h or d (e.g. 2h)")
    return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)])


def short_uid(uid: str, keep: int = UID_TAIL) -> str:
    """The ending of a UID, marked with an ellipsis when cut."""
    return uid if len(uid) <= keep else "…" + uid[-keep:]


def age_text(seconds: float) -> str:
    """A short age: 42s, 7m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(max(seconds, 0))}s"


def load_rows(cfg: Config, flt: StatusFilter, now: datetime
              ) -> tuple[list[StudySummary], dict[str, int]]:
    """Newest studies first (filtered), and the queue depth."""
    rows, depth, _objects = load_status(cfg, flt, now)
    return rows, depth


def load_status(cfg: Config, flt: StatusFilter, now: datetime
                ) -> tuple[list[StudySummary], dict[str, int], Objects]:
    """Newest studies first (filtered), the queue depth, and the shown studies' objects."""
    db = Database(cfg.database_url)
    db.create_all()
    try:
        rows = [r for r in study_summaries(db) if flt.keeps(r, now)][:flt.limit]
        depth = queue_depth(db)
        objects = result_objects(db, [r.study_uid for r in rows]) if rows else {}
    finally:
        db.dispose()
    return rows, depth, objects


def export_cell(r: StudySummary, objects: Sequence[ResultObject] = ()) -> str:
    """The compact export cell: "3/3 sent" when every object of the result was delivered,
    else the count and the most urgent state ("1/3 sent, dead×3"); a study without objects
    (none yet, or stored before objects were counted) shows its SR's export state."""
    if not objects:
        export = r.export_state or "-"
        if r.export_state and r.export_attempts and r.export_state != "done":
            export = f"{r.export_state}×{r.export_attempts}"
        return export
    sent = sum(o.state is ExportState.DONE for o in objects)
    cell = f"{sent}/{len(objects)} sent"
    for state in _STATE_URGENCY:
        stuck = [o for o in objects if o.state is state]
        if stuck:
            tries = max(o.attempts for o in stuck)
            return f"{cell}, {state.value}" + (f"×{tries}" if tries else "")
    return cell


def objects_text(objects: Sequence[ResultObject]) -> str:
    """The wide table's cell: each object's delivery, grouped by state so the table stays
    narrow ("done SR+PDF; dead×3 image"); attempts are the most any object of that state
    made."""
    parts = []
    for state in (ExportState.DONE, *_STATE_URGENCY):
        these = [o for o in objects if o.state is state]
        if not these:
            continue
        tries = max(o.attempts for o in these)
        count = f"×{tries}" if state is not ExportState.DONE and tries else ""
        kinds = "+".join(object_kind(o.path, o.is_sr) for o in these)
        parts.append(f"{state.value}{count} {kinds}")
    return "; ".join(parts) or "-"


def _table(title: str | None, caption: str | None) -> Table:
    return Table(title=title, caption=caption, box=None, pad_edge=False, expand=False,
                 show_edge=False, header_style="bold")


def _col(table: Table, name: str, ratio: int | None = None, justify: str = "left") -> None:
    table.add_column(name, no_wrap=True, overflow="ellipsis", ratio=ratio,
                     justify=justify)  # type: ignore[arg-type]


def compact_table(rows: Sequence[StudySummary], now: datetime,
                  width: int = DEFAULT_WIDTH, objects: Objects | None = None) -> Table:
    """Study UID ending, state, result, export, age: fits 80 columns. A terminal of
    `ROOMY_WIDTH` or more also gets whole UIDs and the last error (cropped to fit)."""
    roomy = width >= ROOMY_WIDTH
    table = _table(None, None)
    for name in ("study", "state", "result", "export", "age"):
        _col(table, name, justify="right" if name == "age" else "left")
    if roomy:
        _col(table, "last error")
    for r in rows:
        export = export_cell(r, (objects or {}).get(r.study_uid, ()))
        cells = [r.study_uid if roomy else short_uid(r.study_uid), str(r.state),
                 result_label(r), export,
                 age_text((now - r.last_instance_at).total_seconds())]
        if roomy:
            cells.append((r.last_error or "-")[:120])
        table.add_row(*cells)
    return table


def wide_table(rows: Sequence[StudySummary], now: datetime,
               objects: Objects | None = None) -> Table:
    """Every column, one line per study; printed at its natural width (see print_status).
    "export" and "tries" are the SR's; "objects" each object's delivery."""
    table = _table(None, None)
    for name in ("study", "state", "inst", "late", "views", "complete by", "result", "model",
                 "export", "tries", "objects", "next try", "age", "last error",
                 "applicability"):
        _col(table, name)
    for r in rows:
        table.add_row(
            r.study_uid, str(r.state), str(r.instance_count), str(r.late_instance_count),
            r.views or "-", r.completion_reason or "-", result_text(r),
            r.model_version or "-", r.export_state or "-", str(r.export_attempts or 0),
            objects_text((objects or {}).get(r.study_uid, ())),
            r.next_attempt_at.isoformat(timespec="seconds") if r.next_attempt_at else "-",
            age_text((now - r.last_instance_at).total_seconds()),
            (r.last_error or "-")[:80], (r.applicability_reason or "-")[:APPLICABILITY_SHOWN],
        )
    return table


def result_label(r: StudySummary) -> str:
    """The finding, with the result's version once amended ("normal v2")."""
    if r.predicted_class is None:
        return "-"
    amended = (r.result_version or 1) > 1
    return f"{r.predicted_class} v{r.result_version}" if amended else r.predicted_class


def result_text(r: StudySummary) -> str:
    """The finding and, as an "indeterminate" one still lists them, the probabilities."""
    if r.predicted_class is None:
        return "-"
    probs = " ".join(f"{k[:4]} {v:.2f}" for k, v in (r.probabilities or {}).items())
    return f"{result_label(r)} ({probs})" if probs else result_label(r)


def summary_text(rows: Sequence[StudySummary], depth: dict[str, int]) -> str:
    """One line: studies shown by state, then the queue depth."""
    states = Counter(str(r.state) for r in rows)
    shown = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
    queue = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in depth.items())
    return f"{len(rows)} study(ies) shown: {shown}; queue: {queue}"


def as_json(rows: Sequence[StudySummary], depth: dict[str, int], health: dict[str, Any],
            now: datetime, objects: Objects | None = None) -> str:
    """The rows, queue and health as one JSON document; each study lists its result's
    objects (kind, SOP Instance UID, delivery)."""
    def obj(o: ResultObject) -> dict[str, Any]:
        return {"kind": object_kind(o.path, o.is_sr), "sop_instance_uid": o.sop_uid,
                "state": o.state.value, "attempts": o.attempts, "last_error": o.last_error,
                "acked_at": _iso(o.acked_at)}

    def row(r: StudySummary) -> dict[str, Any]:
        return {"study_uid": r.study_uid, "state": str(r.state),
                "instances": r.instance_count, "late_instances": r.late_instance_count,
                "views": r.views, "completion_reason": r.completion_reason,
                "result": r.predicted_class, "result_version": r.result_version,
                "probabilities": r.probabilities,
                "model_version": r.model_version,
                "export_state": r.export_state, "export_attempts": r.export_attempts,
                "next_attempt_at": _iso(r.next_attempt_at), "last_error": r.last_error,
                "last_instance_at": _iso(r.last_instance_at), "acked_at": _iso(r.acked_at),
                "age_seconds": round((now - r.last_instance_at).total_seconds(), 1),
                "applicability_reason": r.applicability_reason,
                "objects": [obj(o) for o in (objects or {}).get(r.study_uid, [])]}
    return json.dumps({"studies": [row(r) for r in rows], "queue": depth, "health": health},
                      indent=2)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds")


def status_table(cfg: Config, limit: int = 200) -> Table:
    """Every column of the newest studies (what `--wide` prints)."""
    now = datetime.now(UTC)
    rows, _depth, objects = load_status(cfg, StatusFilter(limit=limit), now)
    return wide_table(rows, now, objects)


def health_of(cfg: Config) -> dict[str, Any]:
    """The health report (as GET /health says, without a model: the CLI loads none; drift
    computed now, where a node reads its last periodic verdict)."""
    db = Database(cfg.database_url)
    db.create_all()
    try:
        report = health_report(db, cfg, model=None, model_expected=False)
        if cfg.drift.check_seconds > 0:
            add_drift(report, compute_drift(db, cfg.drift, reference_text(
                None, None, cfg.drift.baseline_windows)))
        return report
    finally:
        db.dispose()


def health_summary(cfg: Config) -> str:
    """'health: ok|degraded', disk headroom and every problem (as GET /health says)."""
    return summary_line(health_of(cfg))


def make_console() -> Console:
    """A console as wide as the terminal; in a pipe COLUMNS or 80 (rich would assume 80
    too, but an explicit width keeps a redirected `status > file` predictable)."""
    console = Console(soft_wrap=False)
    if not console.is_terminal:
        width = os.environ.get("COLUMNS", "")
        console = Console(width=int(width) if width.isdigit() else DEFAULT_WIDTH,
                          soft_wrap=False, color_system=None)
    return console


def print_status(cfg: Config, flt: StatusFilter | None = None, wide: bool = False,
                 as_data: bool = False) -> None:
    """Print the table, a summary line and the health summary (or it all as JSON)."""
    now = datetime.now(UTC)
    rows, depth, objects = load_status(cfg, flt or StatusFilter(), now)
    health = health_of(cfg)
    if as_data:
        print(as_json(rows, depth, health, now, objects))
        return
    console = make_console()
    if rows and wide:  # every column whole, one line per study: for `less -S` or a wide window
        Console(width=WIDE_WIDTH, soft_wrap=False, force_terminal=console.is_terminal,
                color_system="auto" if console.is_terminal else None
                ).print(wide_table(rows, now, objects))
    elif rows:
        console.print(compact_table(rows, now, console.width, objects))
    console.print(summary_text(rows, depth), markup=False, highlight=False, overflow="fold")
    console.print(summary_line(health), markup=False, highlight=False, overflow="fold")
