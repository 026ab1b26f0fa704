"""`python -m node status`: what an admin checks first — studies, their states, exports, and
why a study is not classified (not_applicable: no whole-body planar view) or what was left out."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from node.config import Config
from node.service.health import health_report, summary_line
from storage.db import Database
from storage.reports import queue_depth, study_summaries

APPLICABILITY_SHOWN = 200  # characters of a study's applicability reason in the table


def _short(uid: str, keep: int = 18) -> str:
    return uid if len(uid) <= keep else "…" + uid[-keep:]


def status_table(cfg: Config, limit: int = 200) -> Table:
    """Newest studies first."""
    db = Database(cfg.database_url)
    db.create_all()
    try:
        rows = study_summaries(db)[:limit]
        depth = queue_depth(db)
    finally:
        db.dispose()
    table = Table(title="dscint-node studies", caption=" · ".join(
        f"{k.replace('_', ' ')}: {v}" for k, v in depth.items()))
    for col in ("study", "state", "inst", "late", "views", "complete by", "result", "model",
                "export", "tries", "next try", "last error", "applicability"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            _short(r.study_uid), r.state, str(r.instance_count), str(r.late_instance_count),
            r.views or "-", r.completion_reason or "-", r.predicted_class or "-",
            r.model_version or "-", r.export_state or "-", str(r.export_attempts or 0),
            r.next_attempt_at.isoformat(timespec="seconds") if r.next_attempt_at else "-",
            (r.last_error or "")[:80], (r.applicability_reason or "")[:APPLICABILITY_SHOWN],
        )
    return table


def health_summary(cfg: Config) -> str:
    """'health: ok|degraded', disk headroom and every problem (as GET /health says)."""
    db = Database(cfg.database_url)
    db.create_all()
    try:
        return summary_line(health_report(db, cfg, model=None, model_expected=False))
    finally:
        db.dispose()


def print_status(cfg: Config) -> None:
    """Print the table and the health summary to the terminal."""
    console = Console()
    console.print(status_table(cfg))
    console.print(health_summary(cfg), markup=False, highlight=False)
